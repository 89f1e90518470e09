//! Self-attention blocks of the transformer families: projections to queries, keys
//! and values, multi-head scaled dot-product attention, output projection.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::StackContext;
use crate::data::Batch;
use crate::nn::{LoraLinear, Mode};
use crate::tensor::{ops, ParamSet};
use crate::{Error, Result};

/// `[b, t, h·d]` → `[b, h, t, d]`.
fn split_heads(x: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (b, t, width) = x.dims3()?;
    x.reshape((b, t, heads, width / heads))?
        .transpose(1, 2)?
        .contiguous()
}

/// `[b, h, t, d]` → `[b, t, h·d]`.
fn merge_heads(x: &Tensor) -> candle_core::Result<Tensor> {
    let (b, h, t, d) = x.dims4()?;
    x.transpose(1, 2)?.contiguous()?.reshape((b, t, h * d))
}

/// The constants of an attention core: heads, score scale, key mask and score bias.
struct Core {
    heads: usize,
    scale: f64,
    keep: Tensor,
    bias: Option<Tensor>,
}

impl Core {
    /// Attention probabilities `[b, h, t, t]` of head-split queries and keys.
    fn probabilities(&self, q: &Tensor, k: &Tensor) -> candle_core::Result<Tensor> {
        let mut scores = q.matmul(&k.transpose(2, 3)?.contiguous()?)?;
        if self.scale != 1.0 {
            scores = (scores * self.scale)?;
        }
        if let Some(bias) = &self.bias {
            scores = scores.broadcast_add(bias)?;
        }
        ops::masked_softmax(&scores, &self.keep)
    }

    /// `softmax(q·kᵀ·scale + bias)·v` per head, `[b, t, h·d]` in and out.
    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<Tensor> {
        let probs =
            self.probabilities(&split_heads(q, self.heads)?, &split_heads(k, self.heads)?)?;
        merge_heads(&probs.matmul(&split_heads(v, self.heads)?)?)
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
        let heads = self.heads;
        let (q, k, v, g) = (
            split_heads(q, heads)?,
            split_heads(k, heads)?,
            split_heads(v, heads)?,
            split_heads(g, heads)?,
        );
        let probs = self.probabilities(&q, &k)?;
        let d_v = probs.transpose(2, 3)?.contiguous()?.matmul(&g)?;
        let d_probs = g.matmul(&v.transpose(2, 3)?.contiguous()?)?;
        let mut d_scores = ops::softmax_backward(&probs, &d_probs)?;
        if self.scale != 1.0 {
            d_scores = (d_scores * self.scale)?;
        }
        let d_q = d_scores.matmul(&k)?;
        let d_k = d_scores.transpose(2, 3)?.contiguous()?.matmul(&q)?;
        Ok(vec![
            merge_heads(&d_q)?,
            merge_heads(&d_k)?,
            merge_heads(&d_v)?,
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
    /// graph keeps `q`, `k`, `v` and the result: the head-split copies, scores and
    /// probabilities are freed at once and rebuilt in the backward pass.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        context: &StackContext,
        params: &ParamSet,
        mode: Mode,
        recompute: bool,
    ) -> Result<Tensor> {
        // Projections on the (possibly packed) rows; the core on the padded layout.
        let (q, k, v) = match &self.projections {
            Projections::Separate { query, key, value } => (
                context.unpack(&query.forward(x, params, mode)?)?,
                context.unpack(&key.forward(x, params, mode)?)?,
                context.unpack(&value.forward(x, params, mode)?)?,
            ),
            Projections::Fused(qkv) => {
                let qkv = context.unpack(&qkv.forward(x, params, mode)?)?;
                let width = qkv.dim(2)? / 3;
                (
                    qkv.narrow(2, 0, width)?,
                    qkv.narrow(2, width, width)?,
                    qkv.narrow(2, 2 * width, width)?,
                )
            }
        };
        let core = Core {
            heads: self.heads,
            scale: self.scale,
            keep: context.keep.clone(),
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
        self.output
            .forward(&context.pack(&attention)?, params, mode)
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
