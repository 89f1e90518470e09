//! Matrix products and affine layers.

use candle_core::{Result, Tensor};

/// Matrix product over the last two dimensions with the leading (batch) dimensions
/// broadcast, e.g. `[b, h, t, d] × [d, e]` or `[b, 1, t, d] × [b, h, d, e]`.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    a.broadcast_matmul(b)
}

/// `x·Wᵀ + b` for a weight stored `[out, in]` (PyTorch's `nn.Linear`), over any number
/// of leading dimensions of `x` `[..., in]`.
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    affine(x, &weight.t()?, bias)
}

/// `x·Wᵀ + b` for a frozen weight stored `[out, in]`: the backward returns the input's
/// gradient only (no GEMM or buffer for the weight's).
pub fn frozen_linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    super::frozen_linear::frozen_linear(x, weight, bias, super::frozen_linear::Stored::OutIn)
}

/// `x·W + b` for a frozen weight stored `[in, out]` (GPT-2's `Conv1D`); input gradient
/// only.
pub fn frozen_linear_in_out(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    super::frozen_linear::frozen_linear(x, weight, bias, super::frozen_linear::Stored::InOut)
}

/// `x·W + b` for a weight stored `[in, out]` (GPT-2's `Conv1D`).
pub fn linear_in_out(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    affine(x, weight, bias)
}

/// `x·W + b` with `W` `[in, out]`, folding the leading dimensions of `x` into one
/// matrix product (one GEMM instead of a batch of small ones).
fn affine(x: &Tensor, w_in_out: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (n_in, n_out) = w_in_out.dims2()?;
    let dims = x.dims();
    let Some((&last, lead)) = dims.split_last() else {
        candle_core::bail!("linear: input is a scalar, expected [..., {n_in}]");
    };
    if last != n_in {
        candle_core::bail!("linear: input has {last} features, the weight expects {n_in}");
    }
    let rows: usize = lead.iter().product();
    let y = x.reshape((rows, n_in))?.matmul(w_in_out)?;
    let y = match bias {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    let mut out = lead.to_vec();
    out.push(n_out);
    y.reshape(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::gradcheck::random_tensor;
    use candle_core::Device;

    #[test]
    fn linear_matches_explicit_sum() {
        let dev = Device::Cpu;
        let x = random_tensor(&[2, 3, 4], 1, &dev).unwrap();
        let w = random_tensor(&[5, 4], 2, &dev).unwrap();
        let b = random_tensor(&[5], 3, &dev).unwrap();
        let y = linear(&x, &w, Some(&b)).unwrap();
        assert_eq!(y.dims(), &[2, 3, 5]);
        let (xv, wv, bv) = (
            x.to_vec3::<f64>().unwrap(),
            w.to_vec2::<f64>().unwrap(),
            b.to_vec1::<f64>().unwrap(),
        );
        let yv = y.to_vec3::<f64>().unwrap();
        for i in 0..2 {
            for t in 0..3 {
                for o in 0..5 {
                    let expect: f64 = bv[o] + (0..4).map(|k| xv[i][t][k] * wv[o][k]).sum::<f64>();
                    assert!((yv[i][t][o] - expect).abs() < 1e-13);
                }
            }
        }
        let y2 = linear_in_out(&x, &w.t().unwrap(), Some(&b)).unwrap();
        let diff = (y - y2).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f64>().unwrap() < 1e-14);
    }

    #[test]
    fn wrong_width_is_a_clear_error() {
        let x = random_tensor(&[2, 3], 1, &Device::Cpu).unwrap();
        let w = random_tensor(&[5, 4], 2, &Device::Cpu).unwrap();
        let err = linear(&x, &w, None).unwrap_err().to_string();
        assert!(
            err.contains("3 features") && err.contains("expects 4"),
            "{err}"
        );
    }
}
