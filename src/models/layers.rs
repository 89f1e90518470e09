//! Frozen building blocks shared by the transformer families, loaded by Hugging Face
//! name with their expected shapes.

use std::sync::Arc;

use candle_core::{DType, Tensor};

use super::attention::SelfAttention;
use super::{Activation, Quantization, StackContext, Weights};
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

/// The kinds of frozen linear layer in Hugging Face checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dense {
    /// `nn.Linear`: weight `[out, in]` and bias.
    Linear,
    /// `nn.Linear` without bias (T5).
    LinearNoBias,
    /// GPT-2's `Conv1D`: weight `[in, out]` and bias.
    Conv1d,
}

/// The frozen linear layer of `kind` at `path` (`<path>.weight`, and `<path>.bias`
/// where the kind has one) from `n_in` to `n_out` features, stored as `weights` asks.
pub(crate) fn load_dense(
    weights: &Weights,
    kind: Dense,
    path: &str,
    n_in: usize,
    n_out: usize,
) -> Result<LoraLinear> {
    let (shape, layout) = match kind {
        Dense::Linear | Dense::LinearNoBias => ([n_out, n_in], WeightLayout::OutIn),
        Dense::Conv1d => ([n_in, n_out], WeightLayout::InOut),
    };
    let weight = weights.get(&format!("{path}.weight"), &shape)?;
    let bias = match kind {
        Dense::Linear | Dense::Conv1d => Some(weights.get(&format!("{path}.bias"), &[n_out])?),
        Dense::LinearNoBias => None,
    };
    stored(weights, LoraLinear::new(path, weight, bias, layout)?)
}

/// The two sublayers of every transformer layer, self-attention and feed-forward;
/// the families differ in where they put the norms and residuals around them.
#[derive(Debug, Clone)]
pub(crate) struct Sublayers {
    pub(crate) attention: SelfAttention,
    pub(crate) feed_forward: FeedForward,
}

/// A layer's two norms, each applied to hidden states `[b, t, width]` with the
/// family's weights and epsilon: the one around the attention, then the one around
/// the feed-forward block.
pub(crate) type Norms<'a> = [&'a dyn Fn(&Tensor) -> Result<Tensor>; 2];

impl Sublayers {
    /// The post-norm layer (BERT, DistilBERT): `x ← norm₀(attention(x) + x)`, then
    /// `x ← norm₁(ffn(x) + x)`; `recompute` selects selective recomputation of the
    /// frozen attention core and feed-forward block.
    pub(crate) fn post_norm(
        &self,
        x: &Tensor,
        [attention_norm, output_norm]: Norms<'_>,
        context: &StackContext,
        params: &ParamSet,
        mode: Mode,
        recompute: bool,
    ) -> Result<Tensor> {
        let attended = self
            .attention
            .forward(x, context, params, mode, recompute)?;
        let x = attention_norm(&(attended + x)?)?;
        let out = self.feed_forward.forward(&x, params, mode, recompute)?;
        output_norm(&(out + &x)?)
    }

    /// The pre-norm layer (GPT-2, T5): `h ← h + attention(norm₀(h))`, then
    /// `h ← h + ffn(norm₁(h))`; `recompute` as in [`post_norm`](Self::post_norm).
    pub(crate) fn pre_norm(
        &self,
        h: &Tensor,
        [attention_norm, ffn_norm]: Norms<'_>,
        context: &StackContext,
        params: &ParamSet,
        mode: Mode,
        recompute: bool,
    ) -> Result<Tensor> {
        let attended =
            self.attention
                .forward(&attention_norm(h)?, context, params, mode, recompute)?;
        let h = (h + attended)?;
        let out = self
            .feed_forward
            .forward(&ffn_norm(&h)?, params, mode, recompute)?;
        Ok((&h + out)?)
    }

    /// The layer's linears in order (the attention's, then the feed-forward's), for
    /// LoRA and full fine-tuning.
    pub(crate) fn linears(&self) -> Vec<&LoraLinear> {
        let mut out = self.attention.linears();
        out.extend(self.feed_forward.linears());
        out
    }

    /// [`linears`](Self::linears), mutable (to attach adapters).
    pub(crate) fn linears_mut(&mut self) -> Vec<&mut LoraLinear> {
        let mut out = self.attention.linears_mut();
        out.extend(self.feed_forward.linears_mut());
        out
    }
}

/// A transformer's feed-forward block, `output(act(input(x)) ⊙ gate(x))` (the gate
/// only in gated T5 variants).
#[derive(Debug, Clone)]
pub(crate) struct FeedForward {
    pub(crate) input: LoraLinear,
    pub(crate) gate: Option<LoraLinear>,
    pub(crate) output: LoraLinear,
    pub(crate) activation: Activation,
}

impl FeedForward {
    /// The block's linears in order (input, gate, output), for LoRA and full
    /// fine-tuning.
    pub(crate) fn linears(&self) -> impl Iterator<Item = &LoraLinear> {
        [Some(&self.input), self.gate.as_ref(), Some(&self.output)]
            .into_iter()
            .flatten()
    }

    /// [`linears`](Self::linears), mutable (to attach adapters).
    pub(crate) fn linears_mut(&mut self) -> impl Iterator<Item = &mut LoraLinear> {
        [
            Some(&mut self.input),
            self.gate.as_mut(),
            Some(&mut self.output),
        ]
        .into_iter()
        .flatten()
    }

    /// The block on the frozen weights alone (no adapters): what a recomputed block
    /// runs.
    fn frozen_forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut inner = self.activation.apply(&self.input.frozen_forward(x)?)?;
        if let Some(gate) = &self.gate {
            inner = (inner * gate.frozen_forward(x)?)?;
        }
        self.output.frozen_forward(&inner)
    }

    /// The gradient of `⟨frozen_forward(x), g⟩` in `x`, with differentiable ops.
    fn frozen_vjp(&self, x: &Tensor, g: &Tensor) -> candle_core::Result<Tensor> {
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
        let frozen = self
            .linears()
            .all(|l| l.lora().is_none() && !l.is_trained(params));
        if recompute && frozen {
            // One copy of the block, shared by the forward and the backward.
            let block = Arc::new(self.clone());
            let backward = Arc::clone(&block);
            let op = ops::Recomputed::new(
                "feed-forward",
                Arc::new(move |x: &[Tensor]| block.frozen_forward(&x[0])),
                Arc::new(move |x: &[Tensor], g: &Tensor| Ok(vec![backward.frozen_vjp(&x[0], g)?])),
            );
            return Ok(op.apply1(x)?);
        }
        let mut inner = self
            .activation
            .apply(&self.input.forward(x, params, mode)?)?;
        if let Some(gate) = &self.gate {
            inner = (inner * gate.forward(x, params, mode)?)?;
        }
        self.output.forward(&inner, params, mode)
    }
}
