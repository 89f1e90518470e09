//! Baselines without meta-learning, for comparisons: what a user would otherwise do
//! with a few labelled examples of a new task.
//!
//! | baseline | per task |
//! |---|---|
//! | [`NoAdaptation`] | nothing: the given model as it is (chance for a zero head) |
//! | [`Prototype`] | nearest class mean (cosine) of the model's pooled features; no training |
//! | [`LoraFinetune`] | a fresh adapter and head (PEFT's init: the base model) trained by AdamW |
//! | [`FullFinetune`] | every weight of the base model, the adapters and the head trained by AdamW |
//! | [`Finetune`] | the given parameters (a meta-trained or pre-trained start) trained by AdamW |
//! | [`HeadFinetune`] | only the head trained by AdamW, on the features of the given parameters |
//!
//! The AdamW baselines take `steps` full-batch steps on the support set at `lr`.

use candle_core::Tensor;

use crate::data::Batch;
use crate::engine::GradEngine;
use crate::models::{HEAD_BIAS, HEAD_WEIGHT};
use crate::nn::Mode;
use crate::optim::{Optimizer, OptimizerKind};
use crate::tensor::{ops, GradGraph, ParamSet};
use crate::{Error, Result};

use super::inner::gradient;
use super::loss::{check_finite, finite_value};
use super::metric::{adapt_by_support, class_means, unit_rows};
use super::Adapter;

/// Checks the AdamW budget of a fine-tuning baseline.
fn check_budget(steps: usize, lr: f64) -> Result<()> {
    if steps == 0 {
        return Err(Error::InvalidArgument(
            "fine-tuning needs at least 1 step (evaluation.finetune_steps)".into(),
        ));
    }
    if !(lr.is_finite() && lr > 0.0) {
        return Err(Error::InvalidArgument(format!(
            "fine-tuning learning rate must be > 0, got {lr} (evaluation.finetune_lr)"
        )));
    }
    Ok(())
}

/// `steps` AdamW steps on the support loss from `start`.
fn train(
    engine: &dyn GradEngine,
    start: &ParamSet,
    support: &Batch,
    steps: usize,
    lr: f64,
    mode: Mode,
) -> Result<ParamSet> {
    check_budget(steps, lr)?;
    let mut optimizer = Optimizer::new(OptimizerKind::adamw(0.0));
    let mut theta = start.detach();
    for step in 0..steps {
        let context = || format!("fine-tuning step {}", step + 1);
        let (grads, _, _) = gradient(engine, &theta, support, mode, &context)?;
        theta = optimizer.step(&theta, &grads, lr)?;
    }
    Ok(theta)
}

/// Fine-tunes the given parameters (every trainable tensor) per task by AdamW: the
/// baseline optimiser applied to a meta-trained or pre-trained initialisation.
#[derive(Debug, Clone, Copy)]
pub struct Finetune {
    /// Full-batch steps on the support set.
    pub steps: usize,
    /// AdamW learning rate.
    pub lr: f64,
}

impl Adapter for Finetune {
    fn adapt(
        &self,
        engine: &dyn GradEngine,
        params: &ParamSet,
        support: &Batch,
        mode: Mode,
    ) -> Result<ParamSet> {
        train(engine, params, support, self.steps, self.lr, mode)
    }
}

/// Trains a fresh LoRA adapter and head per task on the frozen base (PEFT's
/// initialisation, so the adapted model starts as the base model), ignoring the given
/// values. For models without a frozen base (Conv4, MLP) this is training a fresh
/// network from scratch.
#[derive(Debug, Clone, Copy)]
pub struct LoraFinetune {
    /// Full-batch steps on the support set.
    pub steps: usize,
    /// AdamW learning rate.
    pub lr: f64,
    /// Seed of the fresh adapter and head.
    pub seed: u64,
}

impl Adapter for LoraFinetune {
    fn adapt(
        &self,
        engine: &dyn GradEngine,
        _params: &ParamSet,
        support: &Batch,
        mode: Mode,
    ) -> Result<ParamSet> {
        let fresh = engine.model().init_params(self.seed)?;
        train(engine, &fresh, support, self.steps, self.lr, mode)
    }
}

/// Full fine-tuning per task: every weight of the pre-trained base model is trainable
/// (not frozen), with the head (and the adapters, which start as zero updates); the
/// most memory-hungry alternative, and what the reference project's fine-tuning
/// baseline does. See [`crate::models::FewShotModel::full_params`].
#[derive(Debug, Clone, Copy)]
pub struct FullFinetune {
    /// Full-batch steps on the support set.
    pub steps: usize,
    /// AdamW learning rate.
    pub lr: f64,
    /// Seed of the head (and adapters).
    pub seed: u64,
}

impl Adapter for FullFinetune {
    fn adapt(
        &self,
        engine: &dyn GradEngine,
        _params: &ParamSet,
        support: &Batch,
        mode: Mode,
    ) -> Result<ParamSet> {
        let start = engine.model().full_params(self.seed)?;
        train(engine, &start, support, self.steps, self.lr, mode)
    }
}

/// The given model without adaptation. With a zero head every logit is 0, so every
/// query is predicted as the first class: chance accuracy (1/N for balanced queries).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoAdaptation;

impl Adapter for NoAdaptation {
    fn adapt(
        &self,
        _engine: &dyn GradEngine,
        params: &ParamSet,
        _support: &Batch,
        _mode: Mode,
    ) -> Result<ParamSet> {
        Ok(params.detach())
    }
}

/// Name under which [`Prototype`] keeps its class means in the adapted ParamSet.
pub const PROTOTYPE_MEANS: &str = "prototype.means";

/// Nearest class mean of the model's pooled features at the given parameters (the
/// frozen base, for an initialisation with zero LoRA updates), by cosine similarity:
/// no training at all. The logits are `temperature · cos(f, μ_c)`, so the scores'
/// softmax is a distribution (accuracy does not depend on the temperature).
#[derive(Debug, Clone, Copy)]
pub struct Prototype {
    /// Scale of the cosine similarities in the logits.
    pub temperature: f64,
}

impl Default for Prototype {
    fn default() -> Self {
        // As cosine classifiers commonly scale their similarities (Chen et al. 2019).
        Self { temperature: 10.0 }
    }
}

impl Adapter for Prototype {
    fn adapt(
        &self,
        engine: &dyn GradEngine,
        params: &ParamSet,
        support: &Batch,
        mode: Mode,
    ) -> Result<ParamSet> {
        adapt_by_support(
            engine,
            params,
            support,
            mode,
            ("prototype", PROTOTYPE_MEANS),
            |features, labels| unit_rows(&class_means(&unit_rows(features)?, labels)?),
        )
    }

    fn predict(
        &self,
        engine: &dyn GradEngine,
        adapted: &ParamSet,
        batch: &Batch,
        mode: Mode,
    ) -> Result<Tensor> {
        let means = adapted.require(PROTOTYPE_MEANS)?;
        let features = unit_rows(&engine.model().features(adapted, batch, mode)?)?;
        Ok((features.matmul(&means.t()?)? * self.temperature)?)
    }
}

/// Trains only the head per task, by AdamW on the features of the given parameters
/// (computed once: the rest is frozen), from a zero head (`reset_head`, for tasks of
/// new classes) or from the given one: the second stage of `pretrain-finetune`.
#[derive(Debug, Clone, Copy)]
pub struct HeadFinetune {
    /// Full-batch steps on the support set.
    pub steps: usize,
    /// AdamW learning rate.
    pub lr: f64,
    /// Start from a zero head of the task's classes instead of the given head.
    pub reset_head: bool,
}

impl Adapter for HeadFinetune {
    fn adapt(
        &self,
        engine: &dyn GradEngine,
        params: &ParamSet,
        support: &Batch,
        mode: Mode,
    ) -> Result<ParamSet> {
        check_budget(self.steps, self.lr)?;
        let features = engine.model().features(params, support, mode)?.detach();
        let (weight, bias) = (params.require(HEAD_WEIGHT)?, params.require(HEAD_BIAS)?);
        let mut head = if self.reset_head {
            let classes = if support.is_regression() {
                weight.dims()[0]
            } else {
                support
                    .labels
                    .to_vec1::<u32>()?
                    .iter()
                    .max()
                    .map_or(1, |&m| m as usize + 1)
            };
            let (dtype, device) = (weight.dtype(), weight.device());
            ParamSet::from_pairs([
                (
                    HEAD_WEIGHT,
                    Tensor::zeros((classes, weight.dims()[1]), dtype, device)?,
                ),
                (HEAD_BIAS, Tensor::zeros(classes, dtype, device)?),
            ])?
        } else {
            ParamSet::from_pairs([(HEAD_WEIGHT, weight.detach()), (HEAD_BIAS, bias.detach())])?
        };
        let mut optimizer = Optimizer::new(OptimizerKind::adamw(0.0));
        for step in 0..self.steps {
            let leaves = head.to_leaves()?;
            let logits = ops::linear(
                &features.to_dtype(weight.dtype())?,
                leaves.require(HEAD_WEIGHT)?,
                Some(leaves.require(HEAD_BIAS)?),
            )?;
            let loss = engine.loss().value(&logits, support)?;
            let context = || format!("head fine-tuning step {}", step + 1);
            finite_value(&loss, &context)?;
            let grads = leaves.gradients(&loss, GradGraph::Detach)?;
            check_finite(&grads, &context)?;
            head = optimizer.step(&head, &grads, self.lr)?;
        }
        let mut adapted = params.detach();
        adapted.set(HEAD_WEIGHT, head.require(HEAD_WEIGHT)?.clone());
        adapted.set(HEAD_BIAS, head.require(HEAD_BIAS)?.clone());
        Ok(adapted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Loss, TaskLoss, WholeGraph};
    use crate::meta::test_models::{dense_episode, TwoLayerProbe};
    use crate::models::FewShotModel;

    fn probe() -> TwoLayerProbe {
        TwoLayerProbe {
            classes: 3,
            dim: 4,
            hidden: 6,
        }
    }

    fn support_loss(model: &dyn FewShotModel, p: &ParamSet, support: &Batch) -> f64 {
        TaskLoss
            .value(&model.logits(p, support, Mode::Eval).unwrap(), support)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    #[test]
    fn fine_tuning_lowers_the_support_loss_and_rejects_bad_settings() {
        let model = probe();
        let (params, task) = (model.init_params(1).unwrap(), dense_episode(3, 4, 4, 5));
        let before = support_loss(&model, &params, &task.support);
        let tuned = Finetune {
            steps: 30,
            lr: 0.05,
        }
        .adapt(&WholeGraph::new(&model), &params, &task.support, Mode::Eval)
        .unwrap();
        let after = support_loss(&model, &tuned, &task.support);
        assert!(after < 0.5 * before, "{before} -> {after}");
        let fresh = LoraFinetune {
            steps: 30,
            lr: 0.05,
            seed: 3,
        }
        .adapt(&WholeGraph::new(&model), &params, &task.support, Mode::Eval)
        .unwrap();
        assert!(
            support_loss(&model, &fresh, &task.support)
                < support_loss(&model, &model.init_params(3).unwrap(), &task.support)
        );
        for bad in [
            Finetune { steps: 0, lr: 0.1 },
            Finetune { steps: 3, lr: -0.1 },
        ] {
            assert!(bad
                .adapt(&WholeGraph::new(&model), &params, &task.support, Mode::Eval)
                .is_err());
        }
    }

    /// No adaptation leaves the parameters as they are.
    #[test]
    fn no_adaptation_changes_nothing() {
        let model = probe();
        let (params, task) = (model.init_params(1).unwrap(), dense_episode(3, 4, 2, 5));
        let same = NoAdaptation
            .adapt(&WholeGraph::new(&model), &params, &task.support, Mode::Eval)
            .unwrap();
        assert_eq!(same.sub(&params).unwrap().norm().unwrap(), 0.0);
    }

    /// The prototype's logits are the scaled cosine similarities of the query's
    /// features to the support's class means, computed here independently.
    #[test]
    fn prototype_scores_by_cosine_to_the_class_means() {
        let model = probe();
        let (params, task) = (model.init_params(2).unwrap(), dense_episode(3, 4, 3, 7));
        let proto = Prototype { temperature: 2.0 };
        let adapted = proto
            .adapt(&WholeGraph::new(&model), &params, &task.support, Mode::Eval)
            .unwrap();
        let logits = proto
            .predict(&WholeGraph::new(&model), &adapted, &task.query, Mode::Eval)
            .unwrap()
            .to_vec2::<f64>()
            .unwrap();
        let unit = |v: Vec<f64>| {
            let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
            v.into_iter().map(|x| x / n).collect::<Vec<_>>()
        };
        let support = model
            .features(&params, &task.support, Mode::Eval)
            .unwrap()
            .to_vec2::<f64>()
            .unwrap();
        let labels = task.support.labels.to_vec1::<u32>().unwrap();
        let means: Vec<Vec<f64>> = (0..3)
            .map(|c| {
                let rows: Vec<Vec<f64>> = support
                    .iter()
                    .zip(&labels)
                    .filter(|(_, &l)| l == c)
                    .map(|(r, _)| unit(r.clone()))
                    .collect();
                let mean = (0..rows[0].len())
                    .map(|j| rows.iter().map(|r| r[j]).sum::<f64>() / rows.len() as f64)
                    .collect();
                unit(mean)
            })
            .collect();
        let query = model
            .features(&params, &task.query, Mode::Eval)
            .unwrap()
            .to_vec2::<f64>()
            .unwrap();
        for (row, scores) in query.iter().zip(&logits) {
            let q = unit(row.clone());
            for (mean, &score) in means.iter().zip(scores) {
                let cosine: f64 = q.iter().zip(mean).map(|(a, b)| a * b).sum();
                assert!((2.0 * cosine - score).abs() < 1e-12, "{cosine} vs {score}");
            }
        }
        // Regression has no class means.
        let regression = Batch::regression(
            Tensor::zeros((3, 4), candle_core::DType::F64, &candle_core::Device::Cpu).unwrap(),
            Tensor::zeros((3, 1), candle_core::DType::F64, &candle_core::Device::Cpu).unwrap(),
        )
        .unwrap();
        assert!(proto
            .adapt(&WholeGraph::new(&model), &params, &regression, Mode::Eval)
            .is_err());
    }

    /// Head fine-tuning trains the head alone (the rest is unchanged), from a zero head
    /// of the task's classes or from the given one, and lowers the support loss.
    #[test]
    fn head_fine_tuning_trains_only_the_head() {
        let model = crate::models::mlp::Mlp::new(
            4,
            &[5],
            3,
            candle_core::DType::F64,
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let (params, task) = (model.init_params(4).unwrap(), dense_episode(3, 4, 4, 9));
        for reset_head in [true, false] {
            let tuned = HeadFinetune {
                steps: 40,
                lr: 0.05,
                reset_head,
            }
            .adapt(&WholeGraph::new(&model), &params, &task.support, Mode::Eval)
            .unwrap();
            for name in ["layers.0.weight", "layers.0.bias"] {
                let gap = (tuned.require(name).unwrap() - params.require(name).unwrap())
                    .unwrap()
                    .abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap();
                assert_eq!(gap, 0.0, "{name} changed");
            }
            let start = if reset_head {
                let mut zero = params.clone();
                zero.set(
                    HEAD_WEIGHT,
                    params.require(HEAD_WEIGHT).unwrap().zeros_like().unwrap(),
                );
                zero.set(
                    HEAD_BIAS,
                    params.require(HEAD_BIAS).unwrap().zeros_like().unwrap(),
                );
                zero
            } else {
                params.clone()
            };
            assert!(
                support_loss(&model, &tuned, &task.support)
                    < support_loss(&model, &start, &task.support)
            );
        }
    }
}
