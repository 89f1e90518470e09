//! Checks derivatives against central finite differences in f64: first derivatives
//! coordinate by coordinate, and Hessian-vector products against finite differences of
//! the gradient along the vector.
//!
//! An op `f: inputs → y` is reduced to a scalar `s = Σ r₁⊙y + ½ Σ (r₂⊙y)²` with fixed
//! random `r₁, r₂`. The quadratic term makes the second-order check meaningful for
//! linear ops too: their Hessian-vector product then goes through the backward of
//! their own backward, which is what MAML differentiates.

use candle_core::{DType, Device, Result, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

use crate::tensor::second_order::ensure_second_order;

/// Step of the central differences: truncation error ~h², rounding ~ε/h, both ~1e-10.
const STEP: f64 = 1e-5;
/// Coordinates checked per input at first order (all of them for smaller inputs).
const COORDINATES_PER_INPUT: usize = 24;
/// Allowed relative errors (the foundation issue's acceptance bounds).
pub(crate) const FIRST_ORDER_TOLERANCE: f64 = 1e-6;
pub(crate) const SECOND_ORDER_TOLERANCE: f64 = 1e-4;

/// A standard-normal f64 tensor drawn from a seeded generator.
pub(crate) fn random_tensor(shape: &[usize], seed: u64, device: &Device) -> Result<Tensor> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let data: Vec<f64> = (0..n).map(|_| rng.sample(StandardNormal)).collect();
    Tensor::from_vec(data, shape, device)
}

/// Largest relative errors found by [`check_derivatives`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct DerivativeErrors {
    /// max |analytic − numeric| / max(|numeric|, |analytic|) over checked coordinates
    /// of the gradient.
    pub first_order: f64,
    /// The same for the Hessian-vector product, over all coordinates.
    pub second_order: f64,
}

fn relative_error(analytic: &[f64], numeric: &[f64]) -> f64 {
    let scale = analytic
        .iter()
        .chain(numeric)
        .fold(1e-6f64, |m, v| m.max(v.abs()));
    let worst = analytic
        .iter()
        .zip(numeric)
        .fold(0f64, |m, (a, n)| m.max((a - n).abs()));
    worst / scale
}

fn flat(t: &Tensor) -> Result<Vec<f64>> {
    t.flatten_all()?.to_vec1::<f64>()
}

#[derive(Clone, Copy, PartialEq)]
enum GradGraph {
    Keep,
    Detach,
}

/// The gradient of `scalar` at fresh leaf copies of `xs`, returned with those leaves
/// (a second backward pass needs them to find its results).
fn gradient_at(
    scalar: &impl Fn(&[Tensor]) -> Result<Tensor>,
    xs: &[Tensor],
    graph: GradGraph,
) -> Result<(Vec<Tensor>, Vec<Tensor>)> {
    let leaves = xs
        .iter()
        .map(|x| Var::from_tensor(&x.detach()).map(Var::into_inner))
        .collect::<Result<Vec<_>>>()?;
    let store = scalar(&leaves)?.backward()?;
    let grads = leaves
        .iter()
        .map(|l| match store.get(l) {
            Some(g) if graph == GradGraph::Keep => Ok(g.clone()),
            Some(g) => Ok(g.detach()),
            None => l.zeros_like(),
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((leaves, grads))
}

/// Compares the first derivatives and a Hessian-vector product of `f` at `inputs`
/// (all f64, all differentiated) with central finite differences.
pub(crate) fn check_derivatives(
    inputs: &[Tensor],
    f: impl Fn(&[Tensor]) -> Result<Tensor>,
) -> crate::Result<DerivativeErrors> {
    check_derivatives_with_step(inputs, STEP, f)
}

/// [`check_derivatives`] with central differences of step `step`. Whole networks
/// with ReLU and max-pooling have so many kinks that a step of 1e-5 crosses one (a
/// unit changing sign, a window changing its maximum) and the difference quotient
/// jumps; 1e-7 makes that a hundred times less likely and keeps, in f64, a rounding
/// error near 1e-9.
pub(crate) fn check_derivatives_with_step(
    inputs: &[Tensor],
    step: f64,
    f: impl Fn(&[Tensor]) -> Result<Tensor>,
) -> crate::Result<DerivativeErrors> {
    ensure_second_order()?;
    let device = inputs
        .first()
        .map(|t| t.device().clone())
        .unwrap_or(Device::Cpu);
    let y0 = f(inputs)?;
    let r1 = random_tensor(y0.dims(), 1001, &device)?;
    let r2 = random_tensor(y0.dims(), 1002, &device)?;
    let scalar = |xs: &[Tensor]| -> Result<Tensor> {
        let y = f(xs)?;
        (y.mul(&r1)?.sum_all()? + (y.mul(&r2)?.sqr()?.sum_all()? * 0.5)?)?.to_dtype(DType::F64)
    };
    // First order, coordinate by coordinate.
    let (leaves, grads) = gradient_at(&scalar, inputs, GradGraph::Keep)?;
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let (mut analytic, mut numeric) = (Vec::new(), Vec::new());
    for (i, x) in inputs.iter().enumerate() {
        let base = flat(x)?;
        let g = flat(&grads[i])?;
        let coords: Vec<usize> = if base.len() <= COORDINATES_PER_INPUT {
            (0..base.len()).collect()
        } else {
            (0..COORDINATES_PER_INPUT)
                .map(|_| rng.random_range(0..base.len()))
                .collect()
        };
        for j in coords {
            let at = |delta: f64| -> Result<f64> {
                let mut moved = base.clone();
                moved[j] += delta;
                let mut xs = inputs.to_vec();
                xs[i] = Tensor::from_vec(moved, x.dims(), &device)?;
                scalar(&xs)?.to_scalar::<f64>()
            };
            numeric.push((at(step)? - at(-step)?) / (2.0 * step));
            analytic.push(g[j]);
        }
    }
    let first_order = relative_error(&analytic, &numeric);

    // Second order: H·v by differentiating ⟨∇s, v⟩ against (∇s(x+hv) − ∇s(x−hv)) / 2h.
    let v: Vec<Tensor> = inputs
        .iter()
        .enumerate()
        .map(|(i, x)| random_tensor(x.dims(), 2000 + i as u64, &device))
        .collect::<Result<_>>()?;
    let mut gv = Tensor::new(0f64, &device)?;
    for (g, v) in grads.iter().zip(&v) {
        gv = (gv + g.mul(v)?.sum_all()?)?;
    }
    let hv_store = gv.backward()?;
    let hv: Vec<f64> = leaves
        .iter()
        .map(|l| match hv_store.get(l) {
            Some(h) => flat(h),
            None => Ok(vec![0.0; l.elem_count()]),
        })
        .collect::<Result<Vec<_>>>()?
        .concat();
    let moved = |sign: f64| -> Result<Vec<f64>> {
        let xs: Vec<Tensor> = inputs
            .iter()
            .zip(&v)
            .map(|(x, v)| x + (v * (sign * step))?)
            .collect::<Result<_>>()?;
        let (_, g) = gradient_at(&scalar, &xs, GradGraph::Detach)?;
        Ok(g.iter().map(flat).collect::<Result<Vec<_>>>()?.concat())
    };
    let (plus, minus) = (moved(1.0)?, moved(-1.0)?);
    let hv_numeric: Vec<f64> = plus
        .iter()
        .zip(&minus)
        .map(|(p, m)| (p - m) / (2.0 * step))
        .collect();
    let second_order = relative_error(&hv, &hv_numeric);
    Ok(DerivativeErrors {
        first_order,
        second_order,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A function whose graph misstates its gradient (a detached factor) fails.
    #[test]
    fn detects_a_wrong_gradient() {
        let x = (random_tensor(&[5], 1, &Device::Cpu).unwrap().abs().unwrap() + 0.5).unwrap();
        // y = x · stopgrad(x): value x², claimed derivative x instead of 2x.
        let errors = check_derivatives(&[x], |t| t[0].mul(&t[0].detach())).unwrap();
        assert!(errors.first_order > 0.1, "{errors:?}");
    }

    /// `y = x²` whose backward is right at first order but built from a detached
    /// input, as a gradient that lost its graph would be: only the second-order check
    /// can see it.
    struct SquareWithDetachedBackward;

    impl candle_core::CustomOp1 for SquareWithDetachedBackward {
        fn name(&self) -> &'static str {
            "square-detached-backward"
        }

        fn cpu_fwd(
            &self,
            storage: &candle_core::CpuStorage,
            layout: &candle_core::Layout,
        ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
            let x = storage.as_slice::<f64>()?;
            let out: Vec<f64> = match layout.contiguous_offsets() {
                Some((a, b)) => x[a..b].iter().map(|v| v * v).collect(),
                None => candle_core::bail!("contiguous input expected"),
            };
            Ok((candle_core::CpuStorage::F64(out), layout.shape().clone()))
        }

        fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
            Ok(Some((grad * (arg.detach() * 2.0)?)?))
        }
    }

    #[test]
    fn detects_a_wrong_second_derivative() {
        let x = random_tensor(&[4], 2, &Device::Cpu).unwrap();
        let good = check_derivatives(std::slice::from_ref(&x), |t| t[0].sqr()).unwrap();
        assert!(
            good.first_order < 1e-8 && good.second_order < 1e-6,
            "{good:?}"
        );
        let bad = check_derivatives(&[x], |t| t[0].apply_op1(SquareWithDetachedBackward)).unwrap();
        assert!(bad.first_order < 1e-8, "first order is right: {bad:?}");
        assert!(
            bad.second_order > 0.1,
            "second order must be caught: {bad:?}"
        );
    }

    #[test]
    fn relative_error_is_scale_free() {
        assert!(relative_error(&[1e3, 2e3], &[1e3 + 1e-4, 2e3]) < 1e-7);
        assert!(relative_error(&[1.0], &[2.0]) >= 0.5);
    }
}
