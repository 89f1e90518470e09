//! The real all-MiniLM-L6-v2 (installed by `scripts/fetch-minilm.sh`; not downloaded by
//! tests): loads by Hugging Face names, tokenises with its own `tokenizer.json`, and
//! its sentence embeddings (masked mean pooling, as sentence-transformers does) put
//! paraphrases closer than unrelated sentences.
//!
//! Run with `cargo test --release --test minilm -- --ignored --nocapture`, after
//! `scripts/fetch-minilm.sh` (or with `MELORA_MINILM=<model folder>`).

use candle_core::{DType, Device, Tensor};
use melora::data::TextTokenizer;
use melora::models::bert::{Bert, BertConfig};
use melora::models::{FewShotModel, Weights};
use melora::nn::Mode;
use melora::tensor::ParamSet;

mod common;

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (norm(a) * norm(b))
}

#[test]
#[ignore = "needs the MiniLM model: run scripts/fetch-minilm.sh, then --ignored"]
fn minilm_embeddings_rank_paraphrases_above_unrelated_sentences() {
    melora::init();
    let dir = common::minilm_dir();
    assert!(
        dir.join("model.safetensors").exists(),
        "no model in {}: run scripts/fetch-minilm.sh first",
        dir.display()
    );
    let config = BertConfig::from_file(&dir.join("config.json")).unwrap();
    let weights =
        Weights::from_safetensors(&dir.join("model.safetensors"), DType::F32, &Device::Cpu)
            .unwrap();
    let model = Bert::new(config, weights, None, 2).unwrap();
    let tokenizer = TextTokenizer::from_file(&dir.join("tokenizer.json"), 64).unwrap();
    let sentences = [
        "A man is playing a guitar.",
        "Someone is playing an instrument, a guitar.",
        "The stock market fell sharply today.",
        "Shares dropped steeply on the exchange this afternoon.",
        "A cat is sleeping on the sofa.",
    ];
    let batch = tokenizer.batch(&sentences, &[0; 5], &Device::Cpu).unwrap();
    // No trainable tensors: features do not use the head.
    let started = std::time::Instant::now();
    let features: Tensor = model
        .features(&ParamSet::new(), &batch, Mode::Eval)
        .unwrap();
    let elapsed = started.elapsed();
    let rows = features.to_vec2::<f32>().unwrap();
    assert_eq!(rows[0].len(), 384);
    let sim = |i: usize, j: usize| cosine(&rows[i], &rows[j]);
    println!(
        "embedded {} sentences in {:.1} ms",
        sentences.len(),
        elapsed.as_secs_f64() * 1e3
    );
    println!(
        "paraphrases:  guitar {:.3}, market {:.3}",
        sim(0, 1),
        sim(2, 3)
    );
    println!(
        "unrelated:    guitar/market {:.3}, guitar/cat {:.3}, market/cat {:.3}",
        sim(0, 2),
        sim(0, 4),
        sim(2, 4)
    );
    for (p, q) in [(0, 1), (2, 3)] {
        for other in 0..sentences.len() {
            if other != p && other != q {
                assert!(
                    sim(p, q) > sim(p, other) && sim(p, q) > sim(q, other),
                    "paraphrase pair ({p},{q}) must be closer than either is to {other}"
                );
            }
        }
    }
    assert!(
        sim(0, 1) > 0.6 && sim(2, 3) > 0.5,
        "paraphrases are clearly similar"
    );
}

/// The whole `melora full` pipeline of `configs/wordnet-minilm.yml` on the real model
/// and WordNet, cut to 3 meta-iterations and 5 test episodes: every meta-learner of
/// the results table and every baseline trains (or pre-trains), is evaluated on
/// the same episodes, and lands in `results.json` and the report.
///
/// `cargo test --release --test minilm -- --ignored --nocapture full_pipeline`, after
/// `scripts/fetch-data.sh` and `scripts/fetch-minilm.sh`.
#[test]
#[ignore = "needs the MiniLM model and WordNet: run scripts/fetch-minilm.sh and scripts/fetch-data.sh, then --ignored"]
fn full_pipeline_of_the_wordnet_minilm_config_runs_every_method() {
    let dir = common::minilm_dir();
    assert!(
        dir.join("model.safetensors").exists(),
        "no model in {}: run scripts/fetch-minilm.sh first",
        dir.display()
    );
    assert!(
        std::path::Path::new("/usr/share/wordnet/data.noun").exists(),
        "no WordNet in /usr/share/wordnet: run scripts/fetch-data.sh first"
    );
    let shipped =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/wordnet-minilm.yml");
    let mut config = melora::config::Config::from_file(&shipped).unwrap();
    let out = tempfile::tempdir().unwrap();
    config.model.path = Some(dir);
    config.meta_learning.num_iterations = 3;
    config.evaluation.eval_every = 3;
    config.evaluation.val_episodes = 2;
    config.evaluation.episodes = 5;
    config.evaluation.finetune_steps = 2;
    config.comparison.finetune_lr_sweep = vec![0.001];
    config.comparison.pretrain.steps = Some(3);
    config.comparison.memory_inner_steps = vec![1];
    config.tracking.output_dir = out.path().join("runs");
    config.tracking.tensorboard = false;
    let path = out.path().join("config.yml");
    std::fs::write(&path, config.to_yaml_string().unwrap()).unwrap();

    let started = std::time::Instant::now();
    let output = common::melora(&["full", "--config", path.to_str().unwrap()]);
    let stdout = common::text(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        common::text(&output.stderr)
    );
    println!("full pipeline: {:.0} s", started.elapsed().as_secs_f64());
    let experiment = config
        .tracking
        .output_dir
        .join(&config.tracking.experiment_name);
    let results = melora::train::load_results(&experiment).unwrap();
    let labels: Vec<&str> = results.methods.iter().map(|m| m.label.as_str()).collect();
    let mut expected = vec![results.main.clone()];
    expected.extend(
        config
            .comparison
            .baselines
            .iter()
            .map(ToString::to_string)
            .filter(|b| *b != results.main),
    );
    assert_eq!(labels, expected, "every configured method ran");
    for method in &results.methods {
        println!(
            "{:<24} {:.3} ± {:.3}",
            method.label, method.headline.mean, method.headline.half_width
        );
        assert_eq!(method.per_episode.len(), 5, "{}", method.label);
        assert!(
            (0.0..=1.0).contains(&method.headline.mean),
            "{}",
            method.label
        );
    }
    assert_eq!(results.comparisons.len(), results.methods.len() - 1);
    let splits = results
        .splits
        .as_ref()
        .expect("the class split is recorded");
    assert_eq!(
        splits.train.len() + splits.val.len() + splits.test.len(),
        41
    );
    assert!(experiment.join("report.md").exists());
}
