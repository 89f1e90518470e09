//! Self-attention blocks of the transformer families: projections to queries, keys
//! and values, multi-head scaled dot-product attention, output projection.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::StackContext;
use crate::data::Batch;
use crate::nn::{LoraLinear, Mode};
use crate::tensor::ops::HeadLayout;
use crate::tensor::{ops, ParamSet};
use crate::{Error, Result};

/// The constants of an attention core: the move between rows and heads, the score
/// scale, key mask and score bias.
struct Core {
    heads: HeadLayout,
    scale: f64,
    keep: Tensor,
    bias: Option<Tensor>,
}

impl Core {
    /// Attention probabilities `[b, h, t, t]` of head-split queries `[b, h, t, d]` and
    /// transposed keys `[b, h, d, t]`. Without a bias the scale is part of the softmax
    /// op (no scaled copy of the scores in the graph).
    fn probabilities(&self, q: &Tensor, k_t: &Tensor) -> candle_core::Result<Tensor> {
        let scores = q.matmul(k_t)?;
        match &self.bias {
            None => ops::scaled_masked_softmax(&scores, self.scale, &self.keep),
            Some(bias) => {
                let scores = if self.scale != 1.0 {
                    (scores * self.scale)?
                } else {
                    scores
                };
                ops::masked_softmax(&scores.broadcast_add(bias)?, &self.keep)
            }
        }
    }

    /// `softmax(q·kᵀ·scale + bias)·v` per head, on rows (`[.., n, h·d]`) in and out.
    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<Tensor> {
        let probs =
            self.probabilities(&self.heads.split(q, false)?, &self.heads.split(k, true)?)?;
        self.heads
            .merge(&probs.matmul(&self.heads.split(v, false)?)?, false)
    }

    /// The gradients of `⟨forward(q, k, v), g⟩` in `q`, `k` and `v`, written with
    /// differentiable ops (the probabilities are rebuilt from `q` and `k`).
    fn vjp(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<Vec<Tensor>> {
        let split = |x: &Tensor, transposed| self.heads.split(x, transposed);
        let (q, k_t, v, g) = (
            split(q, false)?,
            split(k, true)?,
            split(v, false)?,
            split(g, false)?,
        );
        let probs = self.probabilities(&q, &k_t)?;
        let d_v = probs.transpose(2, 3)?.matmul(&g)?;
        let d_probs = g.matmul(&v.transpose(2, 3)?)?;
        let d_scores = ops::scaled_softmax_backward(&probs, &d_probs, self.scale)?;
        let d_q = d_scores.matmul(&k_t.transpose(2, 3)?)?;
        let d_k_t = q.transpose(2, 3)?.matmul(&d_scores)?;
        Ok(vec![
            self.heads.merge(&d_q, false)?,
            self.heads.merge(&d_k_t, true)?,
            self.heads.merge(&d_v, false)?,
        ])
    }
}

/// How a self-attention block projects its input to queries, keys and values.
#[derive(Debug, Clone)]
pub(crate) enum Projections {
    /// One linear each (BERT, DistilBERT, T5).
    Separate {
        query: LoraLinear,
        key: LoraLinear,
        value: LoraLinear,
    },
    /// One linear whose output is `[q | k | v]` (GPT-2's `c_attn`).
    Fused(LoraLinear),
}

/// A self-attention block: `output(attention(q(x), k(x), v(x)))` over `heads` heads,
/// scores scaled by `scale` and masked (and biased, for T5) by the stack's context.
#[derive(Debug, Clone)]
pub(crate) struct SelfAttention {
    projections: Projections,
    output: LoraLinear,
    heads: usize,
    scale: f64,
}

impl SelfAttention {
    /// A block scaling its scores by `1/√(head width)`, as BERT, DistilBERT and GPT-2
    /// do (HF DistilBERT divides q by √dh before the product; scaling the scores is
    /// the same).
    pub(crate) fn scaled(
        projections: Projections,
        output: LoraLinear,
        width: usize,
        heads: usize,
    ) -> Self {
        let scale = 1.0 / ((width / heads) as f64).sqrt();
        Self::new(projections, output, heads, scale)
    }

    /// A block scaling its scores by `scale` (T5: 1, its q initialisation folds the
    /// 1/√d_kv in).
    pub(crate) fn new(
        projections: Projections,
        output: LoraLinear,
        heads: usize,
        scale: f64,
    ) -> Self {
        Self {
            projections,
            output,
            heads,
            scale,
        }
    }

    /// The block's linears in order (projections, then output), for LoRA and full
    /// fine-tuning.
    pub(crate) fn linears(&self) -> Vec<&LoraLinear> {
        match &self.projections {
            Projections::Separate { query, key, value } => vec![query, key, value, &self.output],
            Projections::Fused(qkv) => vec![qkv, &self.output],
        }
    }

    /// [`linears`](Self::linears), mutable (to attach adapters).
    pub(crate) fn linears_mut(&mut self) -> Vec<&mut LoraLinear> {
        match &mut self.projections {
            Projections::Separate { query, key, value } => {
                vec![query, key, value, &mut self.output]
            }
            Projections::Fused(qkv) => vec![qkv, &mut self.output],
        }
    }

    /// The block on hidden states `x` `[b, t, width]` (or the packed `[1, n, width]`),
    /// with the stack's key mask and score bias. Returns `x`'s layout.
    ///
    /// With `recompute` (selective recomputation) the attention core is one op whose
    /// graph keeps `q`, `k`, `v` and the result: the head-layout tensors, scores and
    /// probabilities are freed at once and rebuilt in the backward pass.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        context: &StackContext,
        params: &ParamSet,
        mode: Mode,
        recompute: bool,
    ) -> Result<Tensor> {
        // Projections on the (possibly packed) rows; the core moves them into the
        // padded head layout and its result back.
        let (q, k, v) = match &self.projections {
            Projections::Separate { query, key, value } => (
                query.forward(x, params, mode)?,
                key.forward(x, params, mode)?,
                value.forward(x, params, mode)?,
            ),
            Projections::Fused(qkv) => {
                let qkv = qkv.forward(x, params, mode)?;
                let width = qkv.dim(2)? / 3;
                (
                    qkv.narrow(2, 0, width)?,
                    qkv.narrow(2, width, width)?,
                    qkv.narrow(2, 2 * width, width)?,
                )
            }
        };
        let core = Core {
            heads: context.head_layout(x, self.heads)?,
            scale: self.scale,
            keep: context.keep()?,
            bias: context.bias.clone(),
        };
        let attention = if recompute {
            let core = Arc::new(core);
            let backward = Arc::clone(&core);
            let block = ops::Recomputed::new(
                "attention-core",
                Arc::new(move |x: &[Tensor]| core.forward(&x[0], &x[1], &x[2])),
                Arc::new(move |x: &[Tensor], g: &Tensor| backward.vjp(&x[0], &x[1], &x[2], g)),
            );
            block.apply3(&q, &k, &v)?
        } else {
            core.forward(&q, &k, &v)?
        };
        self.output.forward(&attention, params, mode)
    }
}

/// The context of an encoder's stack: padded keys masked, no score bias.
pub(crate) fn padding_context(batch: &Batch) -> Result<StackContext> {
    StackContext::new(batch, padding_keep(&batch.tokens()?.attention_mask)?, None)
}

/// Refuses a config whose heads (`heads`, a key and its value) do not divide the
/// hidden width (`width`, likewise), or that has no heads: the keys name them in the
/// error as the family's `config.json` does.
pub(crate) fn check_heads_divide(
    (width_key, width): (&str, usize),
    (heads_key, heads): (&str, usize),
) -> Result<()> {
    if heads == 0 || !width.is_multiple_of(heads) {
        return Err(Error::Model(format!(
            "{width_key} {width} is not a multiple of {heads_key} {heads}"
        )));
    }
    Ok(())
}

/// Key-padding mask `[b, 1, 1, t]` from an attention mask `[b, t]`.
pub(crate) fn padding_keep(attention_mask: &Tensor) -> Result<Tensor> {
    let (b, t) = attention_mask.dims2()?;
    Ok(attention_mask.reshape((b, 1, 1, t))?)
}

/// Causal and key-padding mask `[b, 1, t, t]`: query `i` sees key `j ≤ i` that is
/// not padding.
pub(crate) fn causal_keep(attention_mask: &Tensor, device: &Device) -> Result<Tensor> {
    let (_, t) = attention_mask.dims2()?;
    let lower: Vec<u32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| u32::from(j <= i)))
        .collect();
    let causal = Tensor::from_vec(lower, (1, 1, t, t), device)?;
    Ok(causal.broadcast_mul(&padding_keep(&attention_mask.to_dtype(DType::U32)?)?)?)
}
