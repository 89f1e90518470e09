//! Fuzz-style robustness test of every reader of untrusted files (issue 17): each
//! format starts from a small valid file written here, then hundreds of seeded
//! corruptions of it (truncations, byte flips, insertions and deletions, header
//! fields set to huge or zero values, wrong magic numbers, wrong types, ragged rows,
//! non-UTF-8 bytes) are fed to the public readers. No case may panic. A case that is
//! invalid by construction must be an `Err`; a random flip of a text format may still
//! parse, so those only count `Ok`/`Err`.

use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use melora::config::{Config, DataSource};
use melora::data::readers::{
    decode_png_grey, read_idx, read_idx_dataset, read_omniglot, read_tabular, read_text_csv,
    read_text_jsonl, read_wordnet, OmniglotOptions, TextColumns,
};
use melora::data::{episode_source, Split, WordHashTokenizer};
use melora::optim::{LossScaler, Optimizer, OptimizerKind};
use melora::tensor::ParamSet;
use melora::train::checkpoint::{
    load_checkpoint, read_checkpoint_state, save_checkpoint, CheckpointState,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// What a case must give.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Invalid by construction: an error.
    Err,
    /// May still be valid (a flip inside a text field): anything but a panic.
    Any,
}

/// Outcomes of one format's cases.
struct Fuzz {
    format: &'static str,
    rng: ChaCha8Rng,
    dir: tempfile::TempDir,
    cases: usize,
    paths: std::cell::Cell<usize>,
    ok: usize,
    err: usize,
    failures: Vec<String>,
}

impl Fuzz {
    fn new(format: &'static str, seed: u64) -> Self {
        Self {
            format,
            rng: ChaCha8Rng::seed_from_u64(seed),
            dir: tempfile::tempdir().unwrap(),
            cases: 0,
            paths: std::cell::Cell::new(0),
            ok: 0,
            err: 0,
            failures: Vec::new(),
        }
    }

    /// A fresh path in the case directory, ending in `name`.
    fn path(&self, name: &str) -> PathBuf {
        let n = self.paths.get();
        self.paths.set(n + 1);
        self.dir.path().join(format!("{n}-{name}"))
    }

    /// Runs `read` under `catch_unwind` and records the outcome.
    fn case<T>(&mut self, what: &str, expect: Expect, read: impl FnOnce() -> melora::Result<T>) {
        self.cases += 1;
        match catch_unwind(AssertUnwindSafe(read)) {
            Err(panic) => {
                let message = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                self.failures
                    .push(format!("case {} ({what}): PANIC {message}", self.cases));
            }
            Ok(Ok(_)) => {
                self.ok += 1;
                if expect == Expect::Err {
                    self.failures.push(format!(
                        "case {} ({what}): Ok, expected an error",
                        self.cases
                    ));
                }
            }
            Ok(Err(_)) => self.err += 1,
        }
    }

    /// Prints the counts and fails on any panic or unexpected `Ok`.
    fn finish(self, min_cases: usize) {
        println!(
            "fuzz {}: {} cases, {} Ok, {} Err, {} failures",
            self.format,
            self.cases,
            self.ok,
            self.err,
            self.failures.len()
        );
        assert!(
            self.failures.is_empty(),
            "{}: {} of {} cases failed:\n{}",
            self.format,
            self.failures.len(),
            self.cases,
            self.failures.join("\n")
        );
        assert!(
            self.cases >= min_cases,
            "{}: only {} cases",
            self.format,
            self.cases
        );
    }

    // Byte-level corruptions.

    /// A proper prefix of `bytes` (possibly empty).
    fn truncated(&mut self, bytes: &[u8]) -> Vec<u8> {
        bytes[..self.rng.random_range(0..bytes.len())].to_vec()
    }

    /// `bytes` with 1 to 4 bytes XOR-ed with a non-zero value.
    fn flipped(&mut self, bytes: &[u8]) -> Vec<u8> {
        let mut out = bytes.to_vec();
        for _ in 0..self.rng.random_range(1..=4) {
            let i = self.rng.random_range(0..out.len());
            out[i] ^= self.rng.random_range(1..=255u8);
        }
        out
    }

    /// `bytes` with 1 to 8 random bytes inserted at one place.
    fn inserted(&mut self, bytes: &[u8]) -> Vec<u8> {
        let mut out = bytes.to_vec();
        let at = self.rng.random_range(0..=out.len());
        let n = self.rng.random_range(1..=8);
        let extra: Vec<u8> = (0..n).map(|_| self.rng.random()).collect();
        out.splice(at..at, extra);
        out
    }

    /// `bytes` with 1 to 8 bytes deleted at one place.
    fn deleted(&mut self, bytes: &[u8]) -> Vec<u8> {
        let mut out = bytes.to_vec();
        let at = self.rng.random_range(0..out.len());
        let n = self.rng.random_range(1..=8).min(out.len() - at);
        out.drain(at..at + n);
        out
    }

    /// One of the four byte-level corruptions, chosen at random, with its name and
    /// whether it is invalid by construction for a length-checked binary format
    /// (truncation only: the others may leave a valid file).
    fn mutated(&mut self, bytes: &[u8]) -> (&'static str, Vec<u8>) {
        match self.rng.random_range(0..4) {
            0 => ("truncated", self.truncated(bytes)),
            1 => ("flipped", self.flipped(bytes)),
            2 => ("inserted", self.inserted(bytes)),
            _ => ("deleted", self.deleted(bytes)),
        }
    }

    /// `text` with 1 to 3 non-UTF-8 bytes inserted after byte `from` (at a char
    /// boundary, so that the rest stays as it was).
    fn non_utf8(&mut self, text: &str, from: usize) -> Vec<u8> {
        let mut at = self.rng.random_range(from..=text.len());
        while !text.is_char_boundary(at) {
            at -= 1;
        }
        let mut out = text.as_bytes().to_vec();
        let bad: &[&[u8]] = &[&[0xff], &[0xc3, 0x28], &[0xe2, 0x82], &[0x80, 0xbf, 0xfe]];
        let pick = bad[self.rng.random_range(0..bad.len())];
        out.splice(at..at, pick.iter().copied());
        out
    }
}

fn write(path: &Path, bytes: &[u8]) -> PathBuf {
    std::fs::write(path, bytes).unwrap();
    path.to_path_buf()
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

// IDX.

fn idx(dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut bytes = vec![0, 0, 8, dims.len() as u8];
    for d in dims {
        bytes.extend_from_slice(&d.to_be_bytes());
    }
    bytes.extend_from_slice(data);
    bytes
}

#[test]
fn idx_files_never_panic() {
    let mut f = Fuzz::new("idx", 0x1d8);
    let (n, rows, cols) = (12u32, 3u32, 4u32);
    let pixels: Vec<u8> = (0..n * rows * cols).map(|i| (i * 7) as u8).collect();
    let labels: Vec<u8> = (0..n).map(|i| (i % 3) as u8).collect();
    let images = idx(&[n, rows, cols], &pixels);
    let label_file = idx(&[n], &labels);
    for gz in [false, true] {
        let enc = |b: &[u8]| if gz { gzip(b) } else { b.to_vec() };
        let (im, lb) = (enc(&images), enc(&label_file));
        // The valid files read.
        let im_path = write(&f.path("images.idx"), &im);
        let lb_path = write(&f.path("labels.idx"), &lb);
        let (data, r, c) = read_idx_dataset(&im_path, &lb_path).unwrap();
        assert_eq!((data.num_classes(), r, c), (3, 3, 4));
        // Truncations are always errors: the data no longer matches the header (or a
        // gzip stream ends early).
        for _ in 0..25 {
            let cut = f.truncated(&im);
            let path = write(&f.path("cut.idx"), &cut);
            f.case("truncated images", Expect::Err, || read_idx(&path));
            let path2 = path.clone();
            f.case("truncated images, dataset", Expect::Err, || {
                read_idx_dataset(&path2, &lb_path)
            });
            let cut = f.truncated(&lb);
            let path = write(&f.path("cut-labels.idx"), &cut);
            f.case("truncated labels", Expect::Err, || {
                read_idx_dataset(&im_path, &path)
            });
        }
        // Random corruptions: anything but a panic.
        for _ in 0..40 {
            let (how, bytes) = f.mutated(&im);
            let path = write(&f.path("mutated.idx"), &bytes);
            f.case(how, Expect::Any, || read_idx_dataset(&path, &lb_path));
            let (how, bytes) = f.mutated(&lb);
            let path = write(&f.path("mutated-labels.idx"), &bytes);
            f.case(how, Expect::Any, || read_idx_dataset(&im_path, &path));
        }
        // Header fields set to huge or zero values.
        for dim in 0..3 {
            for value in [0, 1, 2, 1 << 16, 1 << 31, u32::MAX] {
                let mut dims = [n, rows, cols];
                dims[dim] = value;
                let path = write(&f.path("dims.idx"), &enc(&idx(&dims, &pixels)));
                f.case("dimension set", Expect::Err, || read_idx(&path));
            }
        }
        // Dimensions whose product overflows 64 bits.
        for dims in [
            vec![u32::MAX; 3],
            vec![1 << 31; 3],
            vec![u32::MAX; 255],
            vec![65536, 65536, 65536, 65536, 0],
        ] {
            let path = write(&f.path("overflow.idx"), &enc(&idx(&dims, &pixels)));
            f.case("dimensions overflow", Expect::Err, || read_idx(&path));
        }
        for rank in [0u8, 1, 2, 4, 200, 255] {
            let mut bytes = images.clone();
            bytes[3] = rank;
            let path = write(&f.path("rank.idx"), &enc(&bytes));
            f.case("rank set", Expect::Err, || read_idx(&path));
        }
        for (at, value) in [(0, 1u8), (1, 0x08), (0, 0xff), (2, 0x09), (2, 0x0d), (2, 0)] {
            let mut bytes = images.clone();
            bytes[at] = value;
            let path = write(&f.path("magic.idx"), &enc(&bytes));
            f.case("bad magic or type", Expect::Err, || read_idx(&path));
        }
        // Shapes that do not make a data set: labels of another count or rank,
        // images of rank 2.
        for (imgs, lbls) in [
            (idx(&[n, rows, cols], &pixels), idx(&[n - 1], &labels[1..])),
            (idx(&[n, rows, cols], &pixels), idx(&[n, 1], &labels)),
            (idx(&[n, rows * cols], &pixels), idx(&[n], &labels)),
            (idx(&[n, 0, cols], &[]), idx(&[n], &labels)),
        ] {
            let a = write(&f.path("shape-images.idx"), &enc(&imgs));
            let b = write(&f.path("shape-labels.idx"), &enc(&lbls));
            f.case("mismatched shapes", Expect::Err, || {
                read_idx_dataset(&a, &b)
            });
        }
    }
    // A gzip stream that inflates far beyond its header's claim is refused once the
    // claim is passed (the reader stops there), and one that is not gzip after its
    // magic number is an error.
    let bomb = gzip(&idx(&[2, 2], &vec![0u8; 8 << 20]));
    let path = write(&f.path("bomb.idx.gz"), &bomb);
    f.case("gzip bomb", Expect::Err, || read_idx(&path));
    let path = write(&f.path("fake.gz"), &[0x1f, 0x8b, 1, 2, 3, 4, 5, 6, 7, 8]);
    f.case("not gzip", Expect::Err, || read_idx(&path));
    f.case("missing file", Expect::Err, || {
        read_idx(&PathBuf::from("/nonexistent/melora-fuzz.idx"))
    });
    f.finish(380);
}

// PNG, alone and in Omniglot zips.

fn png(width: u32, height: u32, seed: u8) -> Vec<u8> {
    let pixels: Vec<u8> = (0..width * height)
        .map(|i| {
            if (i as u8).wrapping_add(seed).is_multiple_of(3) {
                0
            } else {
                255
            }
        })
        .collect();
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, width, height);
        enc.set_color(png::ColorType::Grayscale);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header().unwrap();
        writer.write_image_data(&pixels).unwrap();
    }
    out
}

/// `png` with its IHDR width and height replaced (the chunk's CRC recomputed, so the
/// decoder sees a well-formed header with these sizes).
fn png_claiming(png: &[u8], width: u32, height: u32) -> Vec<u8> {
    let mut out = png.to_vec();
    // Signature (8), length (4), "IHDR" (4), then width and height.
    out[16..20].copy_from_slice(&width.to_be_bytes());
    out[20..24].copy_from_slice(&height.to_be_bytes());
    let mut crc = flate2::Crc::new();
    crc.update(&out[12..29]);
    out[29..33].copy_from_slice(&crc.sum().to_be_bytes());
    out
}

/// A zip of `entries` (name, bytes), stored or deflated.
fn zip_of(entries: &[(String, Vec<u8>)], deflate: bool) -> Vec<u8> {
    let mut writer = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let method = if deflate {
        zip::CompressionMethod::Deflated
    } else {
        zip::CompressionMethod::Stored
    };
    let options = zip::write::SimpleFileOptions::default().compression_method(method);
    for (name, bytes) in entries {
        writer.start_file(name.as_str(), options).unwrap();
        writer.write_all(bytes).unwrap();
    }
    writer.finish().unwrap().into_inner()
}

fn omniglot_entries() -> Vec<(String, Vec<u8>)> {
    let mut entries = Vec::new();
    for alphabet in ["Alpha", "Beta"] {
        for character in 1..=2 {
            for drawing in 1..=2u8 {
                entries.push((
                    format!("images_background/{alphabet}/character{character:02}/{drawing}.png"),
                    png(8, 8, drawing + character as u8),
                ));
            }
        }
    }
    entries
}

#[test]
fn png_and_omniglot_zips_never_panic() {
    let mut f = Fuzz::new("png-in-zip", 0x0419);
    let options = OmniglotOptions {
        image_size: 4,
        rotations: true,
    };
    let good_png = png(8, 8, 0);
    let (grey, w, h) = decode_png_grey(&good_png, "good.png").unwrap();
    assert_eq!((grey.len(), w, h), (64, 8, 8));
    // PNGs alone. A PNG cut before its image data ends cannot decode.
    for _ in 0..30 {
        let cut = good_png[..f.rng.random_range(0..good_png.len() / 2)].to_vec();
        f.case("truncated png", Expect::Err, || {
            decode_png_grey(&cut, "cut.png")
        });
        let (how, bytes) = f.mutated(&good_png);
        f.case(how, Expect::Any, || decode_png_grey(&bytes, "mutated.png"));
    }
    for (width, height) in [
        (0, 8),
        (8, 0),
        (1 << 30, 1 << 30),
        (u32::MAX, 1),
        (100_000, 100_000),
    ] {
        let bytes = png_claiming(&good_png, width, height);
        f.case("png claiming a size", Expect::Err, || {
            decode_png_grey(&bytes, "huge.png")
        });
    }
    // Zips of PNGs.
    let entries = omniglot_entries();
    for deflate in [false, true] {
        let good = zip_of(&entries, deflate);
        let path = write(&f.path("good.zip"), &good);
        let data = read_omniglot(&path, &options).unwrap();
        assert_eq!((data.num_classes(), data.num_examples()), (16, 32));
        // The end-of-central-directory record is the zip's last 22 bytes: any cut
        // loses it.
        for _ in 0..25 {
            let cut = f.truncated(&good);
            let path = write(&f.path("cut.zip"), &cut);
            f.case("truncated zip", Expect::Err, || {
                read_omniglot(&path, &options)
            });
        }
        for _ in 0..30 {
            let (how, bytes) = f.mutated(&good);
            let path = write(&f.path("mutated.zip"), &bytes);
            f.case(how, Expect::Any, || read_omniglot(&path, &options));
        }
        // A valid zip with one corrupted PNG entry.
        for _ in 0..15 {
            let mut bad = entries.clone();
            let i = f.rng.random_range(0..bad.len());
            let len = bad[i].1.len();
            bad[i].1.truncate(f.rng.random_range(0..len / 2));
            let path = write(&f.path("cut-png.zip"), &zip_of(&bad, deflate));
            f.case("zip with a truncated png", Expect::Err, || {
                read_omniglot(&path, &options)
            });
            let mut bad = entries.clone();
            let i = f.rng.random_range(0..bad.len());
            bad[i].1 = f.flipped(&bad[i].1);
            let path = write(&f.path("flipped-png.zip"), &zip_of(&bad, deflate));
            f.case("zip with a flipped png", Expect::Any, || {
                read_omniglot(&path, &options)
            });
        }
        for (what, bytes) in [
            ("not a png", b"GIF89a not a png at all".to_vec()),
            ("empty png", Vec::new()),
            (
                "png claiming 2^30 × 2^30",
                png_claiming(&good_png, 1 << 30, 1 << 30),
            ),
            ("png of width 0", png_claiming(&good_png, 0, 8)),
        ] {
            let mut bad = entries.clone();
            bad[1].1 = bytes;
            let path = write(&f.path("bad-entry.zip"), &zip_of(&bad, deflate));
            f.case(what, Expect::Err, || read_omniglot(&path, &options));
        }
    }
    // No images at all, not a zip, an image size of 0.
    let path = write(&f.path("empty.zip"), &zip_of(&[], false));
    f.case("empty zip", Expect::Err, || read_omniglot(&path, &options));
    let path = write(&f.path("text.zip"), b"PK\x03\x04 but not really a zip");
    f.case("not a zip", Expect::Err, || read_omniglot(&path, &options));
    let path = write(&f.path("good.zip"), &zip_of(&entries, true));
    let zero = OmniglotOptions {
        image_size: 0,
        rotations: false,
    };
    f.case("image_size 0", Expect::Err, || read_omniglot(&path, &zero));
    // An extracted folder with one corrupted drawing.
    for _ in 0..10 {
        let root = f.path("folder");
        for (name, bytes) in &entries {
            let file = root.join(name);
            std::fs::create_dir_all(file.parent().unwrap()).unwrap();
            std::fs::write(file, bytes).unwrap();
        }
        let victim = root.join(&entries[f.rng.random_range(0..entries.len())].0);
        let cut = f.truncated(&good_png[..good_png.len() / 2]);
        std::fs::write(&victim, cut).unwrap();
        f.case("folder with a truncated png", Expect::Err, || {
            read_omniglot(&root, &options)
        });
    }
    f.finish(190);
}

// CSV and TSV: labelled texts and tabular data.

const TEXT_CSV: &str = "text,label\nthe cat sat,animal\na red car,vehicle\n\"dogs, too\",animal\n\
                        the bus,vehicle\nan owl,animal\na train,vehicle\n";
const TABULAR_CSV: &str = "size,weight,colour,label\n1.5,2,red,a\n,3.5,blue,b\n2.5,NA,,a\n\
                           0.5,1,red,b\n3,2,green,a\n";

/// `csv` with a row of `fields` fields inserted before data row `at`.
fn with_ragged_row(csv: &str, at: usize, fields: usize) -> String {
    let mut lines: Vec<String> = csv.lines().map(str::to_string).collect();
    let row = (0..fields)
        .map(|i| format!("x{i}"))
        .collect::<Vec<_>>()
        .join(",");
    lines.insert(1 + at.min(lines.len() - 1), row);
    lines.join("\n") + "\n"
}

#[test]
fn csv_files_never_panic() {
    let mut f = Fuzz::new("csv", 0xc5f);
    let columns = TextColumns::default();
    for (name, valid, width) in [("text", TEXT_CSV, 2), ("tabular", TABULAR_CSV, 4)] {
        let read = |path: &Path| -> melora::Result<usize> {
            if name == "text" {
                read_text_csv(path, &columns).map(|d| d.num_examples())
            } else {
                read_tabular(path, "label").map(|t| t.dataset.num_examples())
            }
        };
        let path = write(&f.path("good.csv"), valid.as_bytes());
        assert_eq!(read(&path).unwrap(), valid.lines().count() - 1);
        let rows = valid.lines().count() - 1;
        for _ in 0..40 {
            let (how, bytes) = f.mutated(valid.as_bytes());
            let path = write(&f.path("mutated.csv"), &bytes);
            f.case(how, Expect::Any, || read(&path));
        }
        // Rows with too few or too many fields.
        for _ in 0..12 {
            let at = f.rng.random_range(0..rows);
            let fields = if f.rng.random() {
                f.rng.random_range(1..width)
            } else {
                f.rng.random_range(width + 1..width + 4)
            };
            let path = write(
                &f.path("ragged.csv"),
                with_ragged_row(valid, at, fields).as_bytes(),
            );
            f.case("ragged row", Expect::Err, || read(&path));
        }
        // Invalid UTF-8 anywhere after the first character of the header.
        for _ in 0..15 {
            let bytes = f.non_utf8(valid, 1);
            let path = write(&f.path("non-utf8.csv"), &bytes);
            f.case("non-UTF-8", Expect::Err, || read(&path));
        }
        let header = valid.lines().next().unwrap();
        for (what, text) in [
            ("empty file", String::new()),
            ("header only", format!("{header}\n")),
            ("no label column", valid.replacen("label", "category", 1)),
            (
                "empty label",
                format!("{header}\n{}\n", ",".repeat(width - 1)),
            ),
            (
                "unterminated quote",
                format!("{header}\n\"open{}\n", ",x".repeat(width)),
            ),
        ] {
            let path = write(&f.path("bad.csv"), text.as_bytes());
            let expect = if what == "unterminated quote" {
                Expect::Any
            } else {
                Expect::Err
            };
            f.case(what, expect, || read(&path));
        }
        // The same as TSV.
        let tsv = valid
            .replace(',', "\t")
            .replace("\"dogs\t too\"", "dogs too");
        let path = write(&f.path("good.tsv"), tsv.as_bytes());
        read(&path).unwrap();
        for _ in 0..10 {
            let (how, bytes) = f.mutated(tsv.as_bytes());
            let path = write(&f.path("mutated.tsv"), &bytes);
            f.case(how, Expect::Any, || read(&path));
        }
    }
    f.finish(150);
}

// JSON lines.

const JSONL: &str = "{\"text\": \"the cat sat\", \"label\": \"animal\"}\n\
                     {\"text\": \"a red car\", \"label\": \"vehicle\"}\n\
                     \n\
                     {\"text\": \"an owl\", \"label\": 3}\n\
                     {\"text\": \"a bus\", \"label\": true}\n\
                     {\"text\": \"dogs\", \"label\": \"animal\", \"extra\": [1, 2]}\n";

#[test]
fn jsonl_files_never_panic() {
    let mut f = Fuzz::new("jsonl", 0x150);
    let columns = TextColumns::default();
    let read = |path: &Path| read_text_jsonl(path, &columns);
    let path = write(&f.path("good.jsonl"), JSONL.as_bytes());
    assert_eq!(read(&path).unwrap().num_examples(), 5);
    let lines: Vec<&str> = JSONL.lines().collect();
    for _ in 0..40 {
        let (how, bytes) = f.mutated(JSONL.as_bytes());
        let path = write(&f.path("mutated.jsonl"), &bytes);
        f.case(how, Expect::Any, || read(&path));
    }
    // A line cut inside its object can never parse.
    for _ in 0..25 {
        let mut broken: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
        let candidates: Vec<usize> = (0..lines.len()).filter(|&i| !lines[i].is_empty()).collect();
        let i = candidates[f.rng.random_range(0..candidates.len())];
        broken[i].truncate(f.rng.random_range(1..lines[i].len()));
        let path = write(
            &f.path("broken.jsonl"),
            (broken.join("\n") + "\n").as_bytes(),
        );
        f.case("broken line", Expect::Err, || read(&path));
    }
    // Wrong types, in place of one line.
    for bad in [
        "{\"text\": 5, \"label\": \"a\"}",
        "{\"text\": null, \"label\": \"a\"}",
        "{\"text\": \"t\", \"label\": [1]}",
        "{\"text\": \"t\", \"label\": {\"x\": 1}}",
        "{\"text\": \"t\", \"label\": null}",
        "{\"text\": \"t\"}",
        "{\"label\": \"a\"}",
        "[\"t\", \"a\"]",
        "\"text\"",
        "42",
        "{\"text\": \"t\", \"label\": \"a\"} trailing",
        "{\"text\": \"t\", \"label\": 1e999}",
    ] {
        let at = f.rng.random_range(0..lines.len());
        let mut changed: Vec<&str> = lines.clone();
        changed[at] = bad;
        let path = write(
            &f.path("typed.jsonl"),
            (changed.join("\n") + "\n").as_bytes(),
        );
        f.case(bad, Expect::Err, || read(&path));
    }
    for _ in 0..15 {
        let bytes = f.non_utf8(JSONL, 0);
        let path = write(&f.path("non-utf8.jsonl"), &bytes);
        f.case("non-UTF-8", Expect::Err, || read(&path));
    }
    for (what, text) in [("empty", ""), ("blank lines", "\n  \n\t\n")] {
        let path = write(&f.path("empty.jsonl"), text.as_bytes());
        f.case(what, Expect::Err, || read(&path));
    }
    f.finish(90);
}

// WordNet data files.

// The licence header's lines start with two spaces.
const DATA_NOUN: &str = concat!(
    "  1 This software and database is being provided to you, the LICENSEE\n",
    "  2 by Princeton University under the following license.\n",
    "00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which is perceived; \"an entity\"\n",
    "00002137 05 n 02 abstraction 0 abstract_entity 0 010 | a general concept\n",
    "00002452 05 n 01 thing 0 002 | a separate and self-contained entity\n",
    "00002684 17 n 02 object 0 physical_object 0 039 | a tangible and visible entity\n",
);
const DATA_VERB: &str = concat!(
    "  1 This software and database is being provided to you\n",
    "00001740 29 v 04 breathe 0 take_a_breath 0 | draw air into, and expel out of, the lungs\n",
    "00002325 29 v 01 respire 1 002 | undergo the biomedical process of respiration\n",
    "00002573 38 v 01 run 0 001 | move fast by using one's feet; \"Don't run!\"\n",
);

#[test]
fn wordnet_files_never_panic() {
    let mut f = Fuzz::new("wordnet", 0x3047);
    let folder = |f: &Fuzz, noun: &[u8], verb: Option<&[u8]>| -> PathBuf {
        let dir = f.path("wordnet");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("data.noun"), noun).unwrap();
        if let Some(verb) = verb {
            std::fs::write(dir.join("data.verb"), verb).unwrap();
        }
        dir
    };
    let good = folder(&f, DATA_NOUN.as_bytes(), Some(DATA_VERB.as_bytes()));
    assert_eq!(read_wordnet(&good).unwrap().num_examples(), 7);
    for _ in 0..40 {
        let (how, bytes) = f.mutated(DATA_NOUN.as_bytes());
        let dir = folder(&f, &bytes, Some(DATA_VERB.as_bytes()));
        f.case(how, Expect::Any, || read_wordnet(&dir));
        let (how, bytes) = f.mutated(DATA_VERB.as_bytes());
        let dir = folder(&f, DATA_NOUN.as_bytes(), Some(&bytes));
        f.case(how, Expect::Any, || read_wordnet(&dir));
    }
    for bad in [
        "00001740 45 n 01 entity 0 | beyond the last lexicographer file",
        "00001740 99999999999999999999999 n 01 entity 0 | huge file number",
        "00001740 -1 n 01 entity 0 | negative",
        "00001740 noun n 01 entity 0 | not a number",
        "00001740 03 n 01 entity 0 no gloss separator",
        "00001740",
    ] {
        let text = format!("{DATA_NOUN}{bad}\n");
        let dir = folder(&f, text.as_bytes(), Some(DATA_VERB.as_bytes()));
        f.case(bad, Expect::Err, || read_wordnet(&dir));
    }
    for _ in 0..10 {
        let bytes = f.non_utf8(DATA_VERB, 0);
        let dir = folder(&f, DATA_NOUN.as_bytes(), Some(&bytes));
        f.case("non-UTF-8", Expect::Err, || read_wordnet(&dir));
    }
    let dir = folder(&f, DATA_NOUN.as_bytes(), None);
    f.case("no data.verb", Expect::Err, || read_wordnet(&dir));
    f.finish(90);
}

// YAML configurations.

const CONFIG: &str = "seed: 7\nmodel:\n  name: tiny-bert\n  max_length: 16\nlora:\n  rank: 2\n  \
                      alpha: 4.0\nmeta_learning:\n  method: maml\n  meta_batch_size: 2\n  \
                      num_iterations: 10\n  inner:\n    steps: 1\n    lr: 0.5\n  outer:\n    \
                      lr: 0.001\ndata:\n  source: synthetic\n  n_way: 3\n  k_shot: 2\n  \
                      n_query: 2\nevaluation:\n  episodes: 5\n  eval_every: 5\n";

/// `CONFIG` with `key: value` set in `section` (the section's existing key replaced,
/// or the pair added to it).
fn config_with(section: &str, key: &str, value: &str) -> String {
    let mut out = Vec::new();
    let mut in_section = false;
    let mut done = false;
    for line in CONFIG.lines() {
        if !line.starts_with(' ') {
            if in_section && !done {
                out.push(format!("  {key}: {value}"));
                done = true;
            }
            in_section = line == format!("{section}:");
        }
        if in_section && line.trim_start().starts_with(&format!("{key}:")) && !done {
            out.push(format!("  {key}: {value}"));
            done = true;
            continue;
        }
        out.push(line.to_string());
    }
    if !done {
        if !in_section {
            out.push(format!("{section}:"));
        }
        out.push(format!("  {key}: {value}"));
    }
    out.join("\n") + "\n"
}

#[test]
fn yaml_configs_never_panic() {
    let mut f = Fuzz::new("yaml", 0x9a31);
    Config::from_yaml_str(CONFIG).unwrap();
    let tokenizer = WordHashTokenizer::tiny(16);
    // A configuration that validates must also make an episode without panicking.
    let parse_and_sample = |text: &str| -> melora::Result<()> {
        let config = Config::from_yaml_str(text)?;
        let d = &config.data;
        let small =
            d.n_way.saturating_mul(d.k_shot.saturating_add(d.n_query)) <= 200 && d.image_size <= 64;
        if d.source == DataSource::Synthetic && small {
            episode_source(d, config.seed, Split::Train, &tokenizer, &Device::Cpu)?.episode(0)?;
        }
        Ok(())
    };
    for _ in 0..60 {
        let (how, bytes) = f.mutated(CONFIG.as_bytes());
        let text = String::from_utf8_lossy(&bytes).into_owned();
        f.case(how, Expect::Any, || parse_and_sample(&text));
    }
    let max = usize::MAX.to_string();
    let half = (usize::MAX / 2 + 1).to_string();
    let huge = "99999999999999999999999999".to_string();
    let mut bad: Vec<(&str, &str, String)> = Vec::new();
    for key in ["n_way", "k_shot", "n_query", "image_size"] {
        for value in [
            &max,
            &huge,
            &"-1".to_string(),
            &"1e400".to_string(),
            &"five".into(),
        ] {
            bad.push(("data", key, value.clone()));
        }
    }
    bad.extend([
        ("data", "k_shot", half.clone()),
        ("data", "n_way", (1usize << 40).to_string()),
        ("data", "n_way", "[1, 2]".into()),
        ("data", "n_way", "{a: 1}".into()),
        ("data", "n_way", "0".into()),
        ("data", "train_fraction", ".nan".into()),
        ("data", "train_fraction", "1e400".into()),
        ("data", "source", "floppy".into()),
        ("meta_learning", "num_iterations", max.clone()),
        ("meta_learning", "num_iterations", half.clone()),
        ("meta_learning", "meta_batch_size", max.clone()),
        ("meta_learning", "num_iterations", "ten".into()),
        ("meta_learning", "inner", "3".into()),
        ("lora", "rank", "-4".into()),
        ("lora", "rank", huge.clone()),
        ("lora", "alpha", ".inf".into()),
        ("model", "max_length", "0".into()),
        ("evaluation", "episodes", "0".into()),
        ("evaluation", "eval_every", huge.clone()),
        (
            "memory_optimization",
            "loss_scaling",
            "{initial_scale: 0}".into(),
        ),
        (
            "memory_optimization",
            "loss_scaling",
            "{initial_scale: -1}".into(),
        ),
        (
            "memory_optimization",
            "loss_scaling",
            "{growth_interval: 0}".into(),
        ),
        ("seed", "x", "1".into()),
    ]);
    for (section, key, value) in &bad {
        let text = config_with(section, key, value);
        f.case(&format!("{section}.{key}: {value}"), Expect::Err, || {
            parse_and_sample(&text)
        });
    }
    // Deep nesting (a recursive parser's stack). serde_norway's time grows with the
    // square of the depth (about 1 s at 20 000), so the depth stays moderate.
    let deep = format!("seed: {}{}\n", "[".repeat(5_000), "]".repeat(5_000));
    f.case("deeply nested", Expect::Err, || parse_and_sample(&deep));
    let deep = format!("data: {}\n", "{a: ".repeat(5_000));
    f.case("deeply nested mapping", Expect::Err, || {
        parse_and_sample(&deep)
    });
    for text in [
        "- 1\n- 2\n",
        "seed: 1\n---\nseed: 2\n",
        "seed: [\n",
        "data: {n_way: 3\n",
        "&a [*a]\n",
        "seed: !!binary aGVsbG8=\n",
        "unknown_section: 1\n",
        "data:\n  n_way: 3\n  n_way: 4\n",
    ] {
        f.case(text, Expect::Err, || parse_and_sample(text));
    }
    for _ in 0..20 {
        let cut = f.truncated(CONFIG.as_bytes());
        let text = String::from_utf8(cut).unwrap();
        f.case("truncated", Expect::Any, || parse_and_sample(&text));
    }
    // From files: non-UTF-8 bytes are an error naming the file.
    for _ in 0..10 {
        let bytes = f.non_utf8(CONFIG, 0);
        let path = write(&f.path("config.yml"), &bytes);
        f.case("non-UTF-8 file", Expect::Err, || Config::from_file(&path));
    }
    f.finish(130);
}

// Checkpoint folders.

fn checkpoint_params() -> ParamSet {
    let t = |v: &[f32], shape: (usize, usize)| Tensor::from_slice(v, shape, &Device::Cpu).unwrap();
    ParamSet::from_pairs([
        (
            "layer.lora_A.weight",
            t(&[0.1, 0.2, 0.3, 0.4, 0.5, 0.6], (2, 3)),
        ),
        ("layer.lora_B.weight", t(&[0.0, -0.1, 0.2, 0.0], (2, 2))),
        ("head.weight", t(&[1.0, -1.0], (1, 2))),
    ])
    .unwrap()
}

/// A checkpoint of 4 iterations with AdamW moments and a loss scaler, written to
/// `dir`; returns its files' bytes.
fn write_checkpoint(dir: &Path) -> [(&'static str, Vec<u8>); 3] {
    let mut optimizer = Optimizer::new(OptimizerKind::adamw(0.01));
    let mut params = checkpoint_params();
    for _ in 0..3 {
        params = optimizer.step(&params, &params, 0.1).unwrap();
    }
    let mut scaler = LossScaler::new(4096.0, 3).unwrap();
    scaler.record_good_step();
    scaler.record_overflow("a test").unwrap();
    let state = CheckpointState {
        iteration: 4,
        optimizer_steps: 3,
        best_val_score: Some(0.75),
        validations_since_best: 1,
        model: "tiny-bert".into(),
        lora_rank: 2,
        n_way: 2,
        config: CONFIG.into(),
        loss_scaler: Some(scaler),
        mlflow_run_id: None,
    };
    save_checkpoint(dir, &params, &optimizer, &state).unwrap();
    ["state.json", "params.safetensors", "optimizer.safetensors"]
        .map(|name| (name, std::fs::read(dir.join(name)).unwrap()))
}

/// A copy of the checkpoint `files` in a new folder, with `file` replaced by `bytes`
/// (`None`: removed).
fn checkpoint_with(
    f: &Fuzz,
    files: &[(&'static str, Vec<u8>)],
    file: &str,
    bytes: Option<&[u8]>,
) -> PathBuf {
    let dir = f.path("checkpoint");
    std::fs::create_dir_all(&dir).unwrap();
    for (name, original) in files {
        if *name == file {
            if let Some(bytes) = bytes {
                std::fs::write(dir.join(name), bytes).unwrap();
            }
        } else {
            std::fs::write(dir.join(name), original).unwrap();
        }
    }
    dir
}

/// `state` (JSON) with `field` (`a` or `a.b`) set to `value`.
fn state_with(state: &[u8], field: &str, value: serde_json::Value) -> Vec<u8> {
    let mut json: serde_json::Value = serde_json::from_slice(state).unwrap();
    match field.split_once('.') {
        Some((outer, inner)) => json[outer][inner] = value,
        None => json[field] = value,
    }
    serde_json::to_vec_pretty(&json).unwrap()
}

/// A safetensors file: `header` (JSON) after its little-endian length, then `data`.
fn safetensors_with_header(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

#[test]
fn checkpoint_folders_never_panic() {
    let mut f = Fuzz::new("checkpoint", 0xc4ec);
    let template = checkpoint_params();
    let good = f.path("good");
    let files = write_checkpoint(&good);
    let loaded = load_checkpoint(&good, &template).unwrap();
    assert_eq!(loaded.state.iteration, 4);
    assert!(loaded.moments.is_some() && loaded.state.loss_scaler.is_some());
    let load = |dir: &Path| -> melora::Result<()> {
        read_checkpoint_state(dir)?;
        load_checkpoint(dir, &template).map(|_| ())
    };
    for (name, bytes) in &files {
        // A truncated state.json is never whole JSON; a truncated safetensors file
        // never matches its header.
        for _ in 0..25 {
            let cut = f.truncated(bytes);
            let dir = checkpoint_with(&f, &files, name, Some(&cut));
            f.case(&format!("truncated {name}"), Expect::Err, || load(&dir));
        }
        for _ in 0..30 {
            let (how, mutated) = f.mutated(bytes);
            let dir = checkpoint_with(&f, &files, name, Some(&mutated));
            f.case(&format!("{how} {name}"), Expect::Any, || load(&dir));
        }
    }
    let state = &files[0].1;
    for (field, value) in [
        ("iteration", serde_json::json!(-1)),
        ("iteration", serde_json::json!(1e30)),
        ("iteration", serde_json::json!("four")),
        ("iteration", serde_json::json!(0)),
        ("optimizer_steps", serde_json::json!(u64::MAX)),
        ("optimizer_steps", serde_json::json!(5)),
        ("validations_since_best", serde_json::json!(u64::MAX)),
        ("best_val_score", serde_json::json!("high")),
        ("lora_rank", serde_json::json!(-2)),
        ("n_way", serde_json::json!([2])),
        ("config", serde_json::json!(7)),
        ("loss_scaler", serde_json::json!(1024.0)),
        ("loss_scaler.scale", serde_json::json!(0.0)),
        ("loss_scaler.scale", serde_json::json!(-4096.0)),
        ("loss_scaler.scale", serde_json::json!(1e-300)),
        ("loss_scaler.scale", serde_json::Value::Null),
        ("loss_scaler.growth_interval", serde_json::json!(0)),
        ("loss_scaler.good_steps", serde_json::json!(u64::MAX)),
        ("loss_scaler.skipped_steps", serde_json::json!(u64::MAX)),
    ] {
        let crafted = state_with(state, field, value.clone());
        let dir = checkpoint_with(&f, &files, "state.json", Some(&crafted));
        f.case(
            &format!("state.json {field} = {value}"),
            Expect::Err,
            || load(&dir),
        );
    }
    for raw in [
        "{\"iteration\": 4}".as_bytes(),
        b"[]",
        b"null",
        b"",
        b"{\"iteration\": 99999999999999999999999999999}",
        format!("{{\"config\": {}", "[".repeat(100_000)).as_bytes(),
    ] {
        let dir = checkpoint_with(&f, &files, "state.json", Some(raw));
        f.case("state.json not a state", Expect::Err, || load(&dir));
    }
    // Safetensors headers claiming huge shapes, lengths or offsets.
    let a_shape = "\"layer.lora_A.weight\":{\"dtype\":\"F32\",\"shape\":";
    for header in [
        format!("{{{a_shape}[4294967296,4294967296],\"data_offsets\":[0,24]}}}}"),
        format!("{{{a_shape}[18446744073709551615,2],\"data_offsets\":[0,24]}}}}"),
        format!("{{{a_shape}[2,3],\"data_offsets\":[0,18446744073709551615]}}}}"),
        format!("{{{a_shape}[2,3],\"data_offsets\":[18446744073709551600,24]}}}}"),
        format!("{{{a_shape}[2,3],\"data_offsets\":[24,0]}}}}"),
        format!("{{{a_shape}[2,3],\"data_offsets\":[0,24]}},\"__metadata__\":{{\"melora.order\":\"[\\\"x\\\"]\"}}}}"),
        "{\"layer.lora_A.weight\":{\"dtype\":\"Q9\",\"shape\":[2,3],\"data_offsets\":[0,24]}}".into(),
        "not json at all".into(),
    ] {
        let bytes = safetensors_with_header(&header, &[0u8; 24]);
        let dir = checkpoint_with(&f, &files, "params.safetensors", Some(&bytes));
        f.case("crafted safetensors header", Expect::Err, || load(&dir));
    }
    let mut huge_length = u64::MAX.to_le_bytes().to_vec();
    huge_length.extend_from_slice(b"{}");
    let dir = checkpoint_with(&f, &files, "optimizer.safetensors", Some(&huge_length));
    f.case("safetensors header length u64::MAX", Expect::Err, || {
        load(&dir)
    });
    for name in ["state.json", "params.safetensors"] {
        let dir = checkpoint_with(&f, &files, name, None);
        f.case(&format!("no {name}"), Expect::Err, || load(&dir));
    }
    // Another model's parameters, or optimiser moments of other shapes.
    let other = ParamSet::from_pairs([(
        "head.weight",
        Tensor::zeros((1, 2), candle_core::DType::F32, &Device::Cpu).unwrap(),
    )])
    .unwrap();
    let dir = checkpoint_with(&f, &files, "params.safetensors", None);
    other.save(&dir.join("params.safetensors")).unwrap();
    f.case("params of another model", Expect::Err, || load(&dir));
    let dir = checkpoint_with(&f, &files, "optimizer.safetensors", None);
    other.save(&dir.join("optimizer.safetensors")).unwrap();
    f.case("moments missing", Expect::Err, || load(&dir));
    f.finish(190);
}
