//! Baselines without meta-learning, for comparisons: fine-tuning per task.
//!
//! - [`Finetune`]: every trainable parameter of the model (LoRA and head for
//!   transformers, the whole network for Conv4), starting from the given
//!   (pre-trained, not meta-trained) initialisation; the frozen base stays frozen.
//! - [`LoraFinetune`]: a fresh adapter and head per task (PEFT's init: the adapted
//!   model starts equal to the base model), trained from scratch.
//!
//! Both take `epochs` full-batch AdamW steps on the support set.

use crate::data::Batch;
use crate::models::FewShotModel;
use crate::nn::Mode;
use crate::optim::{Optimizer, OptimizerKind};
use crate::tensor::ParamSet;
use crate::{Error, Result};

use super::inner::gradient;
use super::Adapter;

fn train(
    model: &dyn FewShotModel,
    start: &ParamSet,
    support: &Batch,
    epochs: usize,
    lr: f64,
    mode: Mode,
) -> Result<ParamSet> {
    if epochs == 0 {
        return Err(Error::InvalidArgument(
            "fine-tuning needs at least 1 epoch".into(),
        ));
    }
    if !(lr.is_finite() && lr > 0.0) {
        return Err(Error::InvalidArgument(format!(
            "fine-tuning learning rate must be > 0, got {lr}"
        )));
    }
    let mut optimizer = Optimizer::new(OptimizerKind::adamw(0.0));
    let mut theta = start.detach();
    for epoch in 0..epochs {
        let context = || format!("fine-tuning epoch {}", epoch + 1);
        let (grads, _, _) = gradient(model, &theta, support, mode, None, &context)?;
        theta = optimizer.step(&theta, &grads, lr)?;
    }
    Ok(theta)
}

/// Fine-tunes all trainable parameters per task from the given initialisation.
#[derive(Debug, Clone, Copy)]
pub struct Finetune {
    /// Full-batch steps on the support set.
    pub epochs: usize,
    /// AdamW learning rate.
    pub lr: f64,
}

impl Adapter for Finetune {
    fn adapt(
        &self,
        model: &dyn FewShotModel,
        params: &ParamSet,
        support: &Batch,
        mode: Mode,
    ) -> Result<ParamSet> {
        train(model, params, support, self.epochs, self.lr, mode)
    }
}

/// Trains a fresh LoRA adapter and head per task, ignoring any meta-learned values.
#[derive(Debug, Clone, Copy)]
pub struct LoraFinetune {
    /// Full-batch steps on the support set.
    pub epochs: usize,
    /// AdamW learning rate.
    pub lr: f64,
    /// Seed of the fresh adapter and head.
    pub seed: u64,
}

impl Adapter for LoraFinetune {
    fn adapt(
        &self,
        model: &dyn FewShotModel,
        _params: &ParamSet,
        support: &Batch,
        mode: Mode,
    ) -> Result<ParamSet> {
        let fresh = model.init_params(self.seed)?;
        train(model, &fresh, support, self.epochs, self.lr, mode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::loss::batch_loss;
    use crate::meta::test_models::{dense_episode, TwoLayerProbe};

    #[test]
    fn fine_tuning_lowers_the_support_loss_and_rejects_bad_settings() {
        let model = TwoLayerProbe {
            classes: 3,
            dim: 4,
            hidden: 6,
        };
        let (params, task) = (model.init_params(1).unwrap(), dense_episode(3, 4, 4, 5));
        let loss = |p: &ParamSet| {
            batch_loss(&model, p, &task.support, Mode::Eval)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let before = loss(&params);
        let tuned = Finetune {
            epochs: 30,
            lr: 0.05,
        }
        .adapt(&model, &params, &task.support, Mode::Eval)
        .unwrap();
        assert!(
            loss(&tuned) < 0.5 * before,
            "{} -> {}",
            before,
            loss(&tuned)
        );
        let fresh = LoraFinetune {
            epochs: 30,
            lr: 0.05,
            seed: 3,
        }
        .adapt(&model, &params, &task.support, Mode::Eval)
        .unwrap();
        assert!(loss(&fresh) < loss(&model.init_params(3).unwrap()));
        assert!(Finetune { epochs: 0, lr: 0.1 }
            .adapt(&model, &params, &task.support, Mode::Eval)
            .is_err());
        assert!(Finetune {
            epochs: 3,
            lr: -0.1
        }
        .adapt(&model, &params, &task.support, Mode::Eval)
        .is_err());
    }
}
