//! Softmax and log-softmax over the last dimension, with optional masking.

use candle_core::{Result, Tensor, D};

/// Softmax over the last dimension (one fused op).
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    super::fused_softmax::softmax(x, None, 1.0)
}

/// Softmax over the last dimension where `keep` (any numeric dtype, broadcastable to
/// `x` over whole rows, non-zero = keep) selects the entries that take part; the
/// others get probability exactly 0 and no gradient. A row with nothing kept comes out
/// all zeros (it attends to nothing), never NaN.
pub fn masked_softmax(x: &Tensor, keep: &Tensor) -> Result<Tensor> {
    super::fused_softmax::softmax(x, Some(keep), 1.0)
}

/// [`masked_softmax`] of `scale·x` as one op (attention's scaled scores, without a
/// scaled copy of them in the graph).
pub(crate) fn scaled_masked_softmax(x: &Tensor, scale: f64, keep: &Tensor) -> Result<Tensor> {
    super::fused_softmax::softmax(x, Some(keep), scale)
}

/// Log-softmax over the last dimension: `x − max − log Σ exp(x − max)`.
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let shifted = x.broadcast_sub(&x.detach().max_keepdim(D::Minus1)?)?;
    let log_sum = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&log_sum)
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
        assert!(p[1].iter().all(|&v| v == 0.0), "{:?}", p[1]);
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
