//! Frozen building blocks shared by the transformer families, loaded by Hugging Face
//! name with their expected shapes.

use std::sync::Arc;

use candle_core::{DType, Tensor};

use super::{Quantization, Weights};
use crate::nn::{LoraLinear, WeightLayout};
use crate::tensor::ops::norm::layer_norm;
use crate::tensor::ops::{self, Int8Matrix, Stored};
use crate::Result;

/// A frozen token-embedding table: dense, or int8 with one scale per row (token),
/// whose looked-up rows are dequantized into the activations' dtype.
#[derive(Debug, Clone)]
pub(crate) enum FrozenTable {
    Dense(Tensor),
    Int8 {
        table: Arc<Int8Matrix>,
        dtype: DType,
    },
}

impl FrozenTable {
    /// The table `name` `[vocab, dim]`, stored as the weights' quantization says.
    pub(crate) fn load(weights: &Weights, name: &str, shape: &[usize]) -> Result<Self> {
        Self::new(weights, weights.get(name, shape)?)
    }

    /// `table` stored as `weights`' quantization says.
    pub(crate) fn new(weights: &Weights, table: Tensor) -> Result<Self> {
        Ok(match weights.quantization() {
            Quantization::None => FrozenTable::Dense(table),
            Quantization::Int8 => FrozenTable::Int8 {
                table: Arc::new(Int8Matrix::quantize(&table, Stored::OutIn)?),
                dtype: weights.dtype(),
            },
        })
    }

    /// Rows at `ids` (any shape): `ids.shape() + [dim]`.
    pub(crate) fn lookup(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(match self {
            FrozenTable::Dense(t) => ops::embedding(ids, t)?,
            FrozenTable::Int8 { table, dtype } => ops::int8_embedding(ids, table, *dtype)?,
        })
    }
}

/// A frozen linear layer stored as `weights` asks (int8 or dense), with its adapter
/// to be made in the trainable dtype.
fn stored(weights: &Weights, linear: LoraLinear) -> Result<LoraLinear> {
    linear.with_storage(weights.quantization(), weights.trainable_dtype())
}

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
    stored(
        weights,
        LoraLinear::new(
            path,
            weights.get(&format!("{path}.weight"), &[n_out, n_in])?,
            Some(weights.get(&format!("{path}.bias"), &[n_out])?),
            WeightLayout::OutIn,
        )?,
    )
}

/// `nn.Linear` without bias (T5).
pub(crate) fn load_linear_no_bias(
    weights: &Weights,
    path: &str,
    n_in: usize,
    n_out: usize,
) -> Result<LoraLinear> {
    stored(
        weights,
        LoraLinear::new(
            path,
            weights.get(&format!("{path}.weight"), &[n_out, n_in])?,
            None,
            WeightLayout::OutIn,
        )?,
    )
}

/// GPT-2's `Conv1D` at `path`: weight `[in, out]` and bias.
pub(crate) fn load_conv1d(
    weights: &Weights,
    path: &str,
    n_in: usize,
    n_out: usize,
) -> Result<LoraLinear> {
    stored(
        weights,
        LoraLinear::new(
            path,
            weights.get(&format!("{path}.weight"), &[n_in, n_out])?,
            Some(weights.get(&format!("{path}.bias"), &[n_out])?),
            WeightLayout::InOut,
        )?,
    )
}
