//! Test access to the reference fixtures in `../shared/fixtures` (see its README):
//! float64 tensors computed independently with PyTorch, Hugging Face and PEFT.
//!
//! The folder is found through `MELORA_FIXTURES` (default: `../shared/fixtures` beside
//! the checkout). Where it is absent, a test prints that it skipped, unless
//! `MELORA_REQUIRE_SHARED=1` (set by CI), under which a missing fixture fails.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

/// One fixture: its JSON description and its tensors.
pub(crate) struct Fixture {
    pub json: serde_json::Value,
    pub tensors: HashMap<String, Tensor>,
}

pub(crate) fn fixtures_dir() -> PathBuf {
    match std::env::var_os("MELORA_FIXTURES") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures"),
    }
}

pub(crate) fn shared_required() -> bool {
    std::env::var("MELORA_REQUIRE_SHARED").is_ok_and(|v| v == "1")
}

/// The device fixture tests run on: `MELORA_TEST_DEVICE` (`cpu`, `cuda` or `cuda:N`;
/// the CPU when unset), so that the test binary of a CUDA build checks the
/// reference values on a GPU (`scripts/gpu-check.sh`). A model built from a
/// fixture's tensors is made on their device.
pub(crate) fn test_device() -> Device {
    crate::run::build::open_device(test_device_setting())
        .unwrap_or_else(|e| panic!("MELORA_TEST_DEVICE: {e}"))
}

/// [`test_device`] as a configuration's `device` setting.
pub(crate) fn test_device_setting() -> crate::config::ComputeDevice {
    match std::env::var("MELORA_TEST_DEVICE") {
        Ok(name) => name
            .parse()
            .unwrap_or_else(|e| panic!("MELORA_TEST_DEVICE: {e}")),
        Err(_) => crate::config::ComputeDevice::Cpu,
    }
}

/// Loads fixture `name` (`<name>.json` + `<name>.safetensors`), or `None` with a
/// message when the fixtures are not available and not required.
pub(crate) fn load(name: &str) -> Option<Fixture> {
    let dir = fixtures_dir();
    let (json_path, tensors_path) = (
        dir.join(format!("{name}.json")),
        dir.join(format!("{name}.safetensors")),
    );
    if !json_path.exists() || !tensors_path.exists() {
        assert!(
            !shared_required(),
            "fixture `{name}` not found in {} (MELORA_REQUIRE_SHARED=1)",
            dir.display()
        );
        eprintln!("skipped: fixture `{name}` not found in {}", dir.display());
        return None;
    }
    Some(load_files(&json_path, &tensors_path))
}

/// Loads a fixture from its two files, whatever their names: what a fixture is
/// comes from its JSON, never from its file name.
pub(crate) fn load_files(json_path: &Path, tensors_path: &Path) -> Fixture {
    let text = std::fs::read_to_string(json_path)
        .unwrap_or_else(|e| panic!("{}: {e}", json_path.display()));
    let json =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", json_path.display()));
    let tensors = candle_core::safetensors::load(tensors_path, &test_device())
        .unwrap_or_else(|e| panic!("{}: {e}", tensors_path.display()));
    Fixture { json, tensors }
}

impl Fixture {
    /// The tensor `name`, which the fixture must hold.
    pub fn tensor(&self, name: &str) -> &Tensor {
        self.tensors
            .get(name)
            .unwrap_or_else(|| panic!("fixture has no tensor `{name}`"))
    }

    /// The JSON value at a `/`-separated pointer such as `/lora/r`.
    pub fn value(&self, pointer: &str) -> &serde_json::Value {
        self.json
            .pointer(pointer)
            .unwrap_or_else(|| panic!("fixture JSON has no `{pointer}`"))
    }
}

/// Largest |actual − expected| relative to the largest |expected| (norm-wise
/// relative error, meaningful when some entries are near zero).
pub(crate) fn relative_error(actual: &Tensor, expected: &Tensor) -> f64 {
    assert_eq!(actual.dims(), expected.dims(), "shapes differ");
    let flat = |t: &Tensor| {
        t.to_dtype(candle_core::DType::F64)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f64>())
            .expect("readable tensor")
    };
    let (a, e) = (flat(actual), flat(expected));
    let scale = e.iter().fold(1e-300f64, |m, v| m.max(v.abs()));
    a.iter()
        .zip(&e)
        .fold(0f64, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

/// Panics unless `actual` matches `expected` within relative error `tolerance`.
pub(crate) fn assert_close(what: &str, actual: &Tensor, expected: &Tensor, tolerance: f64) {
    let error = relative_error(actual, expected);
    assert!(
        error <= tolerance,
        "{what}: relative error {error:.3e} > {tolerance:e}"
    );
}

/// Like [`assert_close`], but where the reference is float64 round-off of an exact
/// zero (every |x| < 1e-11, e.g. Conv4's bias gradients) compares absolutely.
pub(crate) fn assert_close_or_zero(what: &str, actual: &Tensor, expected: &Tensor, tolerance: f64) {
    let max_abs = |t: &Tensor| {
        t.to_dtype(candle_core::DType::F64)
            .and_then(|t| t.abs())
            .and_then(|t| t.max_all())
            .and_then(|t| t.to_scalar::<f64>())
            .expect("readable tensor")
    };
    if max_abs(expected) < 1e-11 {
        assert!(
            max_abs(actual) < 1e-11,
            "{what}: expected an exact zero, got max |x| = {:.3e}",
            max_abs(actual)
        );
    } else {
        assert_close(what, actual, expected, tolerance);
    }
}
