//! The loss a learner minimises on a batch, with finiteness checks that name the task
//! and step, so a NaN never silently reaches the parameters.

use candle_core::{DType, Tensor};

use crate::data::Batch;
use crate::models::FewShotModel;
use crate::nn::Mode;
use crate::tensor::{ops, ParamSet};
use crate::{Error, Result};

/// The task's loss on the model's `outputs` for `batch`: mean cross-entropy for a
/// classification batch, mean squared error for a regression batch.
pub(crate) fn task_loss(outputs: &Tensor, batch: &Batch) -> Result<Tensor> {
    if batch.targets.is_some() {
        crate::data::regression_loss(outputs, batch)
    } else {
        Ok(ops::cross_entropy(outputs, &batch.labels, 0.0)?)
    }
}

/// `H_z·ż`: the Hessian of the task loss in the model's outputs `z`, applied to a
/// tangent `ż` of the outputs — the middle factor of the generalised Gauss-Newton
/// product `Jᵀ·H_z·J·v`. For the mean cross-entropy over `N` examples it is
/// `(diag(p) − ppᵀ)·ż / N` per example (p the softmax of the logits); for the mean
/// squared error over the `N×d` outputs it is `2·ż / (N·d)`. Both are positive
/// semi-definite, so the Gauss-Newton matrix is too.
pub(crate) fn output_hessian_product(
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

/// The task's loss on `outputs` as a finite number.
pub(crate) fn loss_value(outputs: &Tensor, batch: &Batch) -> Result<f64> {
    finite_value(&task_loss(outputs, batch)?, &|| "the query loss".into())
}

/// The task's loss (see [`task_loss`]) of the model on `batch` at `params`.
pub(crate) fn batch_loss(
    model: &dyn FewShotModel,
    params: &ParamSet,
    batch: &Batch,
    mode: Mode,
) -> Result<Tensor> {
    task_loss(&model.logits(params, batch, mode)?, batch)
}

/// The loss as f64, or an error naming `context` when it is NaN or infinite.
pub(crate) fn finite_value(loss: &Tensor, context: &dyn Fn() -> String) -> Result<f64> {
    let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    if value.is_finite() {
        Ok(value)
    } else {
        Err(Error::NonFinite(format!(
            "{} is {value}; lower the learning rates or check the data",
            context()
        )))
    }
}

/// Checks that every entry of a gradient is finite.
pub(crate) fn check_finite(grads: &ParamSet, context: &dyn Fn() -> String) -> Result<()> {
    for (name, g) in grads.iter() {
        let sum = g
            .to_dtype(DType::F64)?
            .abs()?
            .sum_all()?
            .to_scalar::<f64>()?;
        if !sum.is_finite() {
            return Err(Error::NonFinite(format!(
                "{}: the gradient of `{name}` is not finite; lower the learning rates",
                context()
            )));
        }
    }
    Ok(())
}

/// Fraction of `batch` whose arg-max logit is the label.
pub(crate) fn accuracy(logits: &Tensor, labels: &Tensor) -> Result<f64> {
    let predicted = logits.argmax(1)?.to_dtype(DType::U32)?.to_vec1::<u32>()?;
    let labels = labels.to_vec1::<u32>()?;
    let correct = predicted
        .iter()
        .zip(&labels)
        .filter(|(p, l)| p == l)
        .count();
    Ok(correct as f64 / labels.len().max(1) as f64)
}
