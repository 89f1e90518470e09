//! Finiteness checks of losses and gradients that name the task
//! and step, so a NaN never silently reaches the parameters.

use candle_core::{DType, Tensor};

use crate::data::Batch;
use crate::engine::{Loss, TaskLoss};
use crate::tensor::ParamSet;
use crate::{Error, Result};

/// The task's loss on `outputs` as a finite number.
pub(crate) fn loss_value(outputs: &Tensor, batch: &Batch) -> Result<f64> {
    finite_value(&TaskLoss.value(outputs, batch)?, &|| {
        "the query loss".into()
    })
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
