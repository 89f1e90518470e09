//! Tiny dense models with known curvature structure, for the learners' tests.

use candle_core::{Device, Tensor};

use crate::data::{Batch, Episode};
use crate::models::FewShotModel;
use crate::nn::Mode;
use crate::tensor::gradcheck::random_tensor;
use crate::tensor::ParamSet;
use crate::Result;

/// `logits = x·Wᵀ`: one trainable tensor, linear in θ (so the Gauss-Newton matrix is
/// the Hessian, and the block-diagonal Hessian is the whole Hessian).
pub(crate) struct LinearProbe {
    pub classes: usize,
    pub dim: usize,
}

impl FewShotModel for LinearProbe {
    fn init_params(&self, seed: u64) -> Result<ParamSet> {
        let w = (random_tensor(&[self.classes, self.dim], seed, &Device::Cpu)? * 0.5)?;
        ParamSet::from_pairs([("w", w)])
    }

    fn features(&self, _: &ParamSet, batch: &Batch, _: Mode) -> Result<Tensor> {
        Ok(batch.dense()?.clone())
    }

    fn logits(&self, params: &ParamSet, batch: &Batch, _: Mode) -> Result<Tensor> {
        Ok(batch.dense()?.matmul(&params.require("w")?.t()?)?)
    }
}

/// `logits = tanh(x·W₁ᵀ)·W₂ᵀ`: two tensors, non-linear in θ.
pub(crate) struct TwoLayerProbe {
    pub classes: usize,
    pub dim: usize,
    pub hidden: usize,
}

impl FewShotModel for TwoLayerProbe {
    fn init_params(&self, seed: u64) -> Result<ParamSet> {
        let w1 = (random_tensor(&[self.hidden, self.dim], seed, &Device::Cpu)? * 0.7)?;
        let w2 = (random_tensor(&[self.classes, self.hidden], seed + 1, &Device::Cpu)? * 0.7)?;
        ParamSet::from_pairs([("w1", w1), ("w2", w2)])
    }

    fn features(&self, params: &ParamSet, batch: &Batch, _: Mode) -> Result<Tensor> {
        Ok(batch.dense()?.matmul(&params.require("w1")?.t()?)?.tanh()?)
    }

    fn logits(&self, params: &ParamSet, batch: &Batch, mode: Mode) -> Result<Tensor> {
        Ok(self
            .features(params, batch, mode)?
            .matmul(&params.require("w2")?.t()?)?)
    }
}

/// `logits = tanh(x·W₁ᵀ)·Wᵀ + b` with the head (`W`, `b`) under the models' head
/// names, for ANIL: the head adapts, `w1` is the body.
pub(crate) struct HeadedProbe {
    pub classes: usize,
    pub dim: usize,
    pub hidden: usize,
    /// Whether the body is linear (`x·W₁ᵀ` with `hidden == classes`, added to the
    /// head's logits: the logits are then linear in every parameter, so the
    /// Gauss-Newton matrix is the Hessian) instead of `tanh` features.
    pub linear: bool,
}

impl FewShotModel for HeadedProbe {
    fn init_params(&self, seed: u64) -> Result<ParamSet> {
        use crate::models::{HEAD_BIAS, HEAD_WEIGHT};
        let w1 = (random_tensor(&[self.hidden, self.dim], seed, &Device::Cpu)? * 0.7)?;
        let head_in = if self.linear { self.dim } else { self.hidden };
        let w = (random_tensor(&[self.classes, head_in], seed + 1, &Device::Cpu)? * 0.7)?;
        let b = (random_tensor(&[self.classes], seed + 2, &Device::Cpu)? * 0.3)?;
        ParamSet::from_pairs([("w1", w1), (HEAD_WEIGHT, w), (HEAD_BIAS, b)])
    }

    fn features(&self, params: &ParamSet, batch: &Batch, _: Mode) -> Result<Tensor> {
        let x = batch.dense()?;
        if self.linear {
            Ok(x.clone())
        } else {
            Ok(x.matmul(&params.require("w1")?.t()?)?.tanh()?)
        }
    }

    fn logits(&self, params: &ParamSet, batch: &Batch, mode: Mode) -> Result<Tensor> {
        use crate::models::{HEAD_BIAS, HEAD_WEIGHT};
        let features = self.features(params, batch, mode)?;
        let head = features
            .matmul(&params.require(HEAD_WEIGHT)?.t()?)?
            .broadcast_add(params.require(HEAD_BIAS)?)?;
        if self.linear {
            Ok((head + batch.dense()?.matmul(&params.require("w1")?.t()?)?)?)
        } else {
            Ok(head)
        }
    }
}

/// A random dense episode: `per_class` support and query examples per class.
pub(crate) fn dense_episode(classes: usize, dim: usize, per_class: usize, seed: u64) -> Episode {
    let n = classes * per_class;
    let labels: Vec<u32> = (0..n).map(|i| (i % classes) as u32).collect();
    let batch = |s: u64| {
        Batch::from_dense(
            random_tensor(&[n, dim], s, &Device::Cpu).unwrap(),
            Tensor::from_vec(labels.clone(), n, &Device::Cpu).unwrap(),
        )
        .unwrap()
    };
    Episode::new(batch(seed), batch(seed + 1), classes).unwrap()
}
