//! Multi-head scaled dot-product attention on projected queries, keys and values.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::tensor::ops;
use crate::Result;

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

/// Attention of `q`, `k`, `v` `[b, t, h·d]` over `heads` heads: `softmax(q·kᵀ·scale +
/// bias)·v` where `keep` (broadcastable to `[b, h, t, t]`, non-zero = attend) masks
/// keys; `bias` `[1 or b, h, t, t]` is added to the scores (T5's relative positions).
/// Returns `[b, t, h·d]`.
///
/// With `recompute` (selective recomputation) the core is one op whose graph keeps
/// `q`, `k`, `v` and the result: the head-split copies, scores and probabilities are
/// freed at once and rebuilt in the backward pass.
#[allow(clippy::too_many_arguments)]
pub(crate) fn multi_head_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
    keep: &Tensor,
    bias: Option<&Tensor>,
    recompute: bool,
) -> Result<Tensor> {
    let core = Core {
        heads,
        scale,
        keep: keep.clone(),
        bias: bias.cloned(),
    };
    if !recompute {
        return Ok(core.forward(q, k, v)?);
    }
    let core = Arc::new(core);
    let backward = Arc::clone(&core);
    let block = ops::Recomputed::new(
        "attention-core",
        Arc::new(move |x: &[Tensor]| core.forward(&x[0], &x[1], &x[2])),
        Arc::new(move |x: &[Tensor], g: &Tensor| backward.vjp(&x[0], &x[1], &x[2], g)),
    );
    Ok(block.apply3(q, k, v)?)
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
