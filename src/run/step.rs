//! One meta-training step: every task of the meta-batch through the learner, then the
//! outer update. A failing task (empty set, non-finite loss) stops the step with an
//! error naming the task, before anything reaches the parameters.
//!
//! With dynamic loss scaling (f16 activations) every backward pass of the step runs
//! under the scaler's scale; a non-finite value anywhere in the meta-batch skips the
//! step (parameters and optimiser untouched) and halves the scale instead.

use crate::data::Episode;
use crate::engine::GradEngine;
use crate::meta::MetaLearner;
use crate::nn::Mode;
use crate::tensor::ParamSet;
use crate::{Error, Result};

use super::OuterUpdate;

/// What one meta-step measured.
#[derive(Debug, Clone, PartialEq)]
pub struct StepStats {
    /// Mean query loss after adaptation over the meta-batch.
    pub query_loss: f64,
    /// Mean query accuracy after adaptation.
    pub query_accuracy: f64,
    /// Mean support loss before the first inner step.
    pub support_loss: f64,
    /// Norm of the averaged meta-gradient before clipping.
    pub grad_norm: f64,
    /// The loss scale the step ran under (`None`: no scaling).
    pub loss_scale: Option<f64>,
    /// Whether the step was skipped because a scaled backward pass overflowed (the
    /// losses and norm are then NaN).
    pub skipped: bool,
    /// Whether the tasks are regression (the loss is an MSE, accuracy meaningless).
    pub regression: bool,
}

/// Training's forward mode for task `task` of meta-iteration `iteration`: dropout
/// seeded from the run's seed and the task's position in the whole run, so that a
/// resumed run (or a measurement) draws the same masks as an uninterrupted one.
pub fn training_mode(
    seed: u64,
    iteration: usize,
    meta_batch: usize,
) -> impl Fn(usize) -> Mode + Copy {
    move |task: usize| Mode::Train {
        // Wrapping: a seed, not a count (validation keeps real runs far from overflow).
        seed: crate::tensor::ops::mix_seed(
            seed,
            (iteration as u64)
                .wrapping_mul(meta_batch as u64)
                .wrapping_add(task as u64),
        ),
    }
}

/// A skipped step: the parameters unchanged, NaN statistics.
fn skipped(params: &ParamSet, scale: Option<f64>, regression: bool) -> (ParamSet, StepStats) {
    let nan = f64::NAN;
    let stats = StepStats {
        query_loss: nan,
        query_accuracy: nan,
        support_loss: nan,
        grad_norm: nan,
        loss_scale: scale,
        skipped: true,
        regression,
    };
    (params.clone(), stats)
}

/// Applies one meta-step to `params` with the tasks of `meta_batch`; `mode(i)` gives
/// task i's forward mode (its dropout seed).
pub fn meta_step(
    learner: &dyn MetaLearner,
    engine: &dyn GradEngine,
    params: &ParamSet,
    meta_batch: &[Episode],
    outer: &mut OuterUpdate,
    mode: impl Fn(usize) -> Mode,
) -> Result<(ParamSet, StepStats)> {
    if meta_batch.is_empty() {
        return Err(Error::InvalidArgument(
            "the meta-batch holds no task".into(),
        ));
    }
    let regression = meta_batch[0].query.targets.is_some();
    let mut gradients = Vec::with_capacity(meta_batch.len());
    let (mut query_loss, mut query_accuracy, mut support_loss) = (0.0, 0.0, 0.0);
    let scale = outer.loss_scale.as_ref().map(|s| s.scale());
    let scope = scale.map(crate::tensor::loss_scale::scoped);
    for (i, task) in meta_batch.iter().enumerate() {
        let outcome = learner.meta_gradient(engine, params, task, mode(i));
        if let (Err(Error::NonFinite(what)), Some(scaler)) = (&outcome, outer.loss_scale.as_mut()) {
            // An overflow of the scaled passes: skip the step, smaller scale next time.
            scaler.record_overflow(&format!("task {} of the meta-batch, {what}", i + 1))?;
            return Ok(skipped(params, scale, regression));
        }
        let outcome = outcome.map_err(|e| match e {
            Error::NonFinite(m) => {
                Error::NonFinite(format!("task {} of the meta-batch, {m}", i + 1))
            }
            Error::InvalidArgument(m) => {
                Error::InvalidArgument(format!("task {} of the meta-batch: {m}", i + 1))
            }
            other => other,
        })?;
        // Under a memory budget, a task that went above it ends the step here, before
        // the optimiser changes: the caller redoes it with smaller micro-batches.
        crate::memory::check_budget()?;
        query_loss += outcome.query_loss;
        query_accuracy += outcome.query_accuracy;
        support_loss += outcome.support_losses.first().copied().unwrap_or(f64::NAN);
        gradients.push(outcome.meta_gradient);
    }
    drop(scope);
    // The outer update refuses a non-finite mean before touching the optimiser.
    let applied = outer.apply(params, &gradients);
    if let (Err(Error::NonFinite(what)), Some(scaler)) = (&applied, outer.loss_scale.as_mut()) {
        scaler.record_overflow(what)?;
        return Ok(skipped(params, scale, regression));
    }
    let (next, grad_norm) = applied?;
    if let Some(scaler) = outer.loss_scale.as_mut() {
        scaler.record_good_step();
    }
    let n = meta_batch.len() as f64;
    Ok((
        next,
        StepStats {
            query_loss: query_loss / n,
            query_accuracy: query_accuracy / n,
            support_loss: support_loss / n,
            grad_norm,
            loss_scale: scale,
            skipped: false,
            regression,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Batch;
    use crate::engine::WholeGraph;
    use crate::meta::test_models::{dense_episode, LinearProbe};
    use crate::meta::{Fomaml, InnerLoop, Maml, MamlMode, Reptile};
    use crate::models::FewShotModel;
    use crate::optim::{Optimizer, OptimizerKind, Schedule};
    use candle_core::{Device, Tensor};

    fn outer() -> OuterUpdate {
        OuterUpdate {
            optimizer: Optimizer::new(OptimizerKind::adamw(0.0)),
            schedule: Schedule::Constant,
            lr: 0.01,
            grad_clip: Some(1.0),
            total_steps: 10,
            loss_scale: None,
        }
    }

    fn error(learner: &dyn MetaLearner, params: &ParamSet, tasks: &[Episode]) -> String {
        let model = LinearProbe { classes: 3, dim: 4 };
        meta_step(
            learner,
            &WholeGraph::new(&model),
            params,
            tasks,
            &mut outer(),
            |_| Mode::Eval,
        )
        .unwrap_err()
        .to_string()
    }

    #[test]
    fn bad_settings_are_errors_naming_the_setting() {
        let params = LinearProbe { classes: 3, dim: 4 }.init_params(0).unwrap();
        let tasks = [dense_episode(3, 4, 2, 1)];
        let k0 = Maml {
            inner: InnerLoop::new(0, 0.1),
            mode: MamlMode::FullGraph,
        };
        assert!(error(&k0, &params, &tasks).contains("meta_learning.inner.steps"));
        for lr in [0.0, -0.1, f64::INFINITY] {
            let bad = Fomaml {
                inner: InnerLoop::new(1, lr),
            };
            let err = error(&bad, &params, &tasks);
            assert!(
                err.contains("meta_learning.inner.lr") && err.contains("task 1"),
                "{err}"
            );
        }
        let model = LinearProbe { classes: 3, dim: 4 };
        let learner = Reptile {
            inner: InnerLoop::new(1, 0.1),
        };
        assert!(meta_step(
            &learner,
            &WholeGraph::new(&model),
            &params,
            &[],
            &mut outer(),
            |_| Mode::Eval
        )
        .is_err());
    }

    #[test]
    fn an_empty_support_set_is_rejected() {
        let empty = Batch::from_dense(
            Tensor::zeros((0, 4), candle_core::DType::F64, &Device::Cpu).unwrap(),
            Tensor::zeros(0, candle_core::DType::U32, &Device::Cpu).unwrap(),
        )
        .unwrap();
        let query = dense_episode(3, 4, 2, 1).query;
        let err = Episode::new(empty, query, 3).unwrap_err().to_string();
        assert!(err.contains("0 support"), "{err}");
    }

    /// A NaN in the inputs of the second task: the step fails naming task 2 and the
    /// inner step, and the parameters are never touched.
    #[test]
    fn a_nan_loss_names_task_and_step_and_never_reaches_the_parameters() {
        let model = LinearProbe { classes: 3, dim: 4 };
        let params = model.init_params(0).unwrap();
        let good = dense_episode(3, 4, 2, 1);
        let mut bad = dense_episode(3, 4, 2, 2);
        let x = (bad.support.dense().unwrap() * f64::NAN).unwrap();
        bad.support = Batch::from_dense(x, bad.support.labels.clone()).unwrap();
        for learner in [
            Box::new(Maml {
                inner: InnerLoop::new(2, 0.1),
                mode: MamlMode::FullGraph,
            }) as Box<dyn MetaLearner>,
            Box::new(Maml {
                inner: InnerLoop::new(2, 0.1),
                mode: MamlMode::Recompute,
            }),
            Box::new(Fomaml {
                inner: InnerLoop::new(2, 0.1),
            }),
            Box::new(Reptile {
                inner: InnerLoop::new(2, 0.1),
            }),
        ] {
            let mut update = outer();
            let before = params.clone();
            let result = meta_step(
                learner.as_ref(),
                &WholeGraph::new(&model),
                &params,
                &[good.clone(), bad.clone()],
                &mut update,
                |_| Mode::Eval,
            );
            let err = result.unwrap_err().to_string();
            assert!(
                err.contains("task 2") && err.contains("inner step 1") && err.contains("NaN"),
                "{err}"
            );
            assert_eq!(
                update.optimizer.steps(),
                0,
                "the optimiser must not have stepped"
            );
            assert_eq!(before.sub(&params).unwrap().norm().unwrap(), 0.0);
        }
    }
}
