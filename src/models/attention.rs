//! Multi-head scaled dot-product attention on projected queries, keys and values.

use candle_core::{DType, Device, Tensor};

use crate::tensor::ops;
use crate::Result;

/// `[b, t, h·d]` → `[b, h, t, d]`.
fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, t, width) = x.dims3()?;
    Ok(x.reshape((b, t, heads, width / heads))?
        .transpose(1, 2)?
        .contiguous()?)
}

/// Attention of `q`, `k`, `v` `[b, t, h·d]` over `heads` heads: `softmax(q·kᵀ·scale +
/// bias)·v` where `keep` (broadcastable to `[b, h, t, t]`, non-zero = attend) masks
/// keys; `bias` `[1 or b, h, t, t]` is added to the scores (T5's relative positions).
/// Returns `[b, t, h·d]`.
pub(crate) fn multi_head_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
    keep: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, t, width) = q.dims3()?;
    let (q, k, v) = (
        split_heads(q, heads)?,
        split_heads(k, heads)?,
        split_heads(v, heads)?,
    );
    let mut scores = q.matmul(&k.transpose(2, 3)?.contiguous()?)?;
    if scale != 1.0 {
        scores = (scores * scale)?;
    }
    if let Some(bias) = bias {
        scores = scores.broadcast_add(bias)?;
    }
    let probs = ops::masked_softmax(&scores, keep)?;
    let context = probs.matmul(&v)?;
    Ok(context
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b, t, width))?)
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
