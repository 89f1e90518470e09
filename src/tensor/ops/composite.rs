//! The fused ops' formulas written with candle's differentiable tensor ops, for
//! devices where melora has no kernel of its own (CUDA): the same values, and
//! derivatives of every order from candle's backward pass, so second order stays
//! exact. They keep more intermediates alive than the fused ops do (what the fused
//! ops exist to avoid on the CPU); the memory figures of the README are the fused
//! ops'.
//!
//! Each fused op's entry point sends tensors on other devices here
//! ([`fused_kernels`]); the tests hold each formula to its fused op on the CPU, in
//! value and in finite-difference first derivatives and Hessian-vector products.

use candle_core::{DType, Device, Result, Tensor, D};

use super::frozen_linear::{FrozenMatrix, Stored};
use super::fused_norm::{normalised, work_dtype};
use super::pointwise::Pointwise;
use super::quantized::Int8Matrix;

/// Whether `device` runs melora's fused kernels (the CPU's); elsewhere the ops are
/// the compositions of this module.
pub(crate) fn fused_kernels(device: &Device) -> bool {
    device.is_cpu()
}

const FRAC_1_SQRT_2PI: f64 = 0.398_942_280_401_432_7;
const GELU_TANH_C: f64 = 0.797_884_560_802_865_4; // √(2/π)
const GELU_TANH_A: f64 = 0.044_715;

/// `1 / (1 + e^(−x))` as `(1 + tanh(x/2)) / 2`: the same function, with no overflow
/// of `e^(−x)` for very negative `x` (whose backward would multiply 0 by ∞).
fn sigmoid(x: &Tensor) -> Result<Tensor> {
    ((x * 0.5)?.tanh()? + 1.0)? * 0.5
}

/// The standard normal CDF `Φ(x) = (1 + erf(x/√2)) / 2`.
fn normal_cdf(x: &Tensor) -> Result<Tensor> {
    ((x * std::f64::consts::FRAC_1_SQRT_2)?.erf()? + 1.0)? * 0.5
}

/// `function` applied element-wise to `x` ([`super::pointwise::pointwise`]).
pub(crate) fn pointwise(x: &Tensor, function: Pointwise) -> Result<Tensor> {
    match function {
        Pointwise::GeluErf => x * normal_cdf(x)?,
        Pointwise::GeluTanh => {
            let inner = ((x + (x.powf(3.0)? * GELU_TANH_A)?)? * GELU_TANH_C)?;
            (x * 0.5)? * (inner.tanh()? + 1.0)?
        }
        Pointwise::Sigmoid => sigmoid(x),
        Pointwise::Silu => x * sigmoid(x)?,
    }
}

/// `function′` applied element-wise to `x` ([`super::pointwise::pointwise_derivative`]).
pub(crate) fn pointwise_derivative(x: &Tensor, function: Pointwise) -> Result<Tensor> {
    match function {
        // Φ(x) + x·φ(x)
        Pointwise::GeluErf => {
            let pdf = ((x.sqr()? * -0.5)?.exp()? * FRAC_1_SQRT_2PI)?;
            normal_cdf(x)? + (x * pdf)?
        }
        // (1 + t)/2 + x/2·(1 − t²)·c·(1 + 3a·x²), t = tanh(c·(x + a·x³))
        Pointwise::GeluTanh => {
            let x2 = x.sqr()?;
            let t = (((x * &x2)? * GELU_TANH_A)? + x)?
                .affine(GELU_TANH_C, 0.0)?
                .tanh()?;
            let dinner = (x2.affine(3.0 * GELU_TANH_A, 1.0)? * GELU_TANH_C)?;
            let sech2 = t.sqr()?.affine(-1.0, 1.0)?;
            ((t + 1.0)? * 0.5)? + ((x * 0.5)? * sech2)?.mul(&dinner)?
        }
        // s·(1 − s)
        Pointwise::Sigmoid => {
            let s = sigmoid(x)?;
            &s * s.affine(-1.0, 1.0)?
        }
        // s + x·s·(1 − s)
        Pointwise::Silu => {
            let s = sigmoid(x)?;
            let ds = (&s * s.affine(-1.0, 1.0)?)?;
            s + (x * ds)?
        }
    }
}

/// Softmax of `scale·x` over the last dimension, entries with a zero in `keep`
/// excluded, rows with nothing kept all zero ([`super::fused_softmax::softmax`]).
/// Half precision computes in f32.
pub(crate) fn softmax(x: &Tensor, keep: Option<&Tensor>, scale: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let z = (x.to_dtype(work_dtype(dtype))? * scale)?;
    let kept = keep
        .map(|k| k.ne(0f64)?.to_dtype(z.dtype())?.broadcast_as(z.shape()))
        .transpose()?;
    // Softmax does not change when a row is shifted, so the shift (the row's largest
    // kept score) is a constant: detached, exact at every order.
    let shift = match &kept {
        Some(m) => {
            // Masked entries lowered to their row's smallest score, so only kept
            // ones count.
            let lowest = z.detach().min_keepdim(D::Minus1)?;
            let above = z.detach().broadcast_sub(&lowest)?;
            (above * m)?
                .broadcast_add(&lowest)?
                .max_keepdim(D::Minus1)?
        }
        None => z.detach().max_keepdim(D::Minus1)?,
    };
    let mut e = z.broadcast_sub(&shift)?.exp()?;
    if let Some(m) = &kept {
        e = (e * m)?;
    }
    // A row with nothing kept sums to 0: divided by 1 instead, it stays 0.
    let sum = e.sum_keepdim(D::Minus1)?;
    let empty = sum.eq(0f64)?.to_dtype(sum.dtype())?.detach();
    e.broadcast_div(&(sum + empty)?)?.to_dtype(dtype)
}

/// The input gradient `scale·p ⊙ (g − Σ g⊙p)` of a softmax of `scale·x` with output
/// `p` ([`super::fused_softmax::scaled_softmax_backward`]); f32 for half precision.
pub(crate) fn scaled_softmax_backward(p: &Tensor, g: &Tensor, scale: f64) -> Result<Tensor> {
    let work = work_dtype(p.dtype());
    let (pw, gw) = (p.to_dtype(work)?, g.to_dtype(work)?);
    let s = (&gw * &pw)?.sum_keepdim(D::Minus1)?;
    let d = (pw * gw.broadcast_sub(&s)?)?;
    let d = if scale != 1.0 { (d * scale)? } else { d };
    d.to_dtype(p.dtype())
}

/// Layer normalisation over the last dimension ([`super::norm::layer_norm`]); the
/// statistics in f32 for half precision (f64 for f64).
pub(crate) fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let (normed, _) = normalised(&x.to_dtype(work_dtype(dtype))?, eps)?;
    let gamma = gamma.to_dtype(normed.dtype())?;
    let beta = beta.to_dtype(normed.dtype())?;
    let out = normed.broadcast_mul(&gamma)?.broadcast_add(&beta)?;
    if dtype == DType::F64 {
        Ok(out)
    } else {
        out.to_dtype(dtype)
    }
}

/// `x·Wᵀ + b` for a frozen `W` stored as `stored` or, `transposed`, the input
/// gradient `g·W` of that map ([`super::frozen_linear::frozen_linear_matrix`] and
/// [`super::frozen_linear::frozen_linear_matrix_transposed`]): a product with the
/// dense matrix, moved to `x`'s device and dtype (an int8 matrix dequantized on the
/// host first). `W` is a constant, so only `x` gets a gradient.
pub(crate) fn frozen_linear(
    x: &Tensor,
    weight: &FrozenMatrix,
    bias: Option<&Tensor>,
    stored: Stored,
    transposed: bool,
) -> Result<Tensor> {
    let w = weight
        .to_dense()?
        .to_device(x.device())?
        .to_dtype(x.dtype())?
        .detach();
    // The right factor `[width, out_width]` of the row-major product.
    let right = match (stored, transposed) {
        (Stored::OutIn, false) | (Stored::InOut, true) => w.t()?,
        (Stored::OutIn, true) | (Stored::InOut, false) => w,
    };
    let (width, out_width) = right.dims2()?;
    let mut dims = x.dims().to_vec();
    let last = dims.last_mut().expect("a linear map's input has rank ≥ 1");
    if *last != width {
        candle_core::bail!("linear: input has {last} features, the weight expects {width}");
    }
    *last = out_width;
    let rows = x.elem_count() / width;
    let mut y = x.reshape((rows, width))?.matmul(&right)?;
    if let Some(b) = bias {
        y = y.broadcast_add(&b.to_dtype(y.dtype())?)?;
    }
    y.reshape(dims)
}

/// Rows of the int8 `table` at `ids`, dequantized to `dtype`
/// ([`super::quantized::int8_embedding`]): the dense table, dequantized on the host
/// and moved to `ids`' device, indexed there.
pub(crate) fn int8_embedding(ids: &Tensor, table: &Int8Matrix, dtype: DType) -> Result<Tensor> {
    let dense = table.to_tensor(dtype)?.to_device(ids.device())?;
    let mut dims = ids.dims().to_vec();
    dims.push(table.dims().1);
    dense.index_select(&ids.flatten_all()?, 0)?.reshape(dims)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::gradcheck::{check_derivatives, random_tensor};
    use crate::tensor::test_support::max_abs_diff;

    fn inputs(shape: &[usize], seed: u64, spread: f64) -> Tensor {
        (random_tensor(shape, seed, &Device::Cpu).unwrap() * spread).unwrap()
    }

    const FUNCTIONS: [Pointwise; 4] = [
        Pointwise::GeluErf,
        Pointwise::GeluTanh,
        Pointwise::Sigmoid,
        Pointwise::Silu,
    ];

    /// Each activation and its derivative as tensor ops: the fused op's values in
    /// f64, its values in f32 up to f32 rounding, and exact first derivatives and
    /// Hessian-vector products.
    #[test]
    fn pointwise_compositions_match_the_fused_ops() {
        let x = inputs(&[4, 6], 3, 3.0);
        for f in FUNCTIONS {
            let fused = super::super::pointwise::pointwise(&x, f).unwrap();
            let composed = pointwise(&x, f).unwrap();
            assert!(max_abs_diff(&fused, &composed) < 1e-14, "{f:?}");
            let fused_d = super::super::pointwise::pointwise_derivative(&x, f).unwrap();
            let composed_d = pointwise_derivative(&x, f).unwrap();
            assert!(max_abs_diff(&fused_d, &composed_d) < 1e-14, "{f:?}′");

            let x32 = x.to_dtype(DType::F32).unwrap();
            let composed32 = pointwise(&x32, f).unwrap().to_dtype(DType::F64).unwrap();
            assert!(max_abs_diff(&fused, &composed32) < 1e-5, "{f:?} in f32");

            for g in [
                check_derivatives(std::slice::from_ref(&x), |t| pointwise(&t[0], f)),
                check_derivatives(std::slice::from_ref(&x), |t| pointwise_derivative(&t[0], f)),
            ] {
                let errors = g.unwrap();
                assert!(
                    errors.first_order < 1e-6 && errors.second_order < 1e-4,
                    "{f:?}: {errors:?}"
                );
            }
        }
        // Far in the tails: no overflow, no NaN in the gradient.
        let tails = Tensor::new(&[-800f32, -60.0, 60.0, 800.0], &Device::Cpu).unwrap();
        for f in FUNCTIONS {
            let var = candle_core::Var::from_tensor(&tails).unwrap();
            let y = pointwise(var.as_tensor(), f).unwrap().sum_all().unwrap();
            let grads = y.backward().unwrap();
            let g = grads
                .get(var.as_tensor())
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert!(g.iter().all(|v| v.is_finite()), "{f:?}: {g:?}");
        }
    }

    /// The masked, scaled softmax and its input gradient as tensor ops: the fused
    /// ops' values (fully masked rows all zero), exact derivatives.
    #[test]
    fn softmax_composition_matches_the_fused_op() {
        let x = inputs(&[2, 3, 5], 7, 4.0);
        let mut keep = vec![1u8; 3 * 5];
        keep[1] = 0;
        keep[7] = 0;
        keep[10..15].fill(0); // the last row of each batch attends to nothing
        let keep = Tensor::from_vec(keep, (3, 5), &Device::Cpu).unwrap();
        for (mask, scale) in [(None, 1.0), (Some(&keep), 0.35)] {
            let fused = super::super::fused_softmax::softmax(&x, mask, scale).unwrap();
            let composed = softmax(&x, mask, scale).unwrap();
            assert!(max_abs_diff(&fused, &composed) < 1e-15);
            let errors =
                check_derivatives(std::slice::from_ref(&x), |t| softmax(&t[0], mask, scale))
                    .unwrap();
            assert!(
                errors.first_order < 1e-6 && errors.second_order < 1e-4,
                "{errors:?}"
            );
        }
        let p = softmax(&x, None, 0.35).unwrap();
        let g = inputs(&[2, 3, 5], 8, 1.0);
        let fused = super::super::fused_softmax::scaled_softmax_backward(&p, &g, 0.35).unwrap();
        let composed = scaled_softmax_backward(&p, &g, 0.35).unwrap();
        assert!(max_abs_diff(&fused, &composed) < 1e-15);
        let errors =
            check_derivatives(&[p, g], |t| scaled_softmax_backward(&t[0], &t[1], 0.35)).unwrap();
        assert!(
            errors.first_order < 1e-6 && errors.second_order < 1e-4,
            "{errors:?}"
        );
    }

    /// The frozen linear map and its transpose as matrix products, dense and int8,
    /// both storage orders: the fused ops' values, exact derivatives in the input.
    #[test]
    fn frozen_linear_composition_matches_the_fused_op() {
        use super::super::frozen_linear::{frozen_linear_matrix, frozen_linear_matrix_transposed};
        let x = inputs(&[2, 3, 4], 21, 1.0);
        let g = inputs(&[2, 3, 5], 22, 1.0);
        let bias = inputs(&[5], 23, 1.0);
        for stored in [Stored::OutIn, Stored::InOut] {
            let w = match stored {
                Stored::OutIn => inputs(&[5, 4], 24, 1.0),
                Stored::InOut => inputs(&[4, 5], 24, 1.0),
            };
            let int8 = std::sync::Arc::new(Int8Matrix::quantize(&w, stored).unwrap());
            for matrix in [FrozenMatrix::Dense(w.clone()), FrozenMatrix::Int8(int8)] {
                let fused = frozen_linear_matrix(&x, &matrix, Some(&bias), stored).unwrap();
                let composed = frozen_linear(&x, &matrix, Some(&bias), stored, false).unwrap();
                assert!(max_abs_diff(&fused, &composed) < 1e-12, "{stored:?}");
                let fused_t = frozen_linear_matrix_transposed(&g, &matrix, stored).unwrap();
                let composed_t = frozen_linear(&g, &matrix, None, stored, true).unwrap();
                assert!(max_abs_diff(&fused_t, &composed_t) < 1e-12, "{stored:?}ᵀ");
                let errors = check_derivatives(std::slice::from_ref(&x), |t| {
                    frozen_linear(&t[0], &matrix, Some(&bias), stored, false)
                })
                .unwrap();
                assert!(
                    errors.first_order < 1e-6 && errors.second_order < 1e-4,
                    "{errors:?}"
                );
            }
        }
        let wrong = inputs(&[2, 3], 25, 1.0);
        let dense = FrozenMatrix::Dense(inputs(&[5, 4], 24, 1.0));
        let err = frozen_linear(&wrong, &dense, None, Stored::OutIn, false).unwrap_err();
        assert!(err.to_string().contains("expects 4"), "{err}");
    }

    /// Int8 rows looked up on the dense table: the fused lookup's values.
    #[test]
    fn int8_embedding_composition_matches_the_fused_op() {
        let table = std::sync::Arc::new(
            Int8Matrix::quantize(&inputs(&[7, 3], 31, 1.0), Stored::OutIn).unwrap(),
        );
        let ids = Tensor::new(&[[0u32, 6, 2], [2, 2, 5]], &Device::Cpu).unwrap();
        for dtype in [DType::F64, DType::F32] {
            let fused = super::super::quantized::int8_embedding(&ids, &table, dtype).unwrap();
            let composed = int8_embedding(&ids, &table, dtype).unwrap();
            assert_eq!(composed.dims(), [2, 3, 3]);
            assert!(max_abs_diff(&fused, &composed) == 0.0, "{dtype:?}");
        }
    }

    /// Layer normalisation as tensor ops: the fused op's values in f64 and f32,
    /// exact derivatives in the input, scale and shift.
    #[test]
    fn layer_norm_composition_matches_the_fused_op() {
        let x = inputs(&[3, 4, 6], 11, 2.0);
        let gamma = (inputs(&[6], 12, 0.5) + 1.0).unwrap();
        let beta = inputs(&[6], 13, 0.5);
        let fused = super::super::fused_norm::layer_norm(&x, &gamma, &beta, 1e-5).unwrap();
        let composed = layer_norm(&x, &gamma, &beta, 1e-5).unwrap();
        assert!(max_abs_diff(&fused, &composed) < 1e-13);
        let to32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let composed32 = layer_norm(&to32(&x), &to32(&gamma), &to32(&beta), 1e-5)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        assert!(max_abs_diff(&fused, &composed32) < 1e-5);
        let errors =
            check_derivatives(&[x, gamma, beta], |t| layer_norm(&t[0], &t[1], &t[2], 1e-5))
                .unwrap();
        assert!(
            errors.first_order < 1e-6 && errors.second_order < 1e-4,
            "{errors:?}"
        );
    }
}
