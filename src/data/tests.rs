//! Tests of the data layer: sampler properties, synthetic families, prefetching,
//! readers on files the tests write, and readers on the real data sets where
//! installed (`skipped:` otherwise, unless `MELORA_REQUIRE_SHARED=1`).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::readers::*;
use super::*;
use crate::fixtures::shared_required;
use crate::Error;

fn sampler(sizes: Vec<usize>, n: usize, k: usize, q: usize) -> EpisodeSampler {
    EpisodeSampler::new(sizes, &[], n, k, q, SmallClassPolicy::Error).unwrap()
}

/// The real data at `path`, or `None` after printing `skipped:` (a failure under
/// `MELORA_REQUIRE_SHARED=1`).
fn real_data(path: &Path, what: &str) -> Option<PathBuf> {
    if path.exists() {
        return Some(path.to_path_buf());
    }
    assert!(
        !shared_required(),
        "{what} not found at {} (MELORA_REQUIRE_SHARED=1); run scripts/fetch-data.sh",
        path.display()
    );
    eprintln!("skipped: {what} not found at {}", path.display());
    None
}

fn omniglot_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/omniglot")
}

#[test]
fn episodes_have_n_classes_k_support_q_query_disjoint() {
    let s = sampler(vec![30; 12], 5, 3, 4);
    for i in 0..200 {
        let spec = s.episode(7, i);
        assert_eq!(spec.classes.len(), 5);
        assert_eq!(spec.classes.iter().collect::<HashSet<_>>().len(), 5);
        for (support, query) in spec.support.iter().zip(&spec.query) {
            assert_eq!(support.len(), 3);
            assert_eq!(query.len(), 4);
            let all: HashSet<_> = support.iter().chain(query).collect();
            assert_eq!(all.len(), 7, "support and query overlap");
            assert!(all.iter().all(|&&i| i < 30));
        }
    }
}

#[test]
fn episodes_are_reproducible_by_seed_and_every_class_appears() {
    let s = sampler(vec![10, 12, 8, 30, 9, 11, 10, 10], 3, 2, 3);
    assert_eq!(s.fixed_episodes(1, 600), s.fixed_episodes(1, 600));
    assert_ne!(s.fixed_episodes(1, 20), s.fixed_episodes(2, 20));
    // Episode i does not depend on the others drawn.
    assert_eq!(s.episode(1, 599), s.fixed_episodes(1, 600)[599]);
    let seen: HashSet<usize> = s
        .fixed_episodes(3, 300)
        .iter()
        .flat_map(|e| e.classes.clone())
        .collect();
    assert_eq!(seen.len(), 8);
    // Labels are permuted: class 0 does not always get the same label.
    let labels: HashSet<usize> = s
        .fixed_episodes(3, 300)
        .iter()
        .filter_map(|e| e.classes.iter().position(|&c| c == 0))
        .collect();
    assert_eq!(labels.len(), 3);
}

#[test]
fn fixed_episodes_are_stable_across_runs_and_platforms() {
    // Pinned values: ChaCha8 and rand 0.9's ranges are portable, so these never change.
    let spec = sampler(vec![20; 10], 3, 1, 1).episode(42, 0);
    assert_eq!(
        spec,
        EpisodeSpec {
            classes: vec![9, 6, 1],
            support: vec![vec![15], vec![11], vec![12]],
            query: vec![vec![18], vec![14], vec![2]],
        }
    );
}

#[test]
fn small_classes_are_skipped_or_rejected() {
    let names: Vec<String> = ["a", "tiny", "c", "d"].map(String::from).to_vec();
    let skip =
        EpisodeSampler::new(vec![10, 3, 10, 10], &names, 2, 2, 2, SmallClassPolicy::Skip).unwrap();
    assert_eq!(skip.skipped(), &[1]);
    for i in 0..100 {
        assert!(!skip.episode(0, i).classes.contains(&1));
    }
    let err = EpisodeSampler::new(
        vec![10, 3, 10, 10],
        &names,
        2,
        2,
        2,
        SmallClassPolicy::Error,
    )
    .unwrap_err();
    assert!(err.to_string().contains("`tiny` has 3 examples"), "{err}");
    let err =
        EpisodeSampler::new(vec![10, 3, 3], &[], 2, 2, 2, SmallClassPolicy::Skip).unwrap_err();
    assert!(err.to_string().contains("only 1 of 3 classes"), "{err}");
}

#[test]
fn splits_are_class_disjoint_and_cover_every_class() {
    let splits = ClassSplits::by_fraction(41, 0.6, 0.2, 5).unwrap();
    assert_eq!(splits.train.len(), 24);
    assert_eq!(splits.val.len(), 8);
    assert_eq!(splits.test.len(), 9);
    splits.check_disjoint().unwrap();
    let all: HashSet<_> = splits
        .train
        .iter()
        .chain(&splits.val)
        .chain(&splits.test)
        .collect();
    assert_eq!(all.len(), 41);
    assert_eq!(splits, ClassSplits::by_fraction(41, 0.6, 0.2, 5).unwrap());
    assert!(ClassSplits::by_fraction(3, 0.7, 0.3, 0).is_err());

    // Groups of one class split as the classes do; larger groups stay together.
    let singles: Vec<usize> = (0..41).collect();
    assert_eq!(
        ClassSplits::by_fraction_of_groups(&singles, 0.6, 0.2, 5).unwrap(),
        splits
    );
    let fours: Vec<usize> = (0..40).map(|c| c / 4).collect();
    let grouped = ClassSplits::by_fraction_of_groups(&fours, 0.6, 0.2, 5).unwrap();
    assert_eq!(
        (grouped.train.len(), grouped.val.len(), grouped.test.len()),
        (24, 8, 8)
    );
    grouped.check_disjoint().unwrap();
    for set in [&grouped.train, &grouped.val, &grouped.test] {
        for &c in set.iter() {
            assert!(set.iter().filter(|&&d| fours[d] == fours[c]).count() == 4);
        }
    }

    let data = Dataset::from_labelled(["a", "b", "c", "d"].map(|l| (l.to_string(), 0u8)));
    let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let explicit =
        ClassSplits::by_names(&data, &names(&["a", "b"]), &names(&["c"]), &names(&["d"])).unwrap();
    let [train, val, test] = data.split(&explicit).unwrap();
    assert_eq!(
        (train.num_classes(), val.num_classes(), test.num_classes()),
        (2, 1, 1)
    );
    assert!(ClassSplits::by_names(&data, &names(&["a"]), &names(&["a"]), &names(&["d"])).is_err());
    assert!(ClassSplits::by_names(&data, &names(&["x"]), &[], &names(&["d"])).is_err());
}

fn text_data() -> Arc<EncodedDataset> {
    let pairs = (0..6).flat_map(|c| {
        (0..10).map(move |i| (format!("class{c}"), format!("word{c} item{i} shared")))
    });
    Arc::new(
        EncodedDataset::from_texts(Dataset::from_labelled(pairs), &WordHashTokenizer::tiny(16))
            .unwrap(),
    )
}

#[test]
fn dataset_episodes_batch_tokens_with_permuted_labels() {
    let data = text_data();
    let s = EpisodeSampler::new(data.class_sizes(), &[], 4, 2, 3, SmallClassPolicy::Error).unwrap();
    let episodes = DatasetEpisodes::new(data, s, 9, Device::Cpu).unwrap();
    let e = episodes.episode(0).unwrap();
    assert_eq!((e.n_way, e.k_shot, e.n_query), (4, 2, 3));
    assert_eq!(e.support.len(), 8);
    assert_eq!(e.query.len(), 12);
    let tokens = e.support.tokens().unwrap();
    let ids = tokens.input_ids.to_vec2::<u32>().unwrap();
    assert!(ids
        .iter()
        .all(|row| row[0] == 1 && row.iter().all(|&t| t < 1000)));
    assert_eq!(
        e.support.labels.to_vec1::<u32>().unwrap(),
        vec![0, 0, 1, 1, 2, 2, 3, 3]
    );
    assert_eq!(e.class_ids.len(), 4);
}

#[test]
fn prefetcher_delivers_the_sampled_episodes_in_order_and_stops_when_dropped() {
    let data = text_data();
    let s = EpisodeSampler::new(data.class_sizes(), &[], 3, 1, 2, SmallClassPolicy::Error).unwrap();
    let source = Arc::new(DatasetEpisodes::new(data, s, 4, Device::Cpu).unwrap());
    let mut prefetcher = Prefetcher::new(source.clone(), 10, 4, 2).unwrap();
    for batch in 0..5u64 {
        let episodes = prefetcher.next_batch().unwrap();
        assert_eq!(episodes.len(), 4);
        for (j, e) in episodes.iter().enumerate() {
            let direct = source.episode(10 + batch * 4 + j as u64).unwrap();
            assert_eq!(e.class_ids, direct.class_ids);
            let ids = |e: &Episode| {
                e.query
                    .tokens()
                    .unwrap()
                    .input_ids
                    .to_vec2::<u32>()
                    .unwrap()
            };
            assert_eq!(ids(e), ids(&direct));
        }
    }
    // The worker is blocked on a full channel here; dropping must not hang.
    let started = std::time::Instant::now();
    drop(prefetcher);
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
}

#[test]
fn prefetcher_reports_a_source_error_then_stops() {
    struct Failing;
    impl EpisodeSource for Failing {
        fn episode(&self, _: u64) -> crate::Result<Episode> {
            Err(Error::InvalidArgument("no data".into()))
        }
    }
    let mut p = Prefetcher::new(Arc::new(Failing), 0, 2, 1).unwrap();
    assert!(p.next_batch().unwrap_err().to_string().contains("no data"));
    assert!(p.next_batch().is_err());
}

#[test]
fn synthetic_text_is_deterministic_and_classes_differ() {
    let family = SyntheticText {
        seed: 3,
        ..SyntheticText::default()
    };
    let ids = |e: &Episode| {
        e.support
            .tokens()
            .unwrap()
            .input_ids
            .to_vec2::<u32>()
            .unwrap()
    };
    let (a, b) = (family.episode(5).unwrap(), family.episode(5).unwrap());
    assert_eq!(ids(&a), ids(&b));
    assert_ne!(ids(&a), ids(&family.episode(6).unwrap()));
    assert_eq!((a.support.len(), a.query.len()), (25, 25));
    for row in ids(&a) {
        assert_eq!(row[0], 1);
        assert!(row.iter().all(|&t| t < 1000));
    }
    // Learnable: classes' token distributions are far apart in total variation.
    let task = family.task(5).unwrap();
    for i in 0..task.distributions.len() {
        for j in 0..i {
            let tv: f64 = task.distributions[i]
                .iter()
                .zip(&task.distributions[j])
                .map(|(p, q)| (p - q).abs())
                .sum::<f64>()
                / 2.0;
            assert!(tv > 0.3, "classes {i} and {j} differ by only {tv}");
        }
        let total: f64 = task.distributions[i].iter().sum();
        assert!((total - 1.0).abs() < 1e-9);
    }
    // And the samples follow them: a nearest-centroid classifier on token counts beats
    // chance by far.
    let e = family.episode(11).unwrap();
    let counts = |b: &Batch| -> Vec<Vec<f64>> {
        b.tokens()
            .unwrap()
            .input_ids
            .to_vec2::<u32>()
            .unwrap()
            .iter()
            .map(|row| {
                let mut c = vec![0.0; 1000];
                for &t in row.iter().filter(|&&t| t > 1) {
                    c[t as usize] += 1.0;
                }
                c
            })
            .collect()
    };
    let (s, q) = (counts(&e.support), counts(&e.query));
    let sl = e.support.labels.to_vec1::<u32>().unwrap();
    let ql = e.query.labels.to_vec1::<u32>().unwrap();
    let mut centroids = vec![vec![0.0; 1000]; 5];
    for (row, &l) in s.iter().zip(&sl) {
        for (c, v) in centroids[l as usize].iter_mut().zip(row) {
            *c += v;
        }
    }
    let correct = q
        .iter()
        .zip(&ql)
        .filter(|(row, &l)| {
            let score = |c: &Vec<f64>| c.iter().zip(row.iter()).map(|(a, b)| a * b).sum::<f64>();
            (0..5)
                .max_by(|&a, &b| score(&centroids[a]).total_cmp(&score(&centroids[b])))
                .unwrap()
                == l as usize
        })
        .count();
    assert!(correct >= 18, "nearest centroid got {correct}/25");
}

#[test]
fn sinusoids_are_deterministic_in_range_and_regression_batches() {
    let family = SinusoidTasks {
        k_shot: 10,
        n_query: 15,
        seed: 1,
    };
    for i in 0..200 {
        let (a, p) = family.parameters(i);
        assert!((0.1..=5.0).contains(&a) && (0.0..=std::f64::consts::PI).contains(&p));
    }
    let e = family.episode(3).unwrap();
    assert_eq!(e.n_way, 1);
    assert!(e.support.is_regression());
    assert_eq!(e.support.dense().unwrap().dims(), &[10, 1]);
    let x = e.query.dense().unwrap().to_vec2::<f32>().unwrap();
    let y = e
        .query
        .regression_targets()
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let (a, p) = family.parameters(3);
    for (x, y) in x.iter().zip(&y) {
        assert!((-5.0..=5.0).contains(&x[0]));
        assert!((f64::from(y[0]) - a * (f64::from(x[0]) - p).sin()).abs() < 1e-5);
    }
    let again = family.episode(3).unwrap();
    assert_eq!(x, again.query.dense().unwrap().to_vec2::<f32>().unwrap());
    // The loss helper: zero at the targets, an error on a classification batch.
    let loss = regression_loss(e.query.regression_targets().unwrap(), &e.query).unwrap();
    assert_eq!(loss.to_scalar::<f32>().unwrap(), 0.0);
    let text = SyntheticText::default().episode(0).unwrap();
    assert!(regression_loss(e.query.regression_targets().unwrap(), &text.query).is_err());
}

#[test]
fn synthetic_images_are_deterministic_28x28_and_classes_differ() {
    let family = SyntheticImages {
        seed: 2,
        ..SyntheticImages::default()
    };
    let e = family.episode(0).unwrap();
    let pixels = |b: &Batch| {
        b.dense()
            .unwrap()
            .flatten_from(1)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap()
    };
    assert_eq!(e.support.dense().unwrap().dims(), &[5, 1, 28, 28]);
    assert_eq!(pixels(&e.query), pixels(&family.episode(0).unwrap().query));
    // A query image is nearer its own class's support image than the others, mostly.
    let (s, q) = (pixels(&e.support), pixels(&e.query));
    let ql = e.query.labels.to_vec1::<u32>().unwrap();
    let dist = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum::<f32>();
    let correct = q
        .iter()
        .zip(&ql)
        .filter(|(img, &l)| {
            (0..5)
                .min_by(|&a, &b| dist(img, &s[a]).total_cmp(&dist(img, &s[b])))
                .unwrap()
                == l as usize
        })
        .count();
    assert!(correct >= 15, "nearest neighbour got {correct}/25");
}

#[test]
fn standardisation_uses_support_statistics_only() {
    let mut support = vec![1.0, 10.0, 3.0, f32::NAN];
    let mut query = vec![100.0, f32::NAN];
    source::standardise_on_support(&mut support, &mut query, 2);
    assert_eq!(support, vec![-1.0, 0.0, 1.0, 0.0]);
    assert_eq!(query, vec![98.0, 0.0]);
}

#[test]
fn text_readers_read_jsonl_and_csv_and_name_bad_lines() {
    let dir = tempfile::tempdir().unwrap();
    let jsonl = dir.path().join("t.jsonl");
    std::fs::write(
        &jsonl,
        "{\"text\": \"a b\", \"label\": \"x\"}\n\n{\"text\": \"c\", \"label\": 3}\n",
    )
    .unwrap();
    let data = read_text_jsonl(&jsonl, &TextColumns::default()).unwrap();
    assert_eq!(data.num_classes(), 2);
    assert_eq!(data.classes()[1].name, "3");
    std::fs::write(
        &jsonl,
        "{\"text\": \"a\", \"label\": \"x\"}\n{\"text\": 1}\n",
    )
    .unwrap();
    let err = read_text_jsonl(&jsonl, &TextColumns::default()).unwrap_err();
    assert!(err.to_string().contains("t.jsonl: line 2"), "{err}");

    let tsv = dir.path().join("t.tsv");
    std::fs::write(
        &tsv,
        "id\tsentence\tcat\n1\thello there\tA\n2\tbye\tB\n3\thi\tA\n",
    )
    .unwrap();
    let columns = TextColumns {
        text: "sentence".into(),
        label: "cat".into(),
    };
    let data = read_text_csv(&tsv, &columns).unwrap();
    assert_eq!(data.class_sizes(), vec![2, 1]);
    let err = read_text_csv(&tsv, &TextColumns::default()).unwrap_err();
    assert!(
        err.to_string().contains("t.tsv") && err.to_string().contains("no column `text`"),
        "{err}"
    );
    let csv = dir.path().join("t.csv");
    std::fs::write(&csv, "text,label\nok,a\nbroken\n").unwrap();
    let err = read_text_csv(&csv, &TextColumns::default()).unwrap_err();
    assert!(err.to_string().contains("t.csv: line 3"), "{err}");
}

#[test]
fn tabular_reader_encodes_categories_and_missing_values() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.csv");
    std::fs::write(
        &path,
        "size,colour,species\n1.5,red,a\n,blue,b\n2.5,,a\nNA,red,b\n",
    )
    .unwrap();
    let table = read_tabular(&path, "species").unwrap();
    assert_eq!(table.features, vec!["size", "colour=blue", "colour=red"]);
    assert_eq!(table.dataset.class_sizes(), vec![2, 2]);
    let b = &table.dataset.classes()[1].examples;
    assert!(b[0][0].is_nan());
    assert_eq!(&b[0][1..], &[1.0, 0.0]);
    assert_eq!(&table.dataset.classes()[0].examples[1][1..], &[0.0, 0.0]);
    let err = read_tabular(&path, "label").unwrap_err();
    assert!(
        err.to_string().contains("t.csv") && err.to_string().contains("no label column `label`"),
        "{err}"
    );
    // Episodes standardise on the support set.
    let data = Arc::new(EncodedDataset::Rows {
        dataset: table.dataset,
        standardise: true,
    });
    let s = EpisodeSampler::new(data.class_sizes(), &[], 2, 1, 1, SmallClassPolicy::Error).unwrap();
    let e = DatasetEpisodes::new(data, s, 0, Device::Cpu)
        .unwrap()
        .episode(0)
        .unwrap();
    let rows = e.query.dense().unwrap().to_vec2::<f32>().unwrap();
    assert!(rows.iter().flatten().all(|v| v.is_finite()));
}

fn write_idx(path: &Path, dims: &[u32], data: &[u8], gzip: bool) {
    let mut bytes = vec![0, 0, 8, dims.len() as u8];
    for d in dims {
        bytes.extend_from_slice(&d.to_be_bytes());
    }
    bytes.extend_from_slice(data);
    if gzip {
        use std::io::Write;
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&bytes).unwrap();
        bytes = enc.finish().unwrap();
    }
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn idx_reader_reads_plain_and_gzip_and_rejects_truncation() {
    let dir = tempfile::tempdir().unwrap();
    let pixels: Vec<u8> = (0..6 * 4).map(|i| (i * 10) as u8).collect();
    for gzip in [false, true] {
        let (im, lb) = (dir.path().join("im.idx"), dir.path().join("lb.idx"));
        write_idx(&im, &[6, 2, 2], &pixels, gzip);
        write_idx(&lb, &[6], &[0, 1, 0, 2, 1, 0], gzip);
        let (data, rows, cols) = read_idx_dataset(&im, &lb).unwrap();
        assert_eq!((rows, cols), (2, 2));
        assert_eq!(data.class_sizes(), vec![3, 2, 1]);
        assert_eq!(
            data.classes()[2].examples[0],
            vec![120.0 / 255.0, 130.0 / 255.0, 140.0 / 255.0, 150.0 / 255.0]
        );
        write_idx(&im, &[6, 2, 2], &pixels[..20], gzip);
        let err = read_idx(&im).unwrap_err();
        assert!(
            err.to_string().contains("im.idx") && err.to_string().contains("truncated"),
            "{err}"
        );
    }
    // A gzip stream cut short.
    let path = dir.path().join("cut.gz");
    write_idx(&path, &[6, 2, 2], &pixels, true);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    assert!(read_idx(&path).unwrap_err().to_string().contains("cut.gz"));
}

fn png_bytes(width: u32, height: u32, pixels: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, width, height);
        enc.set_color(png::ColorType::Grayscale);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header().unwrap();
        writer.write_image_data(pixels).unwrap();
    }
    out
}

#[test]
fn omniglot_reader_reads_folders_inverts_resizes_rotates_and_names_corrupt_pngs() {
    let dir = tempfile::tempdir().unwrap();
    for (c, ch) in ["character01", "character02"].iter().enumerate() {
        let class = dir.path().join("Alpha").join(ch);
        std::fs::create_dir_all(&class).unwrap();
        for i in 0..3 {
            // White paper (255) with a black left half for class 0, top half for 1.
            let px: Vec<u8> = (0..16)
                .map(|p| {
                    let (x, y) = (p % 4, p / 4);
                    if (c == 0 && x < 2) || (c == 1 && y < 2) {
                        0
                    } else {
                        255
                    }
                })
                .collect();
            std::fs::write(class.join(format!("{i}.png")), png_bytes(4, 4, &px)).unwrap();
        }
    }
    let options = OmniglotOptions {
        image_size: 2,
        rotations: true,
    };
    let data = read_omniglot(dir.path(), &options).unwrap();
    assert_eq!(data.num_classes(), 8);
    assert_eq!(data.num_examples(), 24);
    let original = &data.classes()[data.class_index("Alpha/character01").unwrap()];
    assert_eq!(original.examples[0], vec![1.0, 0.0, 1.0, 0.0]);
    let turned = &data.classes()[data.class_index("Alpha/character01/rot90").unwrap()];
    assert_eq!(turned.examples[0], vec![1.0, 1.0, 0.0, 0.0]);
    // A character's rotations are one group, so a split keeps them together.
    let groups = data.class_groups();
    let group_of = |name: &str| groups[data.class_index(name).unwrap()];
    assert_eq!(
        group_of("Alpha/character01"),
        group_of("Alpha/character01/rot270")
    );
    assert_ne!(group_of("Alpha/character01"), group_of("Alpha/character02"));
    assert_eq!(groups.iter().collect::<HashSet<_>>().len(), 2);

    std::fs::write(dir.path().join("Alpha/character02/bad.png"), b"not a png").unwrap();
    let err = read_omniglot(dir.path(), &options).unwrap_err();
    assert!(err.to_string().contains("bad.png"), "{err}");
    let err = read_omniglot(&dir.path().join("missing"), &options).unwrap_err();
    assert!(err.to_string().contains("missing"), "{err}");
}

#[test]
fn word_hash_tokenizer_is_stable_and_in_vocab() {
    let tok = WordHashTokenizer::tiny(4);
    let ids = tok.encode("The cat, the CAT sat on").unwrap();
    assert_eq!(ids.len(), 4);
    assert_eq!(ids[0], 1);
    assert_eq!(ids[1], ids[3]);
    assert!(ids.iter().all(|&t| (1..1000).contains(&t)));
}

#[test]
fn wordnet_has_41_lexicographer_classes_and_about_96k_definitions() {
    let Some(dir) = real_data(
        Path::new(WORDNET_DIR).join("data.noun").as_path(),
        "WordNet",
    ) else {
        return;
    };
    let data = read_wordnet(dir.parent().unwrap()).unwrap();
    eprintln!(
        "WordNet: {} classes, {} definitions",
        data.num_classes(),
        data.num_examples()
    );
    assert_eq!(data.num_classes(), 41);
    assert!((95_000..=97_000).contains(&data.num_examples()));
    assert_eq!(data.classes()[0].name, "noun.Tops");
    let broken = tempfile::tempdir().unwrap();
    std::fs::write(
        broken.path().join("data.noun"),
        "  licence\n00001 xx n | gloss\n",
    )
    .unwrap();
    std::fs::write(broken.path().join("data.verb"), "").unwrap();
    let err = read_wordnet(broken.path()).unwrap_err();
    assert!(err.to_string().contains("data.noun: line 2"), "{err}");
}

#[test]
fn omniglot_reads_both_shared_zips() {
    let dir = omniglot_dir();
    let options = OmniglotOptions::default();
    let (mut images, mut characters) = (0, std::collections::BTreeSet::new());
    for name in [
        "images_background_small1.zip",
        "images_background_small2.zip",
    ] {
        let Some(path) = real_data(&dir.join(name), "Omniglot") else {
            return;
        };
        let data = read_omniglot(&path, &options).unwrap();
        eprintln!(
            "{name}: {} classes, {} images",
            data.num_classes(),
            data.num_examples()
        );
        assert!(data.num_classes() > 50);
        assert!(data.class_sizes().iter().all(|&n| n == 20));
        let image = &data.classes()[0].examples[0];
        assert_eq!(image.len(), 28 * 28);
        // Inverted: mostly paper (0), some strokes.
        let ink = image.iter().filter(|&&v| v > 0.5).count();
        assert!(ink > 5 && ink < 28 * 28 / 2, "{ink} ink pixels");
        images += data.num_examples();
        characters.extend(data.classes().iter().map(|c| c.name.clone()));
    }
    // Both archives hold Greek and Latin (the same characters, other drawers): read
    // together, a character is one class with the drawings of both.
    let both = read_omniglot(&dir, &options).unwrap();
    eprintln!(
        "both zips: {} classes, {} images",
        both.num_classes(),
        both.num_examples()
    );
    assert_eq!(both.num_classes(), characters.len());
    assert_eq!(both.num_examples(), images);
}

#[test]
fn fashion_mnist_reads_when_installed() {
    let dir = Path::new("/usr/share/datasets/fashion-mnist");
    let Some(images) = real_data(&dir.join("t10k-images-idx3-ubyte.gz"), "Fashion-MNIST") else {
        return;
    };
    let (data, rows, cols) =
        read_idx_dataset(&images, &dir.join("t10k-labels-idx1-ubyte.gz")).unwrap();
    assert_eq!((rows, cols), (28, 28));
    assert_eq!(data.num_classes(), 10);
    assert_eq!(data.num_examples(), 10_000);
}

/// `model.max_length` (the encoder's length) bounds the synthetic text sequences, as
/// it bounds tokenised texts; too short a length for the family is a config error.
#[test]
fn synthetic_text_honours_the_model_max_length() {
    let config = crate::config::DataConfig::default();
    for max_length in [3, 5, 12, 32, 64] {
        let encoder = WordHashTokenizer::tiny(max_length);
        let source = episode_source(&config, 1, Split::Train, &encoder, &Device::Cpu).unwrap();
        let longest = (0..20)
            .map(|i| {
                let e = source.episode(i).unwrap();
                let len = |b: &Batch| b.tokens().unwrap().input_ids.dims()[1];
                len(&e.support).max(len(&e.query))
            })
            .max()
            .unwrap();
        assert!(longest <= max_length, "{longest} tokens under {max_length}");
        assert_eq!(longest, max_length.min(32), "the longest of 20 episodes");
    }
    let err = episode_source(
        &config,
        1,
        Split::Train,
        &WordHashTokenizer::tiny(2),
        &Device::Cpu,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("model.max_length"), "{err}");
}

#[test]
fn configured_sources_split_by_class_and_follow_the_config() {
    let device = Device::Cpu;
    let encoder = WordHashTokenizer::tiny(32);
    let mut config = crate::config::DataConfig::default();
    let e = episode_source(&config, 1, Split::Train, &encoder, &device)
        .unwrap()
        .episode(0)
        .unwrap();
    assert!(e.support.tokens().is_ok());
    config.synthetic_task = crate::config::SyntheticTask::Sinusoid;
    let e = episode_source(&config, 1, Split::Test, &encoder, &device)
        .unwrap()
        .episode(0)
        .unwrap();
    assert!(e.support.is_regression());

    // A JSONL of 10 classes: train and test episodes never share a class.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.jsonl");
    let lines: String = (0..10)
        .flat_map(|c| {
            (0..12).map(move |i| format!("{{\"text\": \"w{c} {i}\", \"label\": \"c{c}\"}}\n"))
        })
        .collect();
    std::fs::write(&path, lines).unwrap();
    config.source = crate::config::DataSource::Jsonl;
    config.path = Some(path);
    config.n_way = 2;
    let names = |split| -> HashSet<String> {
        let source = episode_source(&config, 3, split, &encoder, &device).unwrap();
        (0..50)
            .flat_map(|i| {
                let e = source.episode(i).unwrap();
                e.support
                    .tokens()
                    .unwrap()
                    .input_ids
                    .to_vec2::<u32>()
                    .unwrap()
            })
            .map(|row| format!("{:?}", row[1]))
            .collect()
    };
    let (train, test) = (names(Split::Train), names(Split::Test));
    assert!(!train.is_empty() && train.is_disjoint(&test));
}

/// IDX images are resized to `data.image_size`, as Omniglot's are, so Conv4 (built for
/// that size) reads them.
#[test]
fn idx_images_are_resized_to_the_configured_size() {
    let dir = tempfile::tempdir().unwrap();
    let (images, labels) = (
        dir.path().join("train-images-idx3-ubyte"),
        dir.path().join("train-labels-idx1-ubyte"),
    );
    let pixels: Vec<u8> = (0..6 * 20 * 20).map(|i| (i % 251) as u8).collect();
    write_idx(&images, &[6, 20, 20], &pixels, false);
    write_idx(&labels, &[6], &[0, 1, 0, 1, 0, 1], false);
    let mut config = crate::config::DataConfig {
        source: crate::config::DataSource::Idx,
        path: Some(dir.path().to_path_buf()),
        ..Default::default()
    };
    for size in [20, 16, 28] {
        config.image_size = size;
        match load_dataset(&config, &WordHashTokenizer::tiny(8)).unwrap() {
            EncodedDataset::Images {
                dataset,
                height,
                width,
                ..
            } => {
                assert_eq!((height, width), (size, size));
                assert!(dataset
                    .classes()
                    .iter()
                    .all(|c| c.examples.iter().all(|e| e.len() == size * size)));
            }
            other => panic!("IDX gives images, got {other:?}"),
        }
    }
}

// Crafted input (issue 17): sizes and headers that used to overflow, index out of
// bounds or allocate from a header are errors naming the problem.

#[test]
fn idx_dimensions_whose_product_overflows_are_an_error() {
    let dir = tempfile::tempdir().unwrap();
    for gzip in [false, true] {
        let path = dir
            .path()
            .join(format!("huge{}.idx", if gzip { ".gz" } else { "" }));
        write_idx(&path, &[u32::MAX, u32::MAX, u32::MAX], &[1, 2, 3], gzip);
        let err = read_idx(&path).unwrap_err();
        assert!(matches!(err, Error::Format { .. }), "{err:?}");
        let text = err.to_string();
        assert!(
            text.contains("huge") && text.contains("too large"),
            "{text}"
        );
    }
}

#[test]
fn idx_header_claiming_more_data_than_the_file_has_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    for gzip in [false, true] {
        // 2^31 × 2 × 2 bytes claimed (8 GiB), 3 present: refused without allocating.
        let path = dir
            .path()
            .join(format!("claims{}.idx", if gzip { ".gz" } else { "" }));
        write_idx(&path, &[1 << 31, 2, 2], &[1, 2, 3], gzip);
        let text = read_idx(&path).unwrap_err().to_string();
        assert!(
            text.contains("claims") && text.contains("truncated"),
            "{text}"
        );
        // More data than claimed.
        write_idx(&path, &[1, 2, 2], &[0; 5], gzip);
        let text = read_idx(&path).unwrap_err().to_string();
        assert!(text.contains("found more"), "{text}");
    }
}

#[test]
fn idx_label_count_mismatch_and_empty_images_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (im, lb) = (dir.path().join("im.idx"), dir.path().join("lb.idx"));
    write_idx(&im, &[2, 2, 2], &[0; 8], false);
    write_idx(&lb, &[3], &[0, 1, 2], false);
    let text = read_idx_dataset(&im, &lb).unwrap_err().to_string();
    assert!(
        text.contains("lb.idx") && text.contains("expected 2 labels"),
        "{text}"
    );
    write_idx(&im, &[2, 0, 2], &[], false);
    write_idx(&lb, &[2], &[0, 1], false);
    let text = read_idx_dataset(&im, &lb).unwrap_err().to_string();
    assert!(
        text.contains("im.idx") && text.contains("no pixels"),
        "{text}"
    );
}

#[test]
fn sampler_sizes_that_overflow_are_an_error() {
    for (n, k, q) in [
        (2, usize::MAX, 1),
        (2, 1, usize::MAX),
        (usize::MAX, 1, 1),
        (1 << 62, 2, 2),
    ] {
        let err =
            EpisodeSampler::new(vec![10; 4], &[], n, k, q, SmallClassPolicy::Skip).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
        assert!(err.to_string().contains("too large"), "{err}");
    }
}

#[test]
fn synthetic_sizes_that_overflow_are_an_error() {
    let text = SyntheticText {
        k_shot: usize::MAX,
        n_query: 1,
        ..SyntheticText::default()
    };
    assert!(text
        .episode(0)
        .unwrap_err()
        .to_string()
        .contains("too large"));
    let images = SyntheticImages {
        n_way: usize::MAX,
        ..SyntheticImages::default()
    };
    assert!(images
        .episode(0)
        .unwrap_err()
        .to_string()
        .contains("too large"));
    let images = SyntheticImages {
        size: 1 << 33,
        ..SyntheticImages::default()
    };
    assert!(images
        .episode(0)
        .unwrap_err()
        .to_string()
        .contains("too large"));
    let sinusoids = SinusoidTasks {
        k_shot: usize::MAX,
        n_query: 1,
        seed: 0,
    };
    assert!(sinusoids
        .episode(0)
        .unwrap_err()
        .to_string()
        .contains("too large"));
}

#[test]
fn prefetcher_episode_indices_that_overflow_are_an_error() {
    let source = Arc::new(SinusoidTasks {
        k_shot: 1,
        n_query: 1,
        seed: 0,
    });
    let mut p = Prefetcher::new(source, u64::MAX - 2, 2, 1).unwrap();
    assert_eq!(p.next_batch().unwrap().len(), 2);
    let err = p.next_batch().unwrap_err().to_string();
    assert!(err.contains("episode index"), "{err}");
}

#[test]
fn omniglot_image_size_that_overflows_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let class = dir.path().join("Alpha/character01");
    std::fs::create_dir_all(&class).unwrap();
    std::fs::write(class.join("0.png"), png_bytes(2, 2, &[0, 255, 255, 0])).unwrap();
    let options = OmniglotOptions {
        image_size: 1 << 33,
        rotations: false,
    };
    let err = read_omniglot(dir.path(), &options).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
    assert!(err.to_string().contains("image_size"), "{err}");
}

/// The domains family: the same classes in every task (label c is intent c), whose
/// universal ids recur across tasks while each task's domain ids are new; the world is
/// shared by every split of one seed.
#[test]
fn synthetic_domains_share_classes_across_tasks() {
    let family = SyntheticDomains {
        world_seed: 7,
        seed: 3,
        universal: 0.5,
        domain: 0.5,
        ..SyntheticDomains::default()
    };
    let ids_of = |e: &Episode, class: u32| -> HashSet<u32> {
        let ids = e
            .support
            .tokens()
            .unwrap()
            .input_ids
            .to_vec2::<u32>()
            .unwrap();
        let labels = e.support.labels.to_vec1::<u32>().unwrap();
        ids.iter()
            .zip(&labels)
            .filter(|(_, &l)| l == class)
            .flat_map(|(row, _)| row[1..].iter().copied().filter(|&t| t != 0))
            .collect()
    };
    let (a, b) = (family.episode(0).unwrap(), family.episode(1).unwrap());
    assert_eq!(
        a.support
            .tokens()
            .unwrap()
            .input_ids
            .to_vec2::<u32>()
            .unwrap(),
        family
            .episode(0)
            .unwrap()
            .support
            .tokens()
            .unwrap()
            .input_ids
            .to_vec2::<u32>()
            .unwrap()
    );
    for class in 0..5 {
        let (in_a, in_b) = (ids_of(&a, class), ids_of(&b, class));
        // Universal ids recur (3 of them); domain ids (6 per task) mostly do not.
        let shared = in_a.intersection(&in_b).count();
        assert!(
            (1..=4).contains(&shared),
            "class {class}: {shared} shared ids"
        );
    }
    // Another task seed, the same world: the universal ids are the same.
    let other_split = SyntheticDomains {
        seed: 99,
        ..family.clone()
    };
    let c = other_split.episode(0).unwrap();
    assert!(ids_of(&a, 0).intersection(&ids_of(&c, 0)).count() >= 1);
    assert!(SyntheticDomains {
        universal: 0.7,
        domain: 0.5,
        ..SyntheticDomains::default()
    }
    .episode(0)
    .is_err());
}

#[test]
fn micro_batches_are_balanced_cover_the_batch_in_order_and_respect_the_size() {
    let n = 25;
    let inputs = Tensor::arange(0f32, n as f32, &Device::Cpu)
        .unwrap()
        .reshape((n, 1))
        .unwrap();
    let labels = Tensor::zeros(n, DType::U32, &Device::Cpu).unwrap();
    let batch = Batch::from_dense(inputs, labels).unwrap();
    for (size, expected) in [
        (8, vec![7, 6, 6, 6]),
        (5, vec![5; 5]),
        (13, vec![13, 12]),
        (25, vec![25]),
        (40, vec![25]),
        (1, vec![1; 25]),
    ] {
        let parts = batch.split(size).unwrap();
        let sizes: Vec<usize> = parts.iter().map(Batch::len).collect();
        assert_eq!(sizes, expected, "micro-batches of at most {size}");
        let joined = Batch::concat(&parts).unwrap();
        let values = joined.dense().unwrap().flatten_all().unwrap();
        assert_eq!(
            values.to_vec1::<f32>().unwrap(),
            (0..n).map(|i| i as f32).collect::<Vec<_>>()
        );
    }
    assert!(batch.split(0).is_err());
}

/// Image folders: meta-training episodes are augmented under `train_aug` (another
/// crop, flip and jitter in every episode, the same for the same episode), while
/// validation and test episodes are the centre crop that `melora adapt` also reads.
#[test]
fn image_folder_episodes_augment_meta_training_only() {
    let dir = tempfile::tempdir().unwrap();
    for class in 0..5 {
        for example in 0..3 {
            let image = image::RgbImage::from_fn(30, 26, |x, y| {
                image::Rgb([
                    (x * 8) as u8,
                    (y * 9) as u8,
                    (class * 50 + example * 7) as u8,
                ])
            });
            let path = dir.path().join(format!("c{class}/{example}.png"));
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            image.save(&path).unwrap();
        }
    }
    let mut config = crate::config::DataConfig {
        source: crate::config::DataSource::ImageFolder,
        path: Some(dir.path().to_path_buf()),
        image_size: 16,
        n_way: 2,
        k_shot: 1,
        n_query: 1,
        train_fraction: 0.4,
        val_fraction: 0.2,
        train_aug: true,
        ..Default::default()
    };
    let encoder = WordHashTokenizer::tiny(8);
    let sources = |config: &crate::config::DataConfig| {
        episode_sources(
            config,
            1,
            &[Split::Train, Split::Test],
            &encoder,
            &Device::Cpu,
        )
        .unwrap()
    };
    let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let support = |source: &Arc<dyn EpisodeSource>, i: u64| {
        let episode = source.episode(i).unwrap();
        let images = episode.support.dense().unwrap();
        assert_eq!(images.dims4().unwrap(), (2, 3, 16, 16));
        values(images)
    };
    let augmented = sources(&config);
    config.train_aug = false;
    let plain = sources(&config);
    // Same episode, same augmentation; augmented differs from the centre crop.
    assert_eq!(support(&augmented[0], 0), support(&augmented[0], 0));
    assert_ne!(support(&augmented[0], 0), support(&plain[0], 0));
    // Test episodes are never augmented: equal with and without train_aug, and
    // each image is what `prepare_for_evaluation` makes of its file.
    assert_eq!(support(&augmented[1], 3), support(&plain[1], 3));
    let episode = plain[1].episode(3).unwrap();
    let transform = PhotoTransform::for_config(&config);
    let names = plain[1].class_names().unwrap();
    // class_ids index the split's own classes, whose names class_names lists.
    let spec_class = |label: usize| -> String { names[episode.class_ids[label]].clone() };
    let first = values(episode.support.dense().unwrap())[..3 * 16 * 16].to_vec();
    let candidates: Vec<Vec<f32>> = (0..3)
        .map(|example| {
            let file = dir.path().join(format!("{}/{example}.png", spec_class(0)));
            let bytes = std::fs::read(&file).unwrap();
            transform.prepare_for_evaluation(&bytes, "x").unwrap()
        })
        .collect();
    assert!(
        candidates.contains(&first),
        "the support image is a centre crop of its file"
    );
}
