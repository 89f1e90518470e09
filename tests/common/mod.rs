//! Helpers shared by the integration tests (each test crate uses some of them).
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output};

/// Every `.rs` file under `dir`, recursively (for tests that scan the source tree).
pub fn rust_files(dir: &std::path::Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("readable source directory") {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Runs the `melora` binary with `args`, as a user would.
pub fn melora(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_melora"))
        .args(args)
        .output()
        .expect("the melora binary runs")
}

/// Output bytes as text (lossy).
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).to_string()
}

/// The all-MiniLM-L6-v2 folder (`MELORA_MINILM`, or where `scripts/fetch-minilm.sh`
/// puts it).
pub fn minilm_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("MELORA_MINILM") {
        return dir.into();
    }
    let cache = std::env::var_os("MELORA_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let base = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache")
                });
            base.join("melora")
        });
    cache.join("all-MiniLM-L6-v2")
}

/// The `metrics.jsonl` lines at `path` that parse as JSON objects, in file order;
/// a line a killed process left half-written (or no file yet) is skipped rather
/// than failing, so a test can read a run that is still going or was killed.
pub fn metrics_lines(path: &std::path::Path) -> Vec<serde_json::Map<String, serde_json::Value>> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

/// The `step` of a `metrics.jsonl` line.
pub fn step_of(line: &serde_json::Map<String, serde_json::Value>) -> u64 {
    line["step"].as_u64().expect("an integer step")
}

/// CRC-32C, written independently of melora's, to check TFRecord framing.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn masked_crc32c(data: &[u8]) -> u32 {
    crc32c(data).rotate_right(15).wrapping_add(0xa282_ead8)
}

fn read_varint(data: &[u8], pos: &mut usize) -> u64 {
    let (mut value, mut shift) = (0u64, 0);
    loop {
        let byte = data[*pos];
        *pos += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return value;
        }
        shift += 7;
    }
}

/// The steps of the scalar-summary events in every TensorBoard event file of
/// `dir`, in file-name then record order; every record's two CRCs are checked.
pub fn event_steps(dir: &std::path::Path) -> Vec<u64> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .contains("tfevents")
        })
        .collect();
    files.sort();
    let mut steps = Vec::new();
    for file in files {
        let bytes = std::fs::read(&file).unwrap();
        let mut pos = 0;
        while pos < bytes.len() {
            let len_bytes = &bytes[pos..pos + 8];
            let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
            let crc = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
            assert_eq!(crc(pos + 8), masked_crc32c(len_bytes), "{}", file.display());
            let data = &bytes[pos + 12..pos + 12 + len];
            assert_eq!(
                crc(pos + 12 + len),
                masked_crc32c(data),
                "{}",
                file.display()
            );
            pos += 16 + len;
            // tensorflow.Event: field 2 is the step (varint), field 5 the summary.
            let (mut at, mut step, mut summary) = (0, 0, false);
            while at < data.len() {
                let key = read_varint(data, &mut at);
                match key & 7 {
                    0 => {
                        let value = read_varint(data, &mut at);
                        if key >> 3 == 2 {
                            step = value;
                        }
                    }
                    1 => at += 8,
                    2 => {
                        let n = read_varint(data, &mut at) as usize;
                        summary |= key >> 3 == 5;
                        at += n;
                    }
                    5 => at += 4,
                    wire => panic!("wire type {wire} in {}", file.display()),
                }
            }
            if summary {
                steps.push(step);
            }
        }
    }
    steps
}

/// The MLflow runs of the experiment named `experiment` in the file store
/// `mlruns`: each run's folder and parsed `meta.yaml`.
pub fn mlflow_runs(
    mlruns: &std::path::Path,
    experiment: &str,
) -> Vec<(PathBuf, serde_norway::Value)> {
    let yaml = |path: &std::path::Path| -> Option<serde_norway::Value> {
        serde_norway::from_str(&std::fs::read_to_string(path).ok()?).ok()
    };
    let mut runs = Vec::new();
    for entry in std::fs::read_dir(mlruns).unwrap() {
        let dir = entry.unwrap().path();
        let Some(meta) = yaml(&dir.join("meta.yaml")) else {
            continue;
        };
        if meta["name"].as_str() != Some(experiment) {
            continue;
        }
        for run in std::fs::read_dir(&dir).unwrap() {
            let run = run.unwrap().path();
            if let Some(meta) = yaml(&run.join("meta.yaml")) {
                runs.push((run, meta));
            }
        }
    }
    runs.sort_by(|a, b| a.0.cmp(&b.0));
    runs
}

/// The steps recorded in an MLflow metric file (`<timestamp> <value> <step>` lines).
pub fn mlflow_steps(path: &std::path::Path) -> Vec<u64> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|line| line.rsplit(' ').next().unwrap().parse().unwrap())
        .collect()
}

/// Writes a BERT folder into `dir`: `config.json` and `model.safetensors` (f32,
/// deterministic values) with tiny-bert's sizes (width 64, 2 layers, FFN 128,
/// vocabulary 1000, 128 positions) and one tensor the model does not use (the
/// pooler).
pub fn write_tiny_bert_folder(dir: &std::path::Path) {
    std::fs::create_dir_all(dir).unwrap();
    let (h, ff, vocab, layers) = (64, 128, 1000, 2);
    std::fs::write(
        dir.join("config.json"),
        format!(
            "{{\"model_type\": \"bert\", \"vocab_size\": {vocab}, \"hidden_size\": {h}, \
                 \"num_hidden_layers\": {layers}, \"num_attention_heads\": 4, \
                 \"intermediate_size\": {ff}, \"max_position_embeddings\": 128}}"
        ),
    )
    .unwrap();
    let mut shapes: Vec<(String, Vec<usize>)> = vec![
        ("embeddings.word_embeddings.weight".into(), vec![vocab, h]),
        ("embeddings.position_embeddings.weight".into(), vec![128, h]),
        ("embeddings.token_type_embeddings.weight".into(), vec![2, h]),
        ("embeddings.LayerNorm.weight".into(), vec![h]),
        ("embeddings.LayerNorm.bias".into(), vec![h]),
        ("pooler.dense.weight".into(), vec![h, h]),
        ("pooler.dense.bias".into(), vec![h]),
    ];
    for l in 0..layers {
        let p = format!("encoder.layer.{l}");
        for (name, n_out, n_in) in [
            ("attention.self.query", h, h),
            ("attention.self.key", h, h),
            ("attention.self.value", h, h),
            ("attention.output.dense", h, h),
            ("intermediate.dense", ff, h),
            ("output.dense", h, ff),
        ] {
            shapes.push((format!("{p}.{name}.weight"), vec![n_out, n_in]));
            shapes.push((format!("{p}.{name}.bias"), vec![n_out]));
        }
        for norm in ["attention.output.LayerNorm", "output.LayerNorm"] {
            shapes.push((format!("{p}.{norm}.weight"), vec![h]));
            shapes.push((format!("{p}.{norm}.bias"), vec![h]));
        }
    }
    let tensors: std::collections::HashMap<String, candle_core::Tensor> = shapes
        .into_iter()
        .enumerate()
        .map(|(k, (name, shape))| {
            let n: usize = shape.iter().product();
            let values: Vec<f32> = (0..n).map(|i| 0.02 * ((i * 7 + k) as f32).sin()).collect();
            let t =
                candle_core::Tensor::from_vec(values, shape.as_slice(), &candle_core::Device::Cpu)
                    .unwrap();
            (name, t)
        })
        .collect();
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
}

/// Writes a tiny WordPiece `tokenizer.json` in BERT's layout to `path`: `[PAD]` 0,
/// `[UNK]` 1, `[CLS]` 2, `[SEP]` 3 and four words.
pub fn write_wordpiece_tokenizer(path: &std::path::Path) {
    let words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "the", "of", "or"];
    let vocab: serde_json::Map<String, serde_json::Value> = words
        .iter()
        .enumerate()
        .map(|(i, w)| (w.to_string(), i.into()))
        .collect();
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": {"type": "BertNormalizer", "clean_text": true,
            "handle_chinese_chars": true, "strip_accents": null, "lowercase": true},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": {"type": "BertProcessing", "sep": ["[SEP]", 3], "cls": ["[CLS]", 2]},
        "decoder": null,
        "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
            "max_input_chars_per_word": 100, "vocab": vocab}
    });
    std::fs::write(path, json.to_string()).unwrap();
}
