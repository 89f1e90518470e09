//! `melora check` on the built binary: the binary itself must turn on second-order
//! gradients (it does not inherit cargo's test environment for that), run every op's
//! derivative check and report measured memory.

use std::process::Command;

#[test]
fn check_passes_without_the_environment_variable() {
    let output = Command::new(env!("CARGO_BIN_EXE_melora"))
        .arg("check")
        .env_remove("CANDLE_GRAD_DO_NOT_DETACH")
        .output()
        .expect("melora runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("0 failed"), "{stdout}");
    assert!(
        stdout.contains("second-order gradients: enabled"),
        "{stdout}"
    );
    assert!(stdout.contains("counting allocator installed"), "{stdout}");
    for op in [
        "layer_norm",
        "masked_softmax",
        "cross_entropy",
        "gelu_erf",
        "lora (Conv1D layout)",
    ] {
        assert!(stdout.contains(op), "{op} missing from:\n{stdout}");
    }
}

#[test]
fn check_json_is_machine_readable() {
    let output = Command::new(env!("CARGO_BIN_EXE_melora"))
        .args(["check", "--json"])
        .output()
        .expect("melora runs");
    assert!(output.status.success());
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).expect("valid JSON");
    assert_eq!(json["failed"], 0);
    assert_eq!(json["device"], "cpu");
    assert!(json["ops"].as_array().is_some_and(|ops| ops.len() >= 20));
    assert!(json["memory"]["heap"]["peak_above_baseline_bytes"]
        .as_u64()
        .is_some_and(|b| b > 0));
}

/// `check --device cuda` on a CPU-only build: a configuration error (exit 2) that
/// says how to build with CUDA, not a crash.
#[test]
fn check_on_a_gpu_needs_the_cuda_build() {
    if cfg!(feature = "cuda") {
        return;
    }
    let output = Command::new(env!("CARGO_BIN_EXE_melora"))
        .args(["check", "--device", "cuda:0"])
        .output()
        .expect("melora runs");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--features cuda"), "{stderr}");
}
