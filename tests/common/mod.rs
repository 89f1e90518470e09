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
