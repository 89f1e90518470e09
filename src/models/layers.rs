//! Frozen building blocks shared by the transformer families, loaded by Hugging Face
//! name with their expected shapes.

use std::sync::Arc;

use candle_core::{DType, Tensor};

use super::{Activation, Quantization, Weights};
use crate::nn::{LoraLinear, Mode, WeightLayout};
use crate::tensor::ops::norm::layer_norm;
use crate::tensor::ops::{self, Int8Matrix, Stored};
use crate::tensor::ParamSet;
use crate::Result;

/// A frozen tensor of the base model under its Hugging Face name. Full fine-tuning
/// ([`crate::models::FewShotModel::full_params`]) trains it by putting a tensor of that
/// name in the ParamSet, which is then read instead of the frozen copy.
#[derive(Debug, Clone)]
pub(crate) struct Frozen {
    name: String,
    tensor: Tensor,
}

impl Frozen {
    /// The tensor `name` of `weights`, which must have `shape`.
    pub(crate) fn load(weights: &Weights, name: &str, shape: &[usize]) -> Result<Self> {
        Ok(Self::new(name, weights.get(name, shape)?))
    }

    /// `tensor` under `name`.
    pub(crate) fn new(name: impl Into<String>, tensor: Tensor) -> Self {
        Self {
            name: name.into(),
            tensor,
        }
    }

    /// The tensor the forward pass reads: the ParamSet's trained copy (in the frozen
    /// dtype, through a differentiable cast), else the frozen one.
    pub(crate) fn get(&self, params: &ParamSet) -> Result<Tensor> {
        Ok(match params.get(&self.name) {
            Some(trained) => trained.to_dtype(self.tensor.dtype())?,
            None => self.tensor.clone(),
        })
    }

    /// The name and frozen value, for full fine-tuning's ParamSet.
    pub(crate) fn base(&self) -> (String, Tensor) {
        (self.name.clone(), self.tensor.clone())
    }
}

/// A frozen token-embedding table: dense, or int8 with one scale per row (token),
/// whose looked-up rows are dequantized into the activations' dtype.
#[derive(Debug, Clone)]
pub(crate) enum FrozenTable {
    Dense(Frozen),
    Int8 {
        name: String,
        table: Arc<Int8Matrix>,
        dtype: DType,
    },
}

impl FrozenTable {
    /// The table `name` `[vocab, dim]`, stored as the weights' quantization says.
    pub(crate) fn load(weights: &Weights, name: &str, shape: &[usize]) -> Result<Self> {
        Self::new(weights, name, weights.get(name, shape)?)
    }

    /// `table` (named `name`) stored as `weights`' quantization says.
    pub(crate) fn new(weights: &Weights, name: &str, table: Tensor) -> Result<Self> {
        Ok(match weights.quantization() {
            Quantization::None => FrozenTable::Dense(Frozen::new(name, table)),
            Quantization::Int8 => FrozenTable::Int8 {
                name: name.to_owned(),
                table: Arc::new(Int8Matrix::quantize(&table, Stored::OutIn)?),
                dtype: weights.dtype(),
            },
        })
    }

    /// Rows at `ids` (any shape): `ids.shape() + [dim]`, of the trained table when
    /// `params` holds one.
    pub(crate) fn lookup(&self, ids: &Tensor, params: &ParamSet) -> Result<Tensor> {
        Ok(match self {
            FrozenTable::Dense(t) => ops::embedding(ids, &t.get(params)?)?,
            FrozenTable::Int8 { table, dtype, .. } => ops::int8_embedding(ids, table, *dtype)?,
        })
    }

    /// The name and dense value; an int8 table cannot be fine-tuned.
    pub(crate) fn base(&self) -> Result<(String, Tensor)> {
        match self {
            FrozenTable::Dense(t) => Ok(t.base()),
            FrozenTable::Int8 { name, .. } => Err(int8_not_trainable(name)),
        }
    }
}

/// Full fine-tuning trains the base weights, which int8 storage keeps frozen.
pub(crate) fn int8_not_trainable(name: &str) -> crate::Error {
    crate::Error::InvalidArgument(format!(
        "full fine-tuning trains every base weight, but `{name}` is stored in int8; use \
         model.quantization: none with the finetune baseline (or lora-finetune)"
    ))
}

/// A frozen linear layer stored as `weights` asks (int8 or dense), with its adapter
/// to be made in the trainable dtype.
fn stored(weights: &Weights, linear: LoraLinear) -> Result<LoraLinear> {
    linear.with_storage(weights.quantization(), weights.trainable_dtype())
}

/// A layer norm's frozen scale and shift (`<prefix>.weight`, `<prefix>.bias`).
#[derive(Debug, Clone)]
pub(crate) struct LayerNorm {
    gamma: Frozen,
    beta: Frozen,
}

impl LayerNorm {
    pub(crate) fn load(weights: &Weights, prefix: &str, width: usize) -> Result<Self> {
        Ok(Self {
            gamma: Frozen::load(weights, &format!("{prefix}.weight"), &[width])?,
            beta: Frozen::load(weights, &format!("{prefix}.bias"), &[width])?,
        })
    }

    /// The norm of `x`, with the trained scale and shift when `params` holds them.
    pub(crate) fn forward(&self, x: &Tensor, eps: f64, params: &ParamSet) -> Result<Tensor> {
        Ok(layer_norm(
            x,
            &self.gamma.get(params)?,
            &self.beta.get(params)?,
            eps,
        )?)
    }

    /// The scale and shift with their names.
    pub(crate) fn base(&self) -> [(String, Tensor); 2] {
        [self.gamma.base(), self.beta.base()]
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

/// A transformer's feed-forward block, `output(act(input(x)) ⊙ gate(x))` (the gate
/// only in gated T5 variants), borrowed from a layer.
pub(crate) struct FeedForward<'a> {
    pub(crate) input: &'a LoraLinear,
    pub(crate) gate: Option<&'a LoraLinear>,
    pub(crate) output: &'a LoraLinear,
    pub(crate) activation: Activation,
}

/// The block's frozen linears and activation, owned by its recomputed op.
struct FrozenFeedForward {
    input: LoraLinear,
    gate: Option<LoraLinear>,
    output: LoraLinear,
    activation: Activation,
}

impl FrozenFeedForward {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut inner = self.activation.apply(&self.input.frozen_forward(x)?)?;
        if let Some(gate) = &self.gate {
            inner = (inner * gate.frozen_forward(x)?)?;
        }
        self.output.frozen_forward(&inner)
    }

    /// The gradient of `⟨forward(x), g⟩` in `x`, with differentiable ops.
    fn vjp(&self, x: &Tensor, g: &Tensor) -> candle_core::Result<Tensor> {
        let d_inner = self.output.frozen_input_gradient(g)?;
        let pre = self.input.frozen_forward(x)?;
        let slope = self.activation.derivative(&pre)?;
        match &self.gate {
            None => self.input.frozen_input_gradient(&(d_inner * slope)?),
            Some(gate) => {
                let gated = gate.frozen_forward(x)?;
                let d_pre = ((&d_inner * &gated)? * slope)?;
                let d_gated = (d_inner * self.activation.apply(&pre)?)?;
                self.input.frozen_input_gradient(&d_pre)? + gate.frozen_input_gradient(&d_gated)?
            }
        }
    }
}

impl FeedForward<'_> {
    /// The block on hidden states `x` `[b, t, width]`.
    ///
    /// With `recompute` (selective recomputation), a block without adapters is one op
    /// whose graph keeps `x` and the result: the intermediate (4× the width) and its
    /// activation are freed at once and rebuilt in the backward pass. A block with an
    /// adapter on any of its linears runs as it is (its LoRA branch needs its input).
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        params: &ParamSet,
        mode: Mode,
        recompute: bool,
    ) -> Result<Tensor> {
        let frozen = [Some(self.input), self.gate, Some(self.output)]
            .into_iter()
            .flatten()
            .all(|l| l.lora().is_none() && !l.is_trained(params));
        if recompute && frozen {
            // One copy of the block, shared by the forward and the backward.
            let block = Arc::new(FrozenFeedForward {
                input: self.input.clone(),
                gate: self.gate.cloned(),
                output: self.output.clone(),
                activation: self.activation,
            });
            let backward = Arc::clone(&block);
            let op = ops::Recomputed::new(
                "feed-forward",
                Arc::new(move |x: &[Tensor]| block.forward(&x[0])),
                Arc::new(move |x: &[Tensor], g: &Tensor| Ok(vec![backward.vjp(&x[0], g)?])),
            );
            return Ok(op.apply1(x)?);
        }
        let mut inner = self
            .activation
            .apply(&self.input.forward(x, params, mode)?)?;
        if let Some(gate) = self.gate {
            inner = (inner * gate.forward(x, params, mode)?)?;
        }
        self.output.forward(&inner, params, mode)
    }
}
