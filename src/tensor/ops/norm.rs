//! Normalisation layers over the last dimension, composed from primitives so that
//! they are differentiable to any order (candle's fused norms return no gradient).

use candle_core::{DType, Result, Tensor, D};

/// Layer normalisation over the last dimension:
/// `(x − mean) / √(var + eps) · gamma + beta`, with the biased variance (PyTorch's
/// `nn.LayerNorm`).
///
/// One fused op: the forward keeps only its input; the backward is written with
/// differentiable tensor ops, so second derivatives are exact.
pub fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    super::fused_norm::layer_norm(x, gamma, beta, eps)
}

/// T5's layer norm (RMS norm): `x / √(mean(x²) + eps) · weight`, with no mean
/// subtraction and no bias.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if matches!(x.dtype(), DType::BF16 | DType::F16) {
        // candle sums bf16/f16 rows in their own type, which loses the mean square:
        // compute in f32 (the composite keeps f32 intermediates for its backward).
        let x32 = x.to_dtype(DType::F32)?;
        return rms_norm(&x32, &weight.to_dtype(DType::F32)?, eps)?.to_dtype(x.dtype());
    }
    let mean_square = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(mean_square + eps)?.sqrt()?)?
        .broadcast_mul(weight)
}

/// Batch normalisation of `x` `[n, c, ...]` with the statistics of this batch (mean
/// and biased variance per channel over every other dimension), then `gamma`, `beta`
/// per channel: MAML's transductive BatchNorm, with no running statistics.
///
/// Each channel's values are one row of a [`layer_norm`] without its own scale and
/// shift: the fused op computes the statistics in f64 whatever `x`'s dtype (a bf16
/// sum over a channel's hundred thousand values would keep two digits), keeps only
/// its input for the backward pass instead of the composite formula's five
/// input-sized intermediates, and is exact to second order.
pub fn batch_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    let dims = x.dims();
    if dims.len() < 2 {
        candle_core::bail!("batch norm needs [batch, channels, ...], got {dims:?}");
    }
    let c = dims[1];
    if gamma.elem_count() != c || beta.elem_count() != c {
        candle_core::bail!(
            "batch norm: {c} channels but gamma/beta have {}/{}",
            gamma.elem_count(),
            beta.elem_count()
        );
    }
    // Channels first, everything else flattened: a channel's statistics are a row's.
    let moved = x.transpose(0, 1)?.contiguous()?;
    let per_channel = moved.elem_count() / c;
    let flat = moved.reshape((c, per_channel))?;
    let unit = Tensor::ones(per_channel, x.dtype(), x.device())?;
    let normed = layer_norm(&flat, &unit, &unit.zeros_like()?, eps)?;
    let scaled = normed
        .broadcast_mul(&gamma.to_dtype(x.dtype())?.reshape((c, 1))?)?
        .broadcast_add(&beta.to_dtype(x.dtype())?.reshape((c, 1))?)?;
    let mut moved_dims = dims.to_vec();
    moved_dims.swap(0, 1);
    scaled.reshape(moved_dims)?.transpose(0, 1)?.contiguous()
}

/// Batch normalisation of `x` `[n, c, ...]` with fixed per-channel statistics
/// `mean`, `var` `[c]` (running statistics, as in evaluation): `(x − mean)/√(var +
/// eps)·gamma + beta`, one per-channel scale and shift computed in `gamma`'s dtype,
/// differentiable in `x`, `gamma` and `beta` to any order (the statistics are
/// constants).
pub fn batch_norm_with_statistics(
    x: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let dims = x.dims();
    let c = if dims.len() >= 2 { dims[1] } else { 0 };
    if c == 0 || [mean, var, gamma, beta].iter().any(|t| t.elem_count() != c) {
        candle_core::bail!(
            "batch norm with statistics: input {dims:?}, mean/var/gamma/beta of {}/{}/{}/{} \
             channels",
            mean.elem_count(),
            var.elem_count(),
            gamma.elem_count(),
            beta.elem_count()
        );
    }
    let work = gamma.dtype();
    // Statistics estimated on the host reach the parameters' device here.
    let (mean, var) = (
        mean.to_device(gamma.device())?,
        var.to_device(gamma.device())?,
    );
    let inv_std = (var.detach() + eps)?.sqrt()?.recip()?.to_dtype(work)?;
    let scale = gamma.mul(&inv_std)?;
    let shift = beta.sub(&mean.detach().to_dtype(work)?.mul(&scale)?)?;
    let mut shape = vec![1; dims.len()];
    shape[1] = c;
    let scale = scale.reshape(shape.as_slice())?.to_dtype(x.dtype())?;
    let shift = shift.reshape(shape.as_slice())?.to_dtype(x.dtype())?;
    x.broadcast_mul(&scale)?.broadcast_add(&shift)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::gradcheck::random_tensor;
    use candle_core::Device;

    #[test]
    fn layer_norm_normalises() {
        let dev = Device::Cpu;
        let x = random_tensor(&[3, 8], 1, &dev).unwrap();
        let ones = Tensor::ones(8, candle_core::DType::F64, &dev).unwrap();
        let zeros = ones.zeros_like().unwrap();
        let y = layer_norm(&x, &ones, &zeros, 1e-12).unwrap();
        for row in y.to_vec2::<f64>().unwrap() {
            let mean = row.iter().sum::<f64>() / 8.0;
            let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 8.0;
            assert!(
                mean.abs() < 1e-14 && (var - 1.0).abs() < 1e-10,
                "{mean} {var}"
            );
        }
    }

    #[test]
    fn batch_norm_normalises_each_channel_over_the_batch() {
        let dev = Device::Cpu;
        let x = random_tensor(&[4, 3, 2, 2], 7, &dev).unwrap();
        let ones = Tensor::ones(3, candle_core::DType::F64, &dev).unwrap();
        let y = batch_norm(&x, &ones, &ones.zeros_like().unwrap(), 0.0).unwrap();
        for ch in 0..3 {
            let v: Vec<f64> = y
                .narrow(1, ch, 1)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let mean = v.iter().sum::<f64>() / v.len() as f64;
            let var = v.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / v.len() as f64;
            assert!(
                mean.abs() < 1e-14 && (var - 1.0).abs() < 1e-12,
                "{mean} {var}"
            );
        }
    }

    #[test]
    fn rms_norm_matches_formula() {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[3.0f64, 4.0]], &dev).unwrap();
        let w = Tensor::new(&[1.0f64, 2.0], &dev).unwrap();
        let y = rms_norm(&x, &w, 0.0).unwrap().to_vec2::<f64>().unwrap();
        let rms = (12.5f64).sqrt();
        assert!((y[0][0] - 3.0 / rms).abs() < 1e-15 && (y[0][1] - 8.0 / rms).abs() < 1e-15);
    }
}
