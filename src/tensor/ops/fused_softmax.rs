//! Softmax over the last dimension as one op, optionally masked. The forward keeps
//! only its output; the backward `p ⊙ (g − Σ g⊙p)` is written with tensor ops on that
//! output, whose own backward is this op again, so second derivatives are exact.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

use super::rows::map_rows;

/// A keep-mask (non-zero = attend) of the same rank as the scores, each dimension
/// either the scores' or 1 (broadcast), the last one the scores'.
#[derive(Clone)]
struct KeepMask {
    data: Vec<u8>,
    dims: Vec<usize>,
}

impl KeepMask {
    fn new(mask: &Tensor, scores: &[usize]) -> Result<Self> {
        let mut dims = mask.dims().to_vec();
        while dims.len() < scores.len() {
            dims.insert(0, 1);
        }
        let fits = dims.len() == scores.len()
            && dims.iter().zip(scores).all(|(m, s)| m == s || *m == 1)
            && dims.last() == scores.last();
        if !fits {
            candle_core::bail!(
                "mask {:?} does not broadcast to scores {scores:?} over whole rows",
                mask.dims()
            );
        }
        let data = mask
            .ne(0f64)?
            .to_dtype(DType::U8)?
            .flatten_all()?
            .to_vec1::<u8>()?;
        Ok(Self { data, dims })
    }

    /// The mask row for row `row` of scores shaped `scores` (rows = all but the last
    /// dimension, row-major).
    fn row<'a>(&'a self, scores: &[usize], mut row: usize) -> &'a [u8] {
        let width = *self.dims.last().expect("rank ≥ 1");
        let (mut offset, mut stride) = (0, width);
        for k in (0..scores.len() - 1).rev() {
            let index = row % scores[k];
            row /= scores[k];
            if self.dims[k] != 1 {
                offset += index * stride;
            }
            stride *= self.dims[k];
        }
        &self.data[offset..offset + width]
    }
}

struct SoftmaxOp {
    keep: Option<KeepMask>,
}

impl CustomOp1 for SoftmaxOp {
    fn name(&self) -> &'static str {
        if self.keep.is_some() {
            "masked-softmax"
        } else {
            "softmax"
        }
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = layout.dims().to_vec();
        let width = *dims.last().unwrap_or(&1);
        let out = map_rows(storage, layout, width, |row, x, p| {
            let keep = self.keep.as_ref().map(|k| k.row(&dims, row));
            let kept = |j: usize| keep.is_none_or(|k| k[j] != 0);
            let max = (0..width)
                .filter(|&j| kept(j))
                .map(|j| x[j])
                .fold(f64::NEG_INFINITY, f64::max);
            if max == f64::NEG_INFINITY {
                p.fill(0.0); // nothing to attend to
                return;
            }
            let mut sum = 0.0;
            for j in 0..width {
                p[j] = if kept(j) { (x[j] - max).exp() } else { 0.0 };
                sum += p[j];
            }
            p.iter_mut().for_each(|v| *v /= sum);
        })?;
        Ok((out, layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let weighted = (grad * res)?.sum_keepdim(candle_core::D::Minus1)?;
        Ok(Some((res * grad.broadcast_sub(&weighted)?)?))
    }
}

/// Softmax over the last dimension, entries with a zero in `keep` (broadcastable over
/// whole rows) excluded.
pub(crate) fn softmax(x: &Tensor, keep: Option<&Tensor>) -> Result<Tensor> {
    let keep = keep.map(|k| KeepMask::new(k, x.dims())).transpose()?;
    x.contiguous()?.apply_op1(SoftmaxOp { keep })
}
