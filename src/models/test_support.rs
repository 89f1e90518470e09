//! Helpers for the model tests: random Hugging Face-named weights written to and read
//! back from a safetensors file (the path real checkpoints take), and a
//! finite-difference check of a model's loss in its trainable tensors.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use super::{FewShotModel, LoraSettings, Weights};
use crate::data::Batch;
use crate::nn::{LoraInit, LoraSpec, Mode};
use crate::tensor::gradcheck::{check_derivatives_with_step, random_tensor};
pub(crate) use crate::tensor::test_support::max_abs_diff;
use crate::tensor::{ops, ParamSet};

/// Random weights by name, built up by the tests.
#[derive(Default)]
pub(crate) struct RandomWeights {
    tensors: HashMap<String, Tensor>,
    seed: u64,
}

impl RandomWeights {
    /// A matrix or vector with entries 0.2·N(0, 1): small enough that a few layers
    /// stay well-conditioned.
    pub(crate) fn add(&mut self, name: &str, shape: &[usize]) {
        self.seed += 1;
        let t = (random_tensor(shape, self.seed, &Device::Cpu).unwrap() * 0.2).unwrap();
        self.tensors.insert(name.to_string(), t);
    }

    /// A norm's gain, 1 + 0.1·N(0, 1), near the identity as in trained models.
    pub(crate) fn add_gain(&mut self, name: &str, width: usize) {
        self.seed += 1;
        let t = ((random_tensor(&[width], self.seed, &Device::Cpu).unwrap() * 0.1).unwrap() + 1.0)
            .unwrap();
        self.tensors.insert(name.to_string(), t);
    }

    /// The tensor `name`, as a row-major matrix (a vector is one row), for reference
    /// computations written without tensors.
    pub(crate) fn matrix(&self, name: &str) -> Vec<Vec<f64>> {
        let t = &self.tensors[name];
        match t.rank() {
            1 => vec![t.to_vec1::<f64>().unwrap()],
            _ => t.to_vec2::<f64>().unwrap(),
        }
    }

    /// Drops a tensor (to test the missing-weight error).
    pub(crate) fn remove(&mut self, name: &str) {
        self.tensors.remove(name);
    }

    /// Writes the tensors to `dir/model.safetensors` and loads them back through
    /// [`Weights::from_safetensors`], as a downloaded checkpoint would be.
    pub(crate) fn save_and_load(&self, dir: &tempfile::TempDir) -> Weights {
        let path = dir.path().join("model.safetensors");
        candle_core::safetensors::save(&self.tensors, &path).unwrap();
        Weights::from_safetensors(&path, DType::F64, &Device::Cpu).unwrap()
    }
}

/// A batch of two right-padded sequences of length 5, the second with two padding
/// positions, whose padded ids are `pad_ids`.
pub(crate) fn padded_batch(pad_ids: [u32; 2]) -> Batch {
    let dev = &Device::Cpu;
    let ids = Tensor::new(
        &[[3u32, 7, 1, 9, 4], [5, 2, 8, pad_ids[0], pad_ids[1]]],
        dev,
    )
    .unwrap();
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dev).unwrap();
    let labels = Tensor::new(&[1u32, 2], dev).unwrap();
    Batch::from_tokens(ids, mask, None, labels).unwrap()
}

/// Checks the first and second derivatives of the cross-entropy of `model` on
/// [`padded_batch`] in the LoRA tensors `adapters` and the head's weight against
/// finite differences.
pub(crate) fn check_loss_derivatives(model: &dyn FewShotModel, adapters: &[&str]) {
    let names: Vec<&str> = adapters
        .iter()
        .copied()
        .chain([super::HEAD_WEIGHT])
        .collect();
    check_loss_derivatives_on(model, &names, &padded_batch([0, 0]), 1e-5, "");
}

/// Checks the first and second derivatives of the cross-entropy of `model` on
/// `batch` in the trainable tensors `names` (the others at their initial values)
/// against central differences of `step`; `what` names the model in failures.
pub(crate) fn check_loss_derivatives_on(
    model: &dyn FewShotModel,
    names: &[&str],
    batch: &Batch,
    step: f64,
    what: &str,
) {
    let init = model.init_params(3).unwrap();
    let inputs: Vec<Tensor> = names
        .iter()
        .map(|n| init.require(n).unwrap().clone())
        .collect();
    let errors = check_derivatives_with_step(&inputs, step, |xs| {
        let params = ParamSet::from_pairs(init.iter().map(|(n, t)| {
            let t = match names.iter().position(|m| *m == n) {
                Some(i) => xs[i].clone(),
                None => t.clone(),
            };
            (n.to_string(), t)
        }))
        .map_err(candle_core::Error::wrap)?;
        let logits = model
            .logits(&params, batch, Mode::Eval)
            .map_err(candle_core::Error::wrap)?;
        ops::cross_entropy(&logits, &batch.labels, 0.0)
    })
    .unwrap();
    assert!(
        errors.first_order <= 1e-6 && errors.second_order <= 1e-4,
        "{what}: {errors:?}"
    );
}

/// Checks that `model`'s logits have shape `[batch, classes]` and do not change with
/// the ids at padded positions ([`padded_batch`]); `what` names the model in failures.
pub(crate) fn check_logits_ignore_padding(model: &dyn FewShotModel, classes: usize, what: &str) {
    let params = model.init_params(1).unwrap();
    let a = model
        .logits(&params, &padded_batch([0, 0]), Mode::Eval)
        .unwrap();
    assert_eq!(a.dims(), &[2, classes]);
    let b = model
        .logits(&params, &padded_batch([10, 6]), Mode::Eval)
        .unwrap();
    assert!(max_abs_diff(&a, &b) <= 1e-12, "{what}: {a} {b}");
}

/// Rank-2 LoRA on `targets` (the family's defaults for `None`), without dropout, for
/// the family tests.
pub(crate) fn lora(targets: Option<Vec<String>>) -> LoraSettings {
    LoraSettings {
        spec: LoraSpec {
            rank: 2,
            alpha: 4.0,
            dropout: 0.0,
        },
        target_modules: targets,
        // Non-zero B, so that A's gradient is non-zero too.
        init: LoraInit::Normal { seed: 0, std: 0.3 },
    }
}
