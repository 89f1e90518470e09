//! The loss an engine differentiates: a parameter of the engine, so that a library
//! user meta-learns with a loss of their own (as with learn2learn's `adapt(loss)`).

use candle_core::{Tensor, Var};

use crate::data::Batch;
use crate::tensor::{ops, GradGraph, ParamSet};
use crate::Result;

/// A scalar loss of a batch's outputs, differentiable to second order.
///
/// Any closure `Fn(&Tensor, &Batch) -> Result<Tensor>` is a `Loss`; its output
/// curvature (for Gauss-Newton products) then comes from a double backward pass.
///
/// ```
/// use melora::data::Batch;
/// use melora::engine::{Loss, TaskLoss};
/// use candle_core::{Device, Tensor};
///
/// // Twice the task loss, as a closure.
/// let doubled = |outputs: &Tensor, batch: &Batch| -> melora::Result<Tensor> {
///     Ok((TaskLoss.value(outputs, batch)? * 2.0)?)
/// };
/// let inputs = Tensor::zeros((2, 3), candle_core::DType::F32, &Device::Cpu)?;
/// let batch = Batch::from_dense(inputs, Tensor::new(&[0u32, 1], &Device::Cpu)?)?;
/// let logits = Tensor::new(&[[1f32, 0., 0.], [0., 1., 0.]], &Device::Cpu)?;
/// let (once, twice) = (TaskLoss.value(&logits, &batch)?, doubled.value(&logits, &batch)?);
/// assert!((2.0 * once.to_scalar::<f32>()? - twice.to_scalar::<f32>()?).abs() < 1e-6);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub trait Loss {
    /// The loss of `outputs` (`[b, classes]` logits, or regression outputs) for
    /// `batch`, a 0-d tensor.
    fn value(&self, outputs: &Tensor, batch: &Batch) -> Result<Tensor>;

    /// `H_z·ż`: the Hessian of the loss in the outputs `z`, applied to an output
    /// tangent `ż` — the middle factor of the generalised Gauss-Newton product
    /// `Jᵀ·H_z·J·v`. By default from a double backward pass through
    /// [`value`](Self::value) at a leaf copy of the outputs.
    fn output_hessian_product(
        &self,
        outputs: &Tensor,
        batch: &Batch,
        z_dot: &Tensor,
    ) -> Result<Tensor> {
        let z = ParamSet::from_pairs([("z", Var::from_tensor(&outputs.detach())?.into_inner())])?;
        let loss = self.value(z.require("z")?, batch)?;
        let gradient = z.gradients(&loss, GradGraph::Keep)?;
        let tangent = ParamSet::from_pairs([("z", z_dot.detach())])?;
        let product = z.vjp(&gradient, &tangent, GradGraph::Detach)?;
        Ok(product.require("z")?.clone())
    }
}

impl<F> Loss for F
where
    F: Fn(&Tensor, &Batch) -> Result<Tensor>,
{
    fn value(&self, outputs: &Tensor, batch: &Batch) -> Result<Tensor> {
        self(outputs, batch)
    }
}

/// The task's own loss: the mean cross-entropy for a classification batch, the mean
/// squared error for a regression batch (one with targets). Its output curvature is
/// in closed form.
#[derive(Debug, Clone, Copy, Default)]
pub struct TaskLoss;

impl Loss for TaskLoss {
    fn value(&self, outputs: &Tensor, batch: &Batch) -> Result<Tensor> {
        if batch.targets.is_some() {
            crate::data::regression_loss(outputs, batch)
        } else {
            Ok(ops::cross_entropy(outputs, &batch.labels, 0.0)?)
        }
    }

    /// For the mean cross-entropy over `N` examples `(diag(p) − ppᵀ)·ż / N` per
    /// example (p the softmax of the logits); for the mean squared error over the
    /// `N×d` outputs `2·ż / (N·d)`. Both are positive semi-definite, so the
    /// Gauss-Newton matrix is too.
    fn output_hessian_product(
        &self,
        outputs: &Tensor,
        batch: &Batch,
        z_dot: &Tensor,
    ) -> Result<Tensor> {
        if batch.targets.is_some() {
            // ops::mse is the mean over every output entry.
            let count = outputs.elem_count().max(1) as f64;
            return Ok(z_dot.affine(2.0 / count, 0.0)?);
        }
        let n = outputs.dims()[0].max(1) as f64;
        let p = ops::softmax(&outputs.detach())?;
        let p_dot_z = (&p * z_dot)?.sum_keepdim(1)?;
        Ok(((&p * z_dot)? - p.broadcast_mul(&p_dot_z)?)?.affine(1.0 / n, 0.0)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::test_support::max_abs_diff;
    use candle_core::{DType, Device};

    /// The closed-form output curvature of the task losses equals the double backward
    /// pass that a custom loss gets by default.
    #[test]
    fn closed_form_output_curvature_equals_the_double_backward() {
        let device = Device::Cpu;
        let logits = Tensor::new(&[[0.3f64, -1.2, 0.8], [1.5, 0.1, -0.4]], &device).unwrap();
        let z_dot = Tensor::new(&[[0.7f64, 0.2, -0.5], [-0.3, 0.9, 0.4]], &device).unwrap();
        let inputs = Tensor::zeros((2, 1), DType::F64, &device).unwrap();
        let labels = Tensor::new(&[2u32, 0], &device).unwrap();
        let classification = Batch::from_dense(inputs.clone(), labels).unwrap();
        let generic = |o: &Tensor, b: &Batch| TaskLoss.value(o, b);
        for batch in [
            classification,
            Batch::regression(
                inputs,
                Tensor::new(&[[0.5f64, 1.0, 0.0], [2.0, -1.0, 1.0]], &device).unwrap(),
            )
            .unwrap(),
        ] {
            let closed = TaskLoss
                .output_hessian_product(&logits, &batch, &z_dot)
                .unwrap();
            let by_autograd = generic
                .output_hessian_product(&logits, &batch, &z_dot)
                .unwrap();
            let gap = max_abs_diff(&closed, &by_autograd);
            assert!(
                gap < 1e-12,
                "closed form and double backward differ by {gap:e}"
            );
            assert!(
                closed
                    .abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
                    > 0.0
            );
        }
    }
}
