//! Layer normalisation as one op: the forward pass makes one tensor and keeps only
//! its input for the backward, whose formula is written with differentiable tensor
//! ops (so second derivatives are exact) instead of a chain of seven retained
//! intermediates.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, D};

use super::rows::map_rows;

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
    /// dx = (ĝ − mean(ĝ) − x̂·mean(ĝ·x̂)) / σ, dγ = Σ grad·x̂, dβ = Σ grad.
    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let centered = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
        let rstd = (centered.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?
            .sqrt()?
            .recip()?;
        let normed = centered.broadcast_mul(&rstd)?;
        let g_hat = grad.broadcast_mul(gamma)?;
        let dx = g_hat
            .broadcast_sub(&g_hat.mean_keepdim(D::Minus1)?)?
            .sub(&normed.broadcast_mul(&(&g_hat * &normed)?.mean_keepdim(D::Minus1)?)?)?
            .broadcast_mul(&rstd)?;
        let width = x.dim(D::Minus1)?;
        let rows = x.elem_count() / width;
        let d_gamma = (grad * &normed)?.reshape((rows, width))?.sum(0)?;
        let d_beta = grad.reshape((rows, width))?.sum(0)?;
        Ok((Some(dx), Some(d_gamma), Some(d_beta)))
    }
}

/// Fused layer normalisation over the last dimension (see [`super::norm::layer_norm`]).
pub(crate) fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op3(
        &gamma.contiguous()?,
        &beta.contiguous()?,
        LayerNormOp { eps },
    )
}
