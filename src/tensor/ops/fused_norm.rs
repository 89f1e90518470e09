//! Layer normalisation as one op: the forward pass makes one tensor and keeps only
//! its input for the backward (instead of a chain of seven retained intermediates),
//! whose formula has exact derivatives to second order and beyond.
//!
//! The input gradient is itself one op ([`LayerNormGradOp`]) computing each row in
//! f64: it keeps only its inputs in a graph that is differentiated again (the
//! composite formula would keep seven intermediates), and in half precision it keeps
//! the row means that candle's bf16/f16 sums lose (a 384-wide bf16 sum keeps about
//! two significant digits). Its own backward, the second derivative MAML
//! differentiates through, is written with tensor ops in the working dtype (f32 for
//! half precision) on copies that live only during the backward pass.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, D};

use super::rows::{map_rows, map_rows2};

fn vector_f64(storage: &CpuStorage, layout: &Layout) -> Result<Vec<f64>> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("fused op: expects a contiguous parameter");
    };
    Ok(match storage {
        CpuStorage::F64(v) => v[start..end].to_vec(),
        CpuStorage::F32(v) => v[start..end].iter().map(|&x| x as f64).collect(),
        CpuStorage::BF16(v) => v[start..end].iter().map(|x| x.to_f64()).collect(),
        CpuStorage::F16(v) => v[start..end].iter().map(|x| x.to_f64()).collect(),
        _ => candle_core::bail!("fused op: floating-point parameter expected"),
    })
}

struct LayerNormOp {
    eps: f64,
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "layer-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        gamma: &CpuStorage,
        gamma_layout: &Layout,
        beta: &CpuStorage,
        beta_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let width = x_layout.dims().last().copied().unwrap_or(1);
        let (gamma, beta) = (
            vector_f64(gamma, gamma_layout)?,
            vector_f64(beta, beta_layout)?,
        );
        if gamma.len() != width || beta.len() != width {
            candle_core::bail!(
                "layer norm: {width} features but gamma/beta have {}/{}",
                gamma.len(),
                beta.len()
            );
        }
        let out = map_rows(x, x_layout, width, |_, row, out| {
            let mean = row.iter().sum::<f64>() / width as f64;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / width as f64;
            let rstd = 1.0 / (var + self.eps).sqrt();
            for j in 0..width {
                out[j] = (row[j] - mean) * rstd * gamma[j] + beta[j];
            }
        })?;
        Ok((out, x_layout.shape().clone()))
    }

    /// With x̂ = (x − μ)/σ and ĝ = grad·γ (means over the last dimension):
    /// dx = (ĝ − mean(ĝ) − x̂·mean(ĝ·x̂)) / σ (one op, [`LayerNormGradOp`]),
    /// dγ = Σ grad·x̂, dβ = Σ grad.
    ///
    /// `dx` is one op in every dtype: written with tensor ops it would keep about
    /// seven input-sized intermediates per layer norm for as long as a kept graph
    /// lives (full-graph MAML keeps K of them), and in half precision candle's row
    /// sums would lose the means. The scale's and shift's gradients (only when they
    /// are trained) are tensor ops in the working dtype.
    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dx = layer_norm_grad(x, gamma, grad, self.eps)?;
        let width = x.dim(D::Minus1)?;
        let rows = x.elem_count() / width;
        let work = work_dtype(x.dtype());
        let grad_w = || grad.to_dtype(work)?.reshape((rows, width));
        // A frozen scale or shift (every transformer's) needs no gradient: skipping it
        // saves two row reductions and their graph.
        let d_gamma = if gamma.track_op() {
            let (normed, _) = normalised(&x.to_dtype(work)?, self.eps)?;
            let sum = (grad_w()? * normed.reshape((rows, width))?)?.sum(0)?;
            Some(light(sum.to_dtype(gamma.dtype())?))
        } else {
            None
        };
        let d_beta = beta
            .track_op()
            .then(|| Ok::<_, candle_core::Error>(light(grad_w()?.sum(0)?.to_dtype(beta.dtype())?)))
            .transpose()?;
        Ok((Some(dx), d_gamma, d_beta))
    }
}

/// A backward result as the pass needs it: with its graph where it may be
/// differentiated again, detached (its working-dtype intermediates freed at once)
/// where the pass detaches every gradient anyway.
pub(crate) fn light(t: Tensor) -> Tensor {
    if crate::tensor::second_order::backward_keeps_graph() {
        t
    } else {
        t.detach()
    }
}

/// The type the second-order formulas of half-precision ops compute in.
pub(crate) fn work_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// Per-row statistics of the layer-norm formulas, in the working dtype:
/// `(x̂, r)` with `r = 1/√(var + eps)` `[.., 1]` and `x̂ = (x − mean)·r`.
pub(crate) fn normalised(x: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    let centered = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    let rstd = (centered.sqr()?.mean_keepdim(D::Minus1)? + eps)?
        .sqrt()?
        .recip()?;
    Ok((centered.broadcast_mul(&rstd)?, rstd))
}

/// The input gradient of layer normalisation as one op, inputs `(x, gamma, grad)`:
/// with x̂ = (x − μ)·r, r = 1/√(var + eps), ĝ = grad·γ (means over a row),
/// `dx = r·(ĝ − mean(ĝ) − x̂·mean(ĝ·x̂))`, computed per row in f64 and returned in
/// `x`'s dtype. It keeps only its inputs.
struct LayerNormGradOp {
    eps: f64,
}

impl CustomOp3 for LayerNormGradOp {
    fn name(&self) -> &'static str {
        "layer-norm-backward"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        gamma: &CpuStorage,
        gamma_layout: &Layout,
        grad: &CpuStorage,
        grad_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let width = x_layout.dims().last().copied().unwrap_or(1);
        let gamma = vector_f64(gamma, gamma_layout)?;
        if gamma.len() != width {
            candle_core::bail!(
                "layer norm backward: {width} features, gamma has {}",
                gamma.len()
            );
        }
        let n = width as f64;
        let out = map_rows2((x, x_layout), (grad, grad_layout), width, |_, x, g, dx| {
            let mean = x.iter().sum::<f64>() / n;
            let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
            let r = 1.0 / (var + self.eps).sqrt();
            let (mut a, mut b) = (0.0, 0.0);
            for j in 0..width {
                let g_hat = g[j] * gamma[j];
                a += g_hat;
                b += g_hat * (x[j] - mean) * r;
            }
            let (a, b) = (a / n, b / n);
            for j in 0..width {
                dx[j] = r * (g[j] * gamma[j] - a - (x[j] - mean) * r * b);
            }
        })?;
        Ok((out, x_layout.shape().clone()))
    }

    /// The second derivative, for a cotangent `c` of `dx` (P(w) = w − mean(w) −
    /// x̂·mean(x̂·w), the projection the forward applies, is symmetric):
    /// - `d grad = γ·r·P(c)` and `d γ = Σ_rows grad·r·P(c)`, since dx = r·P(γ·grad);
    /// - `d x = −r²·((S/n)·x̂ + P(b·c + (C/n)·ĝ))` with `S = Σ c·dx/r`, `C = Σ c·x̂`,
    ///   `b = mean(ĝ·x̂)`, from δx̂ = r·P(δx) and δr = −r²·mean(x̂·δx).
    ///
    /// Written with tensor ops in the working dtype (f32, or f64), so it is exact to
    /// the next order too; in a pass that detaches, the results drop that graph at once
    /// (it would hold a dozen working-dtype copies per layer norm until the pass
    /// reaches the forward part).
    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        grad: &Tensor,
        _res: &Tensor,
        c: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let work = work_dtype(x.dtype());
        let (xw, gw, cw, gammaw) = (
            x.to_dtype(work)?,
            grad.to_dtype(work)?,
            c.to_dtype(work)?,
            gamma.to_dtype(work)?,
        );
        let n = x.dim(D::Minus1)? as f64;
        let (x_hat, r) = normalised(&xw, self.eps)?;
        let project = |w: &Tensor| -> Result<Tensor> {
            w.broadcast_sub(&w.mean_keepdim(D::Minus1)?)?
                .sub(&x_hat.broadcast_mul(&(&x_hat * w)?.mean_keepdim(D::Minus1)?)?)
        };
        let g_hat = gw.broadcast_mul(&gammaw)?;
        let b = (&g_hat * &x_hat)?.mean_keepdim(D::Minus1)?;
        let p_g = project(&g_hat)?; // dx / r
        let s = (&cw * &p_g)?.sum_keepdim(D::Minus1)?;
        let c_x = (&cw * &x_hat)?.sum_keepdim(D::Minus1)?;
        let w = (cw.broadcast_mul(&b)? + g_hat.broadcast_mul(&(c_x / n)?)?)?;
        let d_x = (x_hat.broadcast_mul(&(s / n)?)? + project(&w)?)?
            .broadcast_mul(&r.sqr()?)?
            .neg()?;
        let r_pc = project(&cw)?.broadcast_mul(&r)?;
        let d_grad = r_pc.broadcast_mul(&gammaw)?;
        let d_gamma = if gamma.track_op() {
            let width = x.dim(D::Minus1)?;
            let rows = x.elem_count() / width;
            let sum = (gw * &r_pc)?.reshape((rows, width))?.sum(0)?;
            Some(light(sum.to_dtype(gamma.dtype())?))
        } else {
            None
        };
        Ok((
            Some(light(d_x.to_dtype(x.dtype())?)),
            d_gamma,
            Some(light(d_grad.to_dtype(grad.dtype())?)),
        ))
    }
}

/// The input gradient of layer normalisation as one fused op (what its backward
/// uses).
fn layer_norm_grad(x: &Tensor, gamma: &Tensor, grad: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op3(
        &gamma.contiguous()?,
        &grad.contiguous()?,
        LayerNormGradOp { eps },
    )
}

/// Fused layer normalisation over the last dimension (see [`super::norm::layer_norm`]).
pub(crate) fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    if !super::composite::fused_kernels(x.device()) {
        return super::composite::layer_norm(x, gamma, beta, eps);
    }
    x.contiguous()?.apply_op3(
        &gamma.contiguous()?,
        &beta.contiguous()?,
        LayerNormOp { eps },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::gradcheck::{check_derivatives, random_tensor};
    use crate::tensor::test_support::max_abs_diff;
    use candle_core::{Device, Var};

    /// The fused input gradient equals candle's gradient of the layer norm written
    /// with tensor ops, and its own derivatives (in x, gamma and grad) match finite
    /// differences at first and second order.
    #[test]
    fn fused_layer_norm_gradient_and_its_derivatives_are_exact() {
        let dev = Device::Cpu;
        let x = random_tensor(&[3, 6], 1, &dev).unwrap();
        let gamma = (random_tensor(&[6], 2, &dev).unwrap() + 1.0).unwrap();
        let beta = random_tensor(&[6], 3, &dev).unwrap();
        let grad = random_tensor(&[3, 6], 4, &dev).unwrap();
        let xv = Var::from_tensor(&x).unwrap();
        let (normed, _) = normalised(&xv, 1e-3).unwrap();
        let y = normed
            .broadcast_mul(&gamma)
            .unwrap()
            .broadcast_add(&beta)
            .unwrap();
        let store = (y * &grad).unwrap().sum_all().unwrap().backward().unwrap();
        let reference = store.get(&xv).unwrap();
        let fused = layer_norm_grad(&x, &gamma, &grad, 1e-3).unwrap();
        let diff = max_abs_diff(reference, &fused);
        assert!(diff < 1e-13, "{diff}");
        // The op's own backward uses the fused gradient: the same values.
        let y = layer_norm(&xv, &gamma, &beta, 1e-3).unwrap();
        let store = (y * &grad).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(max_abs_diff(store.get(&xv).unwrap(), &fused) < 1e-15);
        let errors = check_derivatives(&[x, gamma, grad], |t| {
            layer_norm_grad(&t[0], &t[1], &t[2], 1e-3)
        })
        .unwrap();
        assert!(
            errors.first_order < 1e-6 && errors.second_order < 1e-4,
            "{errors:?}"
        );
    }

    /// In bf16/f16 the layer norm's gradient and a Hessian-vector product stay within a
    /// few roundings of the f64 ones, where candle's bf16 row sums would not.
    #[test]
    fn half_precision_layer_norm_derivatives_track_f64() {
        let dev = Device::Cpu;
        let width = 384;
        let x = (random_tensor(&[8, width], 5, &dev).unwrap() * 3.0).unwrap();
        let gamma = random_tensor(&[width], 6, &dev)
            .unwrap()
            .affine(0.1, 1.0)
            .unwrap();
        let beta = random_tensor(&[width], 7, &dev).unwrap();
        let r = random_tensor(&[8, width], 8, &dev).unwrap();
        let v = random_tensor(&[8, width], 9, &dev).unwrap();
        let derivatives = |dtype: DType| -> (Vec<f64>, Vec<f64>) {
            crate::tensor::second_order::ensure_second_order().unwrap();
            let xv = Var::from_tensor(&x.to_dtype(dtype).unwrap()).unwrap();
            let y = layer_norm(
                &xv,
                &gamma.to_dtype(dtype).unwrap(),
                &beta.to_dtype(dtype).unwrap(),
                1e-12,
            )
            .unwrap();
            // s = Σ r·y + ½ Σ y² (curvature through the quadratic term and the norm).
            let y32 = y.to_dtype(DType::F64).unwrap();
            let s = ((&y32 * &r).unwrap().sum_all().unwrap()
                + (y32.sqr().unwrap().sum_all().unwrap() * 0.5).unwrap())
            .unwrap();
            let g = s.backward().unwrap().get(&xv).unwrap().clone();
            let gv = (g.to_dtype(DType::F64).unwrap() * &v)
                .unwrap()
                .sum_all()
                .unwrap();
            let hv = gv.backward().unwrap().get(&xv).unwrap().clone();
            let flat = |t: &Tensor| {
                t.to_dtype(DType::F64)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap()
            };
            (flat(&g), flat(&hv))
        };
        let relative = |a: &[f64], b: &[f64]| {
            let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum();
            let den: f64 = b.iter().map(|y| y * y).sum();
            (num / den).sqrt()
        };
        let (g64, hv64) = derivatives(DType::F64);
        // Measured: bf16 4.6e-3 and 2.0e-2, f16 5.8e-4 and 2.5e-3; the same formulas in
        // candle's bf16 tensor ops give 4.3e-2 and 1.5e-1.
        for (dtype, first, second) in [(DType::BF16, 1e-2, 3e-2), (DType::F16, 2e-3, 6e-3)] {
            let (g, hv) = derivatives(dtype);
            let (eg, ehv) = (relative(&g, &g64), relative(&hv, &hv64));
            assert!(eg < first && ehv < second, "{dtype:?}: {eg} {ehv}");
        }
    }
}
