//! PEFT itself reads melora's exported adapters: an adapter of all-MiniLM-L6-v2
//! (LoRA on query/value with non-zero updates, and the classifier head as PEFT's
//! `modules_to_save`) is written by `save_model_adapter`, loaded with
//! `PeftModel.from_pretrained` on the same base model (`scripts/peft_logits.py`), and
//! its logits must equal melora's to 1e-4 (f32).
//!
//! Needs the model (`scripts/fetch-minilm.sh`, or `MELORA_MINILM`) and a Python with
//! torch, transformers and peft (`MELORA_PYTHON`, default `python3`):
//! `MELORA_PYTHON=/path/to/venv/bin/python cargo test --release --test peft_export -- --ignored --nocapture`.

use std::process::Command;

use candle_core::{DType, Device, Tensor};
use melora::data::TextTokenizer;
use melora::models::adapter_files::save_model_adapter;
use melora::models::load::from_directory;
use melora::models::{LoraSettings, HEAD_WEIGHT};
use melora::nn::{LoraInit, LoraSpec, Mode};

mod common;

#[test]
#[ignore = "needs all-MiniLM-L6-v2 and Python with torch, transformers and peft"]
fn peft_loads_an_exported_adapter_with_the_same_logits() {
    melora::init();
    let dir = common::minilm_dir();
    assert!(
        dir.join("model.safetensors").exists(),
        "no model in {}: run scripts/fetch-minilm.sh first",
        dir.display()
    );
    let classes = 5;
    let lora = LoraSettings {
        spec: LoraSpec {
            rank: 8,
            alpha: 16.0,
            dropout: 0.0,
        },
        target_modules: None,
        // Normal A and B: every update is non-zero, unlike PEFT's zero B.
        init: LoraInit::Normal { seed: 3, std: 0.05 },
    };
    let model = from_directory(&dir, DType::F32, Some(lora), classes).unwrap();
    let mut params = model.init_params(3).unwrap();
    let head = params.require(HEAD_WEIGHT).unwrap().dims().to_vec();
    params.set(
        HEAD_WEIGHT,
        (Tensor::randn(0f32, 1.0, head.as_slice(), &Device::Cpu).unwrap() * 0.5).unwrap(),
    );
    let tokenizer = TextTokenizer::from_file(&dir.join("tokenizer.json"), 32).unwrap();
    let texts = [
        "a small domesticated carnivorous mammal",
        "the act of moving something from one place to another",
        "a building where people live",
    ];
    let batch = tokenizer.batch(&texts, &[0, 1, 2], &Device::Cpu).unwrap();
    let ours = model
        .logits(&params, &batch, Mode::Eval)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();

    let work = tempfile::tempdir().unwrap();
    let adapter = work.path().join("adapter");
    std::fs::create_dir_all(&adapter).unwrap();
    save_model_adapter(
        &adapter,
        model.as_ref(),
        &params,
        Some(&dir.display().to_string()),
    )
    .unwrap();
    let tokens = batch.tokens().unwrap();
    let inputs = serde_json::json!({
        "input_ids": tokens.input_ids.to_vec2::<u32>().unwrap(),
        "attention_mask": tokens.attention_mask.to_vec2::<u32>().unwrap(),
        "classes": classes,
    });
    let inputs_path = work.path().join("inputs.json");
    std::fs::write(&inputs_path, inputs.to_string()).unwrap();
    let python = std::env::var("MELORA_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/peft_logits.py");
    let output = Command::new(&python)
        .arg(&script)
        .arg(&dir)
        .arg(&adapter)
        .arg(&inputs_path)
        .output()
        .expect("python runs");
    assert!(
        output.status.success(),
        "{python} {}: {}",
        script.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let theirs: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let mut worst = 0f32;
    for (row, ours) in theirs["logits"].as_array().unwrap().iter().zip(&ours) {
        for (t, o) in row.as_array().unwrap().iter().zip(ours) {
            worst = worst.max((t.as_f64().unwrap() as f32 - o).abs());
        }
    }
    let scale = ours.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
    println!("PEFT vs melora logits: max |Δ| = {worst:.2e} (largest logit {scale:.3})");
    assert!(worst <= 1e-4, "logits differ by {worst}");
}
