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
