//! Helpers shared by the integration tests (each test crate uses some of them).
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output};

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
