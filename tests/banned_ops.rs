//! Keeps out of the source tree the candle operations that silently break
//! meta-learning (see `DESIGN.md`, "candle, and its traps"):
//! - `softmax_last_dim` and the fused `layer_norm` / `rms_norm` (and so candle-nn's
//!   `LayerNorm` / `RmsNorm` modules) return no gradient;
//! - `gather`, and so candle-nn's `cross_entropy` / `nll`, fail at second order;
//! - `max_pool2d`'s gradient is scaled by 1/k²;
//! - `gelu` / `gelu_erf` back-propagate with rounded constants (not exact in f64).
//!
//! `melora::tensor::ops` has second-order-safe replacements for all of them.

use std::path::Path;

mod common;

use common::rust_files;

/// (pattern, why it is banned, what to use instead).
const BANNED: &[(&str, &str, &str)] = &[
    (
        "softmax_last_dim",
        "returns no gradient",
        "tensor::ops::softmax / masked_softmax",
    ),
    (
        "candle_nn::ops",
        "fused ops without (exact) gradients",
        "tensor::ops",
    ),
    (
        "candle_nn::LayerNorm",
        "fused layer norm returns no gradient",
        "ops::norm::layer_norm",
    ),
    (
        "candle_nn::RmsNorm",
        "fused RMS norm returns no gradient",
        "ops::norm::rms_norm",
    ),
    (
        "candle_nn::layer_norm",
        "fused layer norm returns no gradient",
        "ops::norm::layer_norm",
    ),
    (
        "candle_nn::rms_norm",
        "fused RMS norm returns no gradient",
        "ops::norm::rms_norm",
    ),
    (
        "candle_nn::loss",
        "cross_entropy/nll use gather, which fails at second order",
        "ops::cross_entropy",
    ),
    (
        ".gather(",
        "fails at second order",
        "one-hot products or index_select",
    ),
    (
        ".max_pool2d(",
        "gradient scaled by 1/k²",
        "a composite max-pool (reshape to windows, max)",
    ),
    (
        ".gelu(",
        "backward uses rounded constants",
        "ops::gelu_tanh",
    ),
    (
        ".gelu_erf(",
        "backward uses rounded constants",
        "ops::gelu_erf",
    ),
];

/// Lines of `source` (outside comments) that use a banned op, as "line: text — why".
fn violations(source: &str) -> Vec<String> {
    let mut found = Vec::new();
    for (number, line) in source.lines().enumerate() {
        let code = line.split("//").next().unwrap_or("");
        for (pattern, why, instead) in BANNED {
            if code.contains(pattern) {
                found.push(format!(
                    "line {}: `{}` uses `{pattern}` ({why}); use {instead}",
                    number + 1,
                    line.trim()
                ));
            }
        }
    }
    found
}

#[test]
fn no_source_file_uses_an_op_that_breaks_second_order() {
    let mut files = Vec::new();
    rust_files(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &mut files,
    );
    assert!(files.len() > 10, "found only {} source files", files.len());
    let mut report = Vec::new();
    for file in files {
        let source = std::fs::read_to_string(&file).expect("readable source file");
        for v in violations(&source) {
            report.push(format!("{}: {v}", file.display()));
        }
    }
    assert!(
        report.is_empty(),
        "banned candle ops in use:\n{}",
        report.join("\n")
    );
}

#[test]
fn the_scanner_finds_banned_calls_and_ignores_comments() {
    let source = "let p = candle_nn::ops::softmax_last_dim(&x)?;\n\
                  // candle's x.gather(...) is banned\n\
                  let y = x.gather(&idx, 1)?;\n\
                  let z = h.max_pool2d(2)?;";
    let found = violations(source);
    assert_eq!(found.len(), 4, "{found:#?}"); // two patterns on line 1, then lines 3 and 4
    assert!(found[0].starts_with("line 1"));
    assert!(found.iter().any(|f| f.starts_with("line 3")));
    assert!(!found.iter().any(|f| f.starts_with("line 2")));
}
