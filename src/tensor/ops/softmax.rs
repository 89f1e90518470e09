//! Softmax and log-softmax over the last dimension, with optional masking.

use candle_core::{DType, Result, Tensor, D};

use super::keep_mask_u8;

/// Softmax over the last dimension. The maximum subtracted for numerical stability is
/// detached: softmax does not depend on it, so its derivative terms would cancel.
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    let shifted = x.broadcast_sub(&x.detach().max_keepdim(D::Minus1)?)?;
    let e = shifted.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Softmax over the last dimension where `keep` (any numeric dtype, broadcastable to
/// `x`, non-zero = keep) selects the entries that take part; the others get
/// probability exactly 0 and no gradient. A row with nothing kept comes out uniform
/// rather than NaN.
pub fn masked_softmax(x: &Tensor, keep: &Tensor) -> Result<Tensor> {
    let keep = keep_mask_u8(keep)?.broadcast_as(x.shape())?;
    let fill = Tensor::new(masked_fill_value(x.dtype()), x.device())?
        .to_dtype(x.dtype())?
        .broadcast_as(x.shape())?;
    softmax(&keep.where_cond(x, &fill)?)
}

/// Log-softmax over the last dimension: `x − max − log Σ exp(x − max)`.
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let shifted = x.broadcast_sub(&x.detach().max_keepdim(D::Minus1)?)?;
    let log_sum = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&log_sum)
}

/// A finite stand-in for −∞: far below any real score, so `exp` underflows to 0, yet
/// finite so that a fully masked row does not produce `∞ − ∞`.
fn masked_fill_value(dtype: DType) -> f64 {
    match dtype {
        DType::F16 => -6.0e4,
        DType::BF16 | DType::F32 => -1.0e30,
        _ => -1.0e300,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::gradcheck::random_tensor;
    use candle_core::Device;

    #[test]
    fn masked_entries_get_zero_probability() {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[1.0f64, 2.0, 3.0], [0.5, 0.5, 9.0]], &dev).unwrap();
        let keep = Tensor::new(&[[1u32, 1, 0], [0, 0, 0]], &dev).unwrap();
        let p = masked_softmax(&x, &keep).unwrap().to_vec2::<f64>().unwrap();
        let z = 1.0 + 1.0f64.exp();
        assert!((p[0][0] - 1.0 / z).abs() < 1e-15);
        assert!((p[0][1] - 1.0f64.exp() / z).abs() < 1e-15);
        assert_eq!(p[0][2], 0.0);
        assert!(
            p[1].iter().all(|v| (v - 1.0 / 3.0).abs() < 1e-15),
            "{:?}",
            p[1]
        );
    }

    #[test]
    fn log_softmax_is_log_of_softmax() {
        let x = random_tensor(&[3, 4], 1, &Device::Cpu).unwrap();
        let a = log_softmax(&x).unwrap();
        let b = softmax(&x).unwrap().log().unwrap();
        let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f64>().unwrap() < 1e-14);
    }
}
