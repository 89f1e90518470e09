//! Fused element-wise activations with exact derivatives of every order MAML needs.
//!
//! A composite like `0.5·x·(1 + erf(x/√2))` keeps four intermediate tensors alive
//! for the backward pass; the fused op keeps only its input. Its backward is
//! `grad · f′(x)`, one op again (no separate `f′(x)` tensor), whose backward is
//! `grad · f″(x)` and `c · f′(x)`, and so on: gradients stay differentiable (second
//! order for MAML and Hessian-vector products, third for differentiating those),
//! with each level computed from closed-form scalar formulas.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

/// The fused functions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pointwise {
    /// `x·Φ(x)`, Φ the standard normal CDF (exact GELU).
    GeluErf,
    /// `0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³)))` (GPT-2's `gelu_new`).
    GeluTanh,
    /// `1 / (1 + e^(−x))`.
    Sigmoid,
    /// `x·σ(x)`.
    Silu,
}

/// Highest derivative order implemented; its backward is refused.
const MAX_ORDER: u8 = 3;

const GELU_TANH_C: f64 = 0.797_884_560_802_865_4; // √(2/π)
const GELU_TANH_A: f64 = 0.044_715;

fn normal_pdf(x: f64) -> f64 {
    (-0.5 * x * x).exp() * 0.398_942_280_401_432_7 // 1/√(2π)
}

fn sigmoid_derivatives(x: f64) -> [f64; 4] {
    let s = 1.0 / (1.0 + (-x).exp());
    let d1 = s * (1.0 - s);
    let d2 = d1 * (1.0 - 2.0 * s);
    let d3 = d2 * (1.0 - 2.0 * s) - 2.0 * d1 * d1;
    [s, d1, d2, d3]
}

impl Pointwise {
    /// The `order`-th derivative at `x`.
    pub(crate) fn derivative(self, order: u8, x: f64) -> f64 {
        match self {
            Pointwise::GeluErf => {
                let phi = normal_pdf(x);
                match order {
                    0 => 0.5 * x * (1.0 + libm::erf(x * std::f64::consts::FRAC_1_SQRT_2)),
                    1 => 0.5 * (1.0 + libm::erf(x * std::f64::consts::FRAC_1_SQRT_2)) + x * phi,
                    2 => phi * (2.0 - x * x),
                    _ => phi * (x * x * x - 4.0 * x),
                }
            }
            Pointwise::GeluTanh => {
                let (c, a) = (GELU_TANH_C, GELU_TANH_A);
                let u = c * (x + a * x * x * x);
                let (u1, u2, u3) = (c * (1.0 + 3.0 * a * x * x), 6.0 * a * c * x, 6.0 * a * c);
                let t = u.tanh();
                let t1 = (1.0 - t * t) * u1;
                let t2 = -2.0 * t * t1 * u1 + (1.0 - t * t) * u2;
                let t3 = -2.0 * t1 * t1 * u1 - 2.0 * t * t2 * u1 - 4.0 * t * t1 * u2
                    + (1.0 - t * t) * u3;
                match order {
                    0 => 0.5 * x * (1.0 + t),
                    1 => 0.5 * (1.0 + t) + 0.5 * x * t1,
                    2 => t1 + 0.5 * x * t2,
                    _ => 1.5 * t2 + 0.5 * x * t3,
                }
            }
            Pointwise::Sigmoid => sigmoid_derivatives(x)[order.min(3) as usize],
            Pointwise::Silu => {
                let [s, d1, d2, d3] = sigmoid_derivatives(x);
                match order {
                    0 => x * s,
                    1 => s + x * d1,
                    2 => 2.0 * d1 + x * d2,
                    _ => 3.0 * d2 + x * d3,
                }
            }
        }
    }
}

impl Pointwise {
    /// [`derivative`](Self::derivative) in f32 arithmetic, from `fast_math`'s `exp`,
    /// `erf` and `tanh`: what f32, bf16 and f16 tensors use (f64 tensors keep the f64
    /// formulas).
    #[inline(always)]
    pub(crate) fn derivative_f32(self, order: u8, x: f32) -> f32 {
        use super::fast_math::{erf, exp};
        match self {
            Pointwise::GeluErf => {
                let phi = exp(-0.5 * x * x) * 0.398_942_3;
                match order {
                    0 => 0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2)),
                    1 => 0.5 * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2)) + x * phi,
                    2 => phi * (2.0 - x * x),
                    _ => phi * (x * x * x - 4.0 * x),
                }
            }
            Pointwise::GeluTanh => {
                let (c, a) = (GELU_TANH_C as f32, GELU_TANH_A as f32);
                let u = c * (x + a * x * x * x);
                let (u1, u2, u3) = (c * (1.0 + 3.0 * a * x * x), 6.0 * a * c * x, 6.0 * a * c);
                // 1 ± tanh(u) = 2σ(±2u): f32 would cancel 1 + tanh(u) to zero for
                // very negative u, where GELU and its slope are small but not zero.
                let plus = 2.0 / (1.0 + exp(-2.0 * u));
                let minus = 2.0 / (1.0 + exp(2.0 * u));
                let (t, sech2) = (plus - 1.0, plus * minus);
                let t1 = sech2 * u1;
                let t2 = -2.0 * t * t1 * u1 + sech2 * u2;
                let t3 = -2.0 * t1 * t1 * u1 - 2.0 * t * t2 * u1 - 4.0 * t * t1 * u2 + sech2 * u3;
                match order {
                    0 => 0.5 * x * plus,
                    1 => 0.5 * plus + 0.5 * x * t1,
                    2 => t1 + 0.5 * x * t2,
                    _ => 1.5 * t2 + 0.5 * x * t3,
                }
            }
            Pointwise::Sigmoid | Pointwise::Silu => {
                let s = 1.0 / (1.0 + exp(-x));
                let d1 = s * (1.0 - s);
                let d2 = d1 * (1.0 - 2.0 * s);
                let d3 = d2 * (1.0 - 2.0 * s) - 2.0 * d1 * d1;
                match (self, order) {
                    (Pointwise::Sigmoid, 0) => s,
                    (Pointwise::Sigmoid, 1) => d1,
                    (Pointwise::Sigmoid, 2) => d2,
                    (Pointwise::Sigmoid, _) => d3,
                    (_, 0) => x * s,
                    (_, 1) => s + x * d1,
                    (_, 2) => 2.0 * d1 + x * d2,
                    _ => 3.0 * d2 + x * d3,
                }
            }
        }
    }
}

/// One derivative order of one function, as a candle op.
struct PointwiseOp {
    function: Pointwise,
    order: u8,
}

impl CustomOp1 for PointwiseOp {
    fn name(&self) -> &'static str {
        match (self.function, self.order) {
            (Pointwise::GeluErf, 0) => "gelu-erf",
            (Pointwise::GeluErf, _) => "gelu-erf-derivative",
            (Pointwise::GeluTanh, 0) => "gelu-tanh",
            (Pointwise::GeluTanh, _) => "gelu-tanh-derivative",
            (Pointwise::Sigmoid, 0) => "sigmoid",
            (Pointwise::Sigmoid, _) => "sigmoid-derivative",
            (Pointwise::Silu, 0) => "silu",
            (Pointwise::Silu, _) => "silu-derivative",
        }
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        // One loop per (function, order), each with constants the compiler folds, so
        // that the f32 loop is branch-free and vectorises.
        let (f, k) = (self.function, self.order);
        let exact = |x: f64| f.derivative(k, x);
        macro_rules! apply {
            ($($f:ident),*) => {
                match (f, k) {
                    $(
                        (Pointwise::$f, 0) => super::rows::map_elements(storage, layout, exact, |x| {
                            Pointwise::$f.derivative_f32(0, x)
                        }),
                        (Pointwise::$f, 1) => super::rows::map_elements(storage, layout, exact, |x| {
                            Pointwise::$f.derivative_f32(1, x)
                        }),
                        (Pointwise::$f, 2) => super::rows::map_elements(storage, layout, exact, |x| {
                            Pointwise::$f.derivative_f32(2, x)
                        }),
                        (Pointwise::$f, _) => super::rows::map_elements(storage, layout, exact, |x| {
                            Pointwise::$f.derivative_f32(3, x)
                        }),
                    )*
                }
            };
        }
        let out = apply!(GeluErf, GeluTanh, Sigmoid, Silu)?;
        Ok((out, layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        if self.order >= MAX_ORDER {
            candle_core::bail!(
                "{}: derivatives beyond order {MAX_ORDER} are not provided (MAML needs at most the third)",
                self.name()
            );
        }
        scaled_derivative(arg, grad, self.function, self.order + 1).map(Some)
    }
}

/// `g · f⁽ᵏ⁾(x)` as one op (`k = order ≥ 1`): the backward of [`PointwiseOp`] at order
/// `k − 1`. A kept graph holds `x` and `g` (alive anyway) and the product, not the
/// derivative `f⁽ᵏ⁾(x)` as well, an input-sized tensor per activation per inner step
/// of full-graph MAML.
struct ScaledDerivativeOp {
    function: Pointwise,
    order: u8,
}

impl CustomOp2 for ScaledDerivativeOp {
    fn name(&self) -> &'static str {
        match self.function {
            Pointwise::GeluErf => "gelu-erf-backward",
            Pointwise::GeluTanh => "gelu-tanh-backward",
            Pointwise::Sigmoid => "sigmoid-backward",
            Pointwise::Silu => "silu-backward",
        }
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        g: &CpuStorage,
        g_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if x_layout.shape() != g_layout.shape() {
            candle_core::bail!(
                "{}: input {:?} and gradient {:?} differ in shape",
                self.name(),
                x_layout.dims(),
                g_layout.dims()
            );
        }
        let (f, k) = (self.function, self.order);
        let exact = |x: f64, g: f64| g * f.derivative(k, x);
        macro_rules! apply {
            ($($f:ident),*) => {
                match (f, k) {
                    $(
                        (Pointwise::$f, 0) => super::rows::map_elements2((x, x_layout), (g, g_layout), exact, |x, g| {
                            g * Pointwise::$f.derivative_f32(0, x)
                        }),
                        (Pointwise::$f, 1) => super::rows::map_elements2((x, x_layout), (g, g_layout), exact, |x, g| {
                            g * Pointwise::$f.derivative_f32(1, x)
                        }),
                        (Pointwise::$f, 2) => super::rows::map_elements2((x, x_layout), (g, g_layout), exact, |x, g| {
                            g * Pointwise::$f.derivative_f32(2, x)
                        }),
                        (Pointwise::$f, _) => super::rows::map_elements2((x, x_layout), (g, g_layout), exact, |x, g| {
                            g * Pointwise::$f.derivative_f32(3, x)
                        }),
                    )*
                }
            };
        }
        let out = apply!(GeluErf, GeluTanh, Sigmoid, Silu)?;
        Ok((out, x_layout.shape().clone()))
    }

    /// For a cotangent `c` of `g·f⁽ᵏ⁾(x)`: `d x = (c·g)·f⁽ᵏ⁺¹⁾(x)`, `d g = c·f⁽ᵏ⁾(x)`,
    /// both this op again.
    fn bwd(
        &self,
        x: &Tensor,
        g: &Tensor,
        _res: &Tensor,
        c: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if self.order >= MAX_ORDER {
            candle_core::bail!(
                "{}: derivatives beyond order {MAX_ORDER} are not provided (MAML needs at most the third)",
                self.name()
            );
        }
        let d_x = scaled_derivative(x, &(c * g)?, self.function, self.order + 1)?;
        let d_g = scaled_derivative(x, c, self.function, self.order)?;
        Ok((Some(d_x), Some(d_g)))
    }
}

/// `g · f⁽ᵒʳᵈᵉʳ⁾(x)`, differentiable in both.
fn scaled_derivative(x: &Tensor, g: &Tensor, function: Pointwise, order: u8) -> Result<Tensor> {
    x.contiguous()?
        .apply_op2(&g.contiguous()?, ScaledDerivativeOp { function, order })
}

/// `function` applied element-wise to `x`.
pub(crate) fn pointwise(x: &Tensor, function: Pointwise) -> Result<Tensor> {
    if !super::composite::fused_kernels(x.device()) {
        return super::composite::pointwise(x, function);
    }
    x.contiguous()?
        .apply_op1(PointwiseOp { function, order: 0 })
}

/// `function′` applied element-wise to `x`, itself differentiable (a hand-written
/// backward of a block that contains `function` stays exact at second order).
pub(crate) fn pointwise_derivative(x: &Tensor, function: Pointwise) -> Result<Tensor> {
    if !super::composite::fused_kernels(x.device()) {
        return super::composite::pointwise_derivative(x, function);
    }
    x.contiguous()?
        .apply_op1(PointwiseOp { function, order: 1 })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each derivative formula is the central difference of the one below it.
    #[test]
    fn derivative_formulas_are_consistent() {
        let h = 1e-5;
        for f in [
            Pointwise::GeluErf,
            Pointwise::GeluTanh,
            Pointwise::Sigmoid,
            Pointwise::Silu,
        ] {
            for &x in &[-3.1, -1.2, -0.4, 0.0, 0.3, 0.9, 2.2, 4.5] {
                for order in 1..=MAX_ORDER {
                    let numeric = (f.derivative(order - 1, x + h) - f.derivative(order - 1, x - h))
                        / (2.0 * h);
                    let exact = f.derivative(order, x);
                    assert!(
                        (numeric - exact).abs() < 1e-8 * exact.abs().max(1.0),
                        "{f:?} order {order} at {x}: {exact} vs {numeric}"
                    );
                }
            }
        }
    }

    /// The f32 formulas (what f32, bf16 and f16 tensors get) track the f64 ones to
    /// f32 precision at every order.
    #[test]
    fn f32_formulas_track_f64() {
        for f in [
            Pointwise::GeluErf,
            Pointwise::GeluTanh,
            Pointwise::Sigmoid,
            Pointwise::Silu,
        ] {
            for order in 0..=MAX_ORDER {
                let scale = (0..=2000)
                    .map(|i| f.derivative(order, -10.0 + i as f64 / 100.0).abs())
                    .fold(1.0f64, f64::max);
                for i in 0..=2000 {
                    let x = -10.0 + i as f32 / 100.0;
                    let exact = f.derivative(order, x as f64);
                    let got = f.derivative_f32(order, x) as f64;
                    assert!(
                        (got - exact).abs() <= 1e-6 * scale.max(exact.abs() * 10.0),
                        "{f:?} order {order} at {x}: f32 {got}, f64 {exact}"
                    );
                }
            }
            assert!(f.derivative_f32(0, f32::NAN).is_nan(), "{f:?}");
        }
    }

    /// `g·f′(x)`, the activation's backward, has exact first and second derivatives
    /// in both `x` and `g` (finite differences), so MAML differentiates through it.
    #[test]
    fn the_backward_op_has_exact_derivatives() {
        use crate::tensor::gradcheck::{
            check_derivatives, random_tensor, FIRST_ORDER_TOLERANCE, SECOND_ORDER_TOLERANCE,
        };
        let dev = candle_core::Device::Cpu;
        for f in [
            Pointwise::GeluErf,
            Pointwise::GeluTanh,
            Pointwise::Sigmoid,
            Pointwise::Silu,
        ] {
            let x = random_tensor(&[3, 5], 41, &dev).unwrap();
            let g = random_tensor(&[3, 5], 42, &dev).unwrap();
            let product = scaled_derivative(&x, &g, f, 1).unwrap();
            let reference = pointwise_derivative(&x, f).unwrap().mul(&g).unwrap();
            let diff = crate::tensor::test_support::max_abs_diff(&product, &reference);
            assert!(diff < 1e-15, "{f:?}: {diff}");
            let errors =
                check_derivatives(&[x, g], |t| scaled_derivative(&t[0], &t[1], f, 1)).unwrap();
            assert!(
                errors.first_order < FIRST_ORDER_TOLERANCE
                    && errors.second_order < SECOND_ORDER_TOLERANCE,
                "{f:?}: {errors:?}"
            );
        }
    }

    #[test]
    fn beyond_the_highest_order_is_a_clear_error() {
        let op = PointwiseOp {
            function: Pointwise::Silu,
            order: MAX_ORDER,
        };
        let x = Tensor::new(&[1.0f64], &candle_core::Device::Cpu).unwrap();
        let err = op.bwd(&x, &x, &x).unwrap_err().to_string();
        assert!(err.contains("not provided"), "{err}");
        let op = ScaledDerivativeOp {
            function: Pointwise::Silu,
            order: MAX_ORDER,
        };
        let err = op.bwd(&x, &x, &x, &x).unwrap_err().to_string();
        assert!(err.contains("not provided"), "{err}");
    }
}
