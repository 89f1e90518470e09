//! Softmax over the last dimension as one op, optionally masked. The forward keeps
//! only its output; the backward `p ⊙ (g − Σ g⊙p)` is one op too ([`SoftmaxGradOp`],
//! each row summed in f64, which half precision needs: candle sums bf16/f16 in their
//! own type). Its derivative in `g` is the same op, its derivative in `p` tensor ops
//! in the working dtype on copies alive only during the backward, so second
//! derivatives are exact.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, D};

use super::fused_norm::{light, work_dtype};
use super::rows::{map_rows, map_rows2};

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
    /// The inputs are multiplied by this first (attention's 1/√d).
    scale: f64,
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
            let scale = self.scale;
            let max = (0..width)
                .filter(|&j| kept(j))
                .map(|j| scale * x[j])
                .fold(f64::NEG_INFINITY, f64::max);
            if max == f64::NEG_INFINITY {
                p.fill(0.0); // nothing to attend to
                return;
            }
            let mut sum = 0.0;
            for j in 0..width {
                p[j] = if kept(j) {
                    (scale * x[j] - max).exp()
                } else {
                    0.0
                };
                sum += p[j];
            }
            p.iter_mut().for_each(|v| *v /= sum);
        })?;
        Ok((out, layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(scaled_softmax_backward(res, grad, self.scale)?))
    }
}

/// The input gradient of a (masked) softmax of `scale·x` with output `p` for the
/// output gradient `g`, `scale·p ⊙ (g − Σ g⊙p)`, differentiable in both: one op
/// ([`SoftmaxGradOp`], rows summed in f64) that a kept graph holds with its inputs
/// only (as tensor ops it would also keep `g ⊙ p` and `g − Σ g⊙p`, two score-sized
/// tensors per softmax).
pub(crate) fn scaled_softmax_backward(p: &Tensor, g: &Tensor, scale: f64) -> Result<Tensor> {
    if !super::composite::fused_kernels(p.device()) {
        return super::composite::scaled_softmax_backward(p, g, scale);
    }
    p.contiguous()?
        .apply_op2(&g.contiguous()?, SoftmaxGradOp { scale })
}

/// The input gradient of a softmax of `scale·x` with output `p` for an output
/// gradient `g`, `scale·p ⊙ (g − Σ g⊙p)` per row, computed in f64 and returned in
/// `p`'s dtype. Masked entries have p = 0 and get 0.
struct SoftmaxGradOp {
    scale: f64,
}

impl CustomOp2 for SoftmaxGradOp {
    fn name(&self) -> &'static str {
        "softmax-backward"
    }

    fn cpu_fwd(
        &self,
        p: &CpuStorage,
        p_layout: &Layout,
        g: &CpuStorage,
        g_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let width = p_layout.dims().last().copied().unwrap_or(1);
        let out = map_rows2((p, p_layout), (g, g_layout), width, |_, p, g, d| {
            let s: f64 = p.iter().zip(g).map(|(p, g)| p * g).sum();
            for j in 0..width {
                d[j] = self.scale * p[j] * (g[j] - s);
            }
        })?;
        Ok((out, p_layout.shape().clone()))
    }

    /// For a cotangent `c` of `d = s·p ⊙ (g − ⟨g, p⟩)`: `d g = s·p ⊙ (c − ⟨c, p⟩)`
    /// (this op again) and `d p = s·(c ⊙ (g − ⟨g, p⟩) − g·⟨c, p⟩)` (tensor ops, working
    /// dtype).
    fn bwd(
        &self,
        p: &Tensor,
        g: &Tensor,
        _res: &Tensor,
        c: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let d_g = scaled_softmax_backward(p, c, self.scale)?.to_dtype(g.dtype())?;
        let work = work_dtype(p.dtype());
        let (pw, gw, cw) = (p.to_dtype(work)?, g.to_dtype(work)?, c.to_dtype(work)?);
        let s_g = (&gw * &pw)?.sum_keepdim(D::Minus1)?;
        let s_c = (&cw * &pw)?.sum_keepdim(D::Minus1)?;
        let mut d_p = (cw * gw.broadcast_sub(&s_g)?)?.sub(&gw.broadcast_mul(&s_c)?)?;
        if self.scale != 1.0 {
            d_p = (d_p * self.scale)?;
        }
        Ok((Some(light(d_p.to_dtype(p.dtype())?)), Some(d_g)))
    }
}

/// Softmax of `scale·x` over the last dimension, entries with a zero in `keep`
/// (broadcastable over whole rows) excluded.
pub(crate) fn softmax(x: &Tensor, keep: Option<&Tensor>, scale: f64) -> Result<Tensor> {
    if !super::composite::fused_kernels(x.device()) {
        return super::composite::softmax(x, keep, scale);
    }
    let keep = keep.map(|k| KeepMask::new(k, x.dims())).transpose()?;
    x.contiguous()?.apply_op1(SoftmaxOp { keep, scale })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::gradcheck::{check_derivatives, random_tensor};
    use crate::tensor::test_support::max_abs_diff;
    use candle_core::Device;

    /// The fused softmax gradient, with the softmax's output as `p`, has exact first
    /// and second derivatives in both `p` and `g`, scaled or not; the scaled softmax
    /// equals the softmax of scaled inputs, and so do their gradients.
    #[test]
    fn fused_softmax_gradient_derivatives_are_exact() {
        let dev = Device::Cpu;
        let x = random_tensor(&[3, 5], 1, &dev).unwrap();
        let g = random_tensor(&[3, 5], 2, &dev).unwrap();
        for scale in [1.0, 0.35] {
            let p = softmax(&x, None, scale).unwrap();
            let reference = softmax(&(&x * scale).unwrap(), None, 1.0).unwrap();
            assert!(max_abs_diff(&p, &reference) < 1e-15);
            let errors = check_derivatives(&[p, g.clone()], |t| {
                scaled_softmax_backward(&t[0], &t[1], scale)
            })
            .unwrap();
            assert!(
                errors.first_order < 1e-6 && errors.second_order < 1e-4,
                "{scale}: {errors:?}"
            );
            let errors = check_derivatives(std::slice::from_ref(&x), |t| {
                softmax(&t[0], None, scale)?.sqr()
            })
            .unwrap();
            assert!(
                errors.first_order < 1e-6 && errors.second_order < 1e-4,
                "{scale}: {errors:?}"
            );
        }
    }

    /// bf16 attention-shaped softmax: gradient and Hessian-vector product close to f64.
    #[test]
    fn half_precision_softmax_derivatives_track_f64() {
        let dev = Device::Cpu;
        let x = (random_tensor(&[4, 3, 32, 32], 3, &dev).unwrap() * 2.0).unwrap();
        let r = random_tensor(&[4, 3, 32, 32], 4, &dev).unwrap();
        let v = random_tensor(&[4, 3, 32, 32], 5, &dev).unwrap();
        let derivatives = |dtype: DType| -> (Tensor, Tensor) {
            crate::tensor::second_order::ensure_second_order().unwrap();
            let xv = candle_core::Var::from_tensor(&x.to_dtype(dtype).unwrap()).unwrap();
            let y = softmax(&xv, None, 1.0)
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap();
            let s = ((&y * &r).unwrap().sum_all().unwrap()
                + (y.sqr().unwrap().sum_all().unwrap() * 10.0).unwrap())
            .unwrap();
            let g = s.backward().unwrap().get(&xv).unwrap().clone();
            let gv = (g.to_dtype(DType::F64).unwrap() * &v)
                .unwrap()
                .sum_all()
                .unwrap();
            let hv = gv.backward().unwrap().get(&xv).unwrap().clone();
            (
                g.to_dtype(DType::F64).unwrap(),
                hv.to_dtype(DType::F64).unwrap(),
            )
        };
        let relative = |a: &Tensor, b: &Tensor| -> f64 {
            let num = (a - b).unwrap().sqr().unwrap().sum_all().unwrap();
            let den = b.sqr().unwrap().sum_all().unwrap();
            (num / den)
                .unwrap()
                .sqrt()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let (g64, hv64) = derivatives(DType::F64);
        // Measured: bf16 9.7e-3 and 8.6e-3, f16 1.1e-3 and 1.2e-3 (the rounding of the
        // inputs dominates; candle's bf16 sums give 1.3e-2 and 1.1e-2).
        for (dtype, tolerance) in [(DType::BF16, 1.2e-2), (DType::F16, 1.5e-3)] {
            let (g, hv) = derivatives(dtype);
            let (eg, ehv) = (relative(&g, &g64), relative(&hv, &hv64));
            assert!(eg < tolerance && ehv < tolerance, "{dtype:?}: {eg} {ehv}");
        }
    }
}
