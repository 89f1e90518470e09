//! Frozen building blocks shared by the transformer families, loaded by Hugging Face
//! name with their expected shapes.

use candle_core::Tensor;

use super::Weights;
use crate::nn::{LoraLinear, WeightLayout};
use crate::tensor::ops::norm::layer_norm;
use crate::Result;

/// A layer norm's frozen scale and shift (`<prefix>.weight`, `<prefix>.bias`).
#[derive(Debug, Clone)]
pub(crate) struct LayerNorm {
    gamma: Tensor,
    beta: Tensor,
}

impl LayerNorm {
    pub(crate) fn load(weights: &Weights, prefix: &str, width: usize) -> Result<Self> {
        Ok(Self {
            gamma: weights.get(&format!("{prefix}.weight"), &[width])?,
            beta: weights.get(&format!("{prefix}.bias"), &[width])?,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor, eps: f64) -> Result<Tensor> {
        Ok(layer_norm(x, &self.gamma, &self.beta, eps)?)
    }
}

/// `nn.Linear` at `path`: weight `[out, in]` and bias.
pub(crate) fn load_linear(
    weights: &Weights,
    path: &str,
    n_in: usize,
    n_out: usize,
) -> Result<LoraLinear> {
    LoraLinear::new(
        path,
        weights.get(&format!("{path}.weight"), &[n_out, n_in])?,
        Some(weights.get(&format!("{path}.bias"), &[n_out])?),
        WeightLayout::OutIn,
    )
}

/// `nn.Linear` without bias (T5).
pub(crate) fn load_linear_no_bias(
    weights: &Weights,
    path: &str,
    n_in: usize,
    n_out: usize,
) -> Result<LoraLinear> {
    LoraLinear::new(
        path,
        weights.get(&format!("{path}.weight"), &[n_out, n_in])?,
        None,
        WeightLayout::OutIn,
    )
}

/// GPT-2's `Conv1D` at `path`: weight `[in, out]` and bias.
pub(crate) fn load_conv1d(
    weights: &Weights,
    path: &str,
    n_in: usize,
    n_out: usize,
) -> Result<LoraLinear> {
    LoraLinear::new(
        path,
        weights.get(&format!("{path}.weight"), &[n_in, n_out])?,
        Some(weights.get(&format!("{path}.bias"), &[n_out])?),
        WeightLayout::InOut,
    )
}
