//! Keeps the CPU out of the code paths a GPU run takes: outside tests, a tensor is
//! made on the run's device (`run::build::device`) or on the device of the tensors
//! it is combined with (`x.device()`), never on `Device::Cpu`, except in the places
//! listed here, each with the reason it stays on the host. A run on `--device cuda`
//! would otherwise fail with a device mismatch only on a GPU, where CI cannot see it.

use std::path::Path;

mod common;

use common::rust_files;

/// (file under `src/`, why it makes tensors on the host).
const HOST_SIDE: &[(&str, &str)] = &[
    ("run/build.rs", "opens the configured device: `cpu` is the CPU"),
    (
        "models/load.rs",
        "`builtin_with_inputs` and `from_directory` are the CPU forms of `builtin_on` and `from_directory_on`",
    ),
    (
        "plan/measure.rs",
        "the planner makes its stand-in episodes on the host and moves them to the run's device",
    ),
    (
        "models/weights.rs",
        "an empty weight set has no device of its own",
    ),
    (
        "models/adapter_files.rs",
        "an empty adapter template has no device of its own",
    ),
    (
        "tensor/params.rs",
        "an empty parameter set has no device of its own",
    ),
    (
        "models/batch_norm.rs",
        "running statistics are averaged on the host and moved where they are used",
    ),
    (
        "tensor/ops/quantized.rs",
        "int8 matrices live on the host; the GPU path dequantizes and moves them",
    ),
    (
        "tensor/ops/recompute.rs",
        "the CPU kernel's own buffers (the CUDA kernel has its own)",
    ),
    (
        "tensor/ops/loss.rs",
        "one-hot rows are built on the host and moved to the labels' device",
    ),
    (
        "data/synthetic.rs",
        "synthetic tasks are drawn on the host; `OnDevice` moves them",
    ),
    (
        "tensor/gradcheck.rs",
        "finite-difference checks run in f64 on the CPU",
    ),
    (
        "tensor/second_order.rs",
        "the start-up probe of second-order support",
    ),
    (
        "bench/speed.rs",
        "the speed benchmark runs on the CPU beside PyTorch's CPU run",
    ),
    (
        "cli/bench_cmd.rs",
        "the data benchmark times decoding and batching on the host",
    ),
];

/// Test-only files (whole modules under `#[cfg(test)]`).
fn is_test_file(relative: &str) -> bool {
    let name = relative.rsplit('/').next().unwrap_or(relative);
    name == "tests.rs"
        || name.ends_with("_tests.rs")
        || name == "test_support.rs"
        || name == "test_models.rs"
}

/// Lines of `source` before its test module, outside comments, that name the CPU
/// device, as "line N: text".
fn cpu_lines(source: &str) -> Vec<String> {
    source
        .lines()
        .enumerate()
        .take_while(|(_, line)| line.trim() != "#[cfg(test)]")
        .filter(|(_, line)| {
            let code = line.split("//").next().unwrap_or("");
            // melora's own `ComputeDevice::Cpu` is the setting, not a tensor's device.
            code.replace("ComputeDevice::Cpu", "")
                .contains("Device::Cpu")
        })
        .map(|(number, line)| format!("line {}: {}", number + 1, line.trim()))
        .collect()
}

#[test]
fn run_code_makes_tensors_on_the_runs_device() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    assert!(files.len() > 10, "found only {} source files", files.len());
    let mut report = Vec::new();
    let mut allowed_and_used = Vec::new();
    for file in files {
        let relative = file
            .strip_prefix(&src)
            .expect("under src")
            .to_string_lossy()
            .replace('\\', "/");
        if is_test_file(&relative) {
            continue;
        }
        let found = cpu_lines(&std::fs::read_to_string(&file).expect("readable"));
        if found.is_empty() {
            continue;
        }
        if HOST_SIDE.iter().any(|(f, _)| *f == relative) {
            allowed_and_used.push(relative);
        } else {
            for line in found {
                report.push(format!("src/{relative}: {line}"));
            }
        }
    }
    assert!(
        report.is_empty(),
        "tensors made on the CPU in code a GPU run takes; make them on the run's device \
         (`run::build::device`) or on an input's (`x.device()`), or list the file in \
         tests/device_generic.rs with why it stays on the host:\n{}",
        report.join("\n")
    );
    // The list stays true: every file on it still makes host tensors.
    for (file, why) in HOST_SIDE {
        assert!(
            allowed_and_used.iter().any(|used| used == file),
            "src/{file} is listed as host-side ({why}) but no longer names Device::Cpu: \
             remove it from the list"
        );
    }
}

#[test]
fn the_scanner_skips_comments_and_test_modules() {
    let source = "let a = Tensor::zeros(1, F32, &Device::Cpu)?;\n\
                  // Device::Cpu in a comment\n\
                  let b = x.device();\n\
                  if device == ComputeDevice::Cpu {}\n\
                  #[cfg(test)]\n\
                  mod tests { let c = Device::Cpu; }";
    let found = cpu_lines(source);
    assert_eq!(
        found,
        ["line 1: let a = Tensor::zeros(1, F32, &Device::Cpu)?;"]
    );
    assert!(is_test_file("engine/checkpoint_tests.rs") && is_test_file("data/tests.rs"));
    assert!(!is_test_file("train/run.rs"));
}
