//! The outer update of meta-training: average the meta-batch's meta-gradients, clip
//! them by global norm, and take an optimiser step at the scheduled rate.

use crate::optim::{LossScaler, Optimizer, Schedule};
use crate::tensor::ParamSet;
use crate::{Error, Result};

/// The mean of the tasks' meta-gradients.
pub fn average(gradients: &[ParamSet]) -> Result<ParamSet> {
    let Some((first, rest)) = gradients.split_first() else {
        return Err(Error::InvalidArgument(
            "no meta-gradient to average (empty meta-batch)".into(),
        ));
    };
    let mut sum = first.detach();
    for g in rest {
        sum = sum.add(g)?;
    }
    sum.scale(1.0 / gradients.len() as f64)
}

/// Scales `grads` so that their global norm is at most `max_norm`; returns the
/// clipped gradient and the norm before clipping.
pub fn clip_global_norm(grads: &ParamSet, max_norm: f64) -> Result<(ParamSet, f64)> {
    let norm = grads.norm()?;
    if !norm.is_finite() {
        return Err(Error::NonFinite(format!(
            "the meta-gradient's norm is {norm}; lower the learning rates"
        )));
    }
    if norm <= max_norm {
        return Ok((grads.clone(), norm));
    }
    Ok((grads.scale(max_norm / norm)?, norm))
}

/// Optimiser, schedule and clipping of the outer loop.
#[derive(Debug, Clone)]
pub struct OuterUpdate {
    /// The optimiser and its state.
    pub optimizer: Optimizer,
    /// The schedule of its learning rate.
    pub schedule: Schedule,
    /// The base learning rate.
    pub lr: f64,
    /// Global-norm clipping threshold, if any.
    pub grad_clip: Option<f64>,
    /// Total outer steps (for the schedule).
    pub total_steps: usize,
    /// Dynamic loss scaling of every backward pass of a step (f16 activations); a
    /// step that overflows is skipped. `None`: no scaling.
    pub loss_scale: Option<LossScaler>,
}

impl OuterUpdate {
    /// Applies one outer step to `params` with the tasks' meta-gradients; returns the
    /// new parameters and the meta-gradient's norm before clipping.
    pub fn apply(
        &mut self,
        params: &ParamSet,
        task_gradients: &[ParamSet],
    ) -> Result<(ParamSet, f64)> {
        let mean = average(task_gradients)?;
        let (grads, norm) = match self.grad_clip {
            Some(max) => clip_global_norm(&mean, max)?,
            None => {
                let norm = mean.norm()?;
                if !norm.is_finite() {
                    return Err(Error::NonFinite(format!(
                        "the meta-gradient's norm is {norm}"
                    )));
                }
                (mean, norm)
            }
        };
        let step = self.optimizer.steps() as usize;
        let lr = self.schedule.rate(
            self.lr,
            step.min(self.total_steps.saturating_sub(1)),
            self.total_steps.max(1),
        )?;
        Ok((self.optimizer.step(params, &grads, lr)?, norm))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::OptimizerKind;
    use candle_core::{Device, Tensor};

    fn set(values: &[f64]) -> ParamSet {
        ParamSet::from_pairs([("w", Tensor::new(values, &Device::Cpu).unwrap())]).unwrap()
    }

    #[test]
    fn average_and_clip() {
        let mean = average(&[set(&[1.0, 2.0]), set(&[3.0, 6.0])]).unwrap();
        assert_eq!(
            mean.get("w").unwrap().to_vec1::<f64>().unwrap(),
            vec![2.0, 4.0]
        );
        let (clipped, norm) = clip_global_norm(&set(&[3.0, 4.0]), 1.0).unwrap();
        assert_eq!(norm, 5.0);
        assert!((clipped.norm().unwrap() - 1.0).abs() < 1e-15);
        let (kept, _) = clip_global_norm(&set(&[0.3, 0.4]), 1.0).unwrap();
        assert_eq!(
            kept.get("w").unwrap().to_vec1::<f64>().unwrap(),
            vec![0.3, 0.4]
        );
        assert!(average(&[]).is_err());
        assert!(clip_global_norm(&set(&[f64::NAN]), 1.0).is_err());
    }

    #[test]
    fn outer_step_descends_the_mean_gradient() {
        let mut outer = OuterUpdate {
            optimizer: Optimizer::new(OptimizerKind::Sgd { weight_decay: 0.0 }),
            schedule: Schedule::Constant,
            lr: 0.5,
            grad_clip: Some(10.0),
            total_steps: 3,
            loss_scale: None,
        };
        let (next, norm) = outer
            .apply(&set(&[1.0]), &[set(&[1.0]), set(&[3.0])])
            .unwrap();
        assert_eq!(norm, 2.0);
        assert_eq!(next.get("w").unwrap().to_vec1::<f64>().unwrap(), vec![0.0]);
    }
}
