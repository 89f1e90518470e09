//! The trainable classification head: a linear layer on pooled features.

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

use crate::tensor::{ops, ParamSet};
use crate::Result;

/// Name of the head's weight `[classes, features]` in the ParamSet.
pub const HEAD_WEIGHT: &str = "classifier.weight";
/// Name of the head's bias `[classes]` in the ParamSet.
pub const HEAD_BIAS: &str = "classifier.bias";

/// `logits = features·Wᵀ + b`, with `W` and `b` in the ParamSet.
#[derive(Debug, Clone)]
pub struct ClassificationHead {
    features: usize,
    classes: usize,
}

impl ClassificationHead {
    /// A head from `features` inputs to `classes` logits.
    pub fn new(features: usize, classes: usize) -> Self {
        Self { features, classes }
    }

    /// Number of classes.
    pub fn classes(&self) -> usize {
        self.classes
    }

    /// Adds `W = 0` and `b = 0` to `params`: the transformers' head. Few-shot labels
    /// are an arbitrary order of each task's classes, so a random head only adds
    /// noise that the first inner step amplifies (one class wins every query); at zero
    /// every class starts equal and the first step acts as a nearest-centroid rule on
    /// the support features (the "zeroing trick" of Kao et al., 2022).
    pub fn init_zero_params(
        &self,
        dtype: DType,
        device: &Device,
        params: &mut ParamSet,
    ) -> Result<()> {
        params.insert(
            HEAD_WEIGHT,
            Tensor::zeros((self.classes, self.features), dtype, device)?,
        )?;
        params.insert(HEAD_BIAS, Tensor::zeros(self.classes, dtype, device)?)?;
        Ok(())
    }

    /// Adds `W` ~ N(0, 0.02²) (BERT's initialiser range) and `b = 0` to `params`.
    pub fn init_params(
        &self,
        seed: u64,
        dtype: DType,
        device: &Device,
        params: &mut ParamSet,
    ) -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x6865_6164);
        let w: Vec<f64> = (0..self.classes * self.features)
            .map(|_| 0.02 * rng.sample::<f64, _>(StandardNormal))
            .collect();
        let w = Tensor::from_vec(w, (self.classes, self.features), device)?.to_dtype(dtype)?;
        params.insert(HEAD_WEIGHT, w)?;
        params.insert(HEAD_BIAS, Tensor::zeros(self.classes, dtype, device)?)?;
        Ok(())
    }

    /// Replaces the head in `params` (in its dtype and device) by `W ~ N(0, std²)`,
    /// seeded, and `b = 0` (`std` 0: zeros).
    pub fn reset_params(&self, std: f64, seed: u64, params: &mut ParamSet) -> Result<()> {
        let (dtype, device) = {
            let w = params.require(HEAD_WEIGHT)?;
            (w.dtype(), w.device().clone())
        };
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x7261_6e64);
        let w: Vec<f64> = (0..self.classes * self.features)
            .map(|_| std * rng.sample::<f64, _>(StandardNormal))
            .collect();
        let w = Tensor::from_vec(w, (self.classes, self.features), &device)?.to_dtype(dtype)?;
        let b = Tensor::zeros(self.classes, dtype, &device)?;
        params.set(HEAD_WEIGHT, w);
        params.set(HEAD_BIAS, b);
        Ok(())
    }

    /// Logits `[b, classes]` of pooled `features` `[b, features]`.
    pub fn forward(&self, features: &Tensor, params: &ParamSet) -> Result<Tensor> {
        let (w, b) = (params.require(HEAD_WEIGHT)?, params.require(HEAD_BIAS)?);
        Ok(ops::linear(features, w, Some(b))?)
    }
}
