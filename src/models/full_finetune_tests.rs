//! Full fine-tuning (`FewShotModel::full_params`): every base weight of every family
//! is in the ParamSet, read from there by the forward pass, and differentiated
//! correctly (against central finite differences in f64), also segment by segment.

use candle_core::{DType, Device};

use super::load::builtin;
use super::test_support::padded_batch;
use super::{FewShotModel, LoraSettings, HEAD_WEIGHT};
use crate::engine::{CheckpointPlan, Checkpointed, GradEngine};
use crate::nn::{LoraInit, LoraSpec, Mode};
use crate::tensor::gradcheck::random_tensor;
use crate::tensor::{ops, GradGraph, ParamSet};

const FAMILIES: [&str; 4] = ["tiny-bert", "tiny-distilbert", "tiny-gpt2", "tiny-t5"];

fn lora() -> LoraSettings {
    LoraSettings {
        spec: LoraSpec {
            rank: 2,
            alpha: 4.0,
            dropout: 0.0,
        },
        target_modules: None,
        init: LoraInit::Peft { seed: 1 },
    }
}

fn model(name: &str) -> Box<dyn FewShotModel> {
    builtin(name, 5, DType::F64, Some(lora()), 3).unwrap()
}

/// `params` with a random head, so that the loss depends on the features (a zero
/// head would give every base weight a zero gradient).
fn with_random_head(params: &ParamSet) -> ParamSet {
    let mut out = params.clone();
    let dims = params.require(HEAD_WEIGHT).unwrap().dims().to_vec();
    out.set(HEAD_WEIGHT, random_tensor(&dims, 9, &Device::Cpu).unwrap());
    out
}

fn loss(model: &dyn FewShotModel, params: &ParamSet) -> f64 {
    let batch = padded_batch([0, 0]);
    let logits = model.logits(params, &batch, Mode::Eval).unwrap();
    ops::cross_entropy(&logits, &batch.labels, 0.0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

fn gradient(model: &dyn FewShotModel, params: &ParamSet) -> ParamSet {
    let batch = padded_batch([0, 0]);
    let leaves = params.to_leaves().unwrap();
    let logits = model.logits(&leaves, &batch, Mode::Eval).unwrap();
    let loss = ops::cross_entropy(&logits, &batch.labels, 0.0).unwrap();
    leaves.gradients(&loss, GradGraph::Detach).unwrap()
}

#[test]
fn every_base_weight_is_trained_and_differentiated_exactly() {
    for name in FAMILIES {
        let model = model(name);
        let init = with_random_head(&model.init_params(3).unwrap());
        let full = with_random_head(&model.full_params(3).unwrap());
        let base = model.transformer().unwrap().base_tensors().unwrap();
        assert_eq!(full.len(), init.len() + base.len(), "{name}");
        // At the frozen values the model computes what it computes without them.
        assert!((loss(model.as_ref(), &full) - loss(model.as_ref(), &init)).abs() < 1e-12);
        // Every base tensor is read from the ParamSet: each gets a gradient.
        let g = gradient(model.as_ref(), &full);
        for (tensor, _) in &base {
            let norm = g
                .require(tensor)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert!(norm > 0.0, "{name}: `{tensor}` gets no gradient");
        }
        // ⟨∇L, v⟩ against the central difference of L along a random v (small: the
        // base weights are of the order of 0.02).
        let v = full
            .map(|_, t| random_tensor(t.dims(), 17, t.device())? * 0.01)
            .unwrap();
        let analytic = g.dot(&v).unwrap().to_scalar::<f64>().unwrap();
        let eps = 1e-5;
        let numeric = (loss(model.as_ref(), &full.axpy(eps, &v).unwrap())
            - loss(model.as_ref(), &full.axpy(-eps, &v).unwrap()))
            / (2.0 * eps);
        let error = (analytic - numeric).abs() / analytic.abs().max(1e-8);
        assert!(
            error < 1e-6,
            "{name}: {analytic} vs {numeric} ({error:.2e})"
        );
    }
}

/// The checkpointing engine gives full fine-tuning the same gradient (T5's trained
/// position bias included, which every segment reaches through the stack's context).
#[test]
fn checkpointed_full_fine_tuning_gradients_equal_the_plain_ones() {
    for name in FAMILIES {
        let plain = model(name);
        let full = with_random_head(&plain.full_params(3).unwrap());
        let expected = gradient(plain.as_ref(), &full);
        let built = model(name);
        let engine = Checkpointed::new(built.as_ref(), &CheckpointPlan::Every(1)).unwrap();
        let got = engine
            .gradient(&full, &padded_batch([0, 0]), Mode::Eval)
            .unwrap()
            .grads;
        let gap = got.sub(&expected).unwrap().norm().unwrap() / expected.norm().unwrap();
        assert!(
            gap < 1e-10,
            "{name}: checkpointed gradient differs by {gap:.2e}"
        );
    }
}

/// An int8 base cannot be trained: full fine-tuning says so.
#[test]
fn an_int8_base_refuses_full_fine_tuning() {
    let precision = crate::models::ModelPrecision::from(DType::F32)
        .with_quantization(crate::models::Quantization::Int8);
    let model = builtin("tiny-bert", 5, precision, Some(lora()), 3).unwrap();
    let err = model.full_params(3).unwrap_err().to_string();
    assert!(
        err.contains("int8") && err.contains("quantization"),
        "{err}"
    );
}
