//! The `evaluation` section: how adapted models are scored.

use serde::{Deserialize, Serialize};

use super::validate::{at_least, in_open};
use crate::Result;

/// The `evaluation` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvaluationConfig {
    /// Test episodes whose accuracies are averaged (at least 1).
    pub episodes: usize,
    /// Level of the reported confidence interval, in `(0, 1)`.
    pub confidence: f64,
    /// Validate every this many outer iterations (at least 1).
    pub eval_every: usize,
    /// Meta-validation episodes per validation (at least 1).
    pub val_episodes: usize,
    /// Stop training after this many validations without a new best score;
    /// `None` trains for every iteration.
    pub early_stopping_patience: Option<usize>,
    /// AdamW steps of the `finetune` and `lora-finetune` baselines on each test
    /// task's support set (at least 1).
    pub finetune_steps: usize,
    /// Their AdamW learning rate (> 0). Separate from the inner SGD rate: AdamW's
    /// first steps move every entry by about the rate, so a rate fit for SGD on a
    /// small gradient (0.5) would throw LoRA's zero B far from the base model.
    pub finetune_lr: f64,
}

impl Default for EvaluationConfig {
    fn default() -> Self {
        EvaluationConfig {
            episodes: 600,
            confidence: 0.95,
            eval_every: 100,
            val_episodes: 50,
            early_stopping_patience: None,
            finetune_steps: 10,
            finetune_lr: 0.01,
        }
    }
}

impl EvaluationConfig {
    pub(crate) fn validate(&self) -> Result<()> {
        at_least("evaluation.episodes", self.episodes, 1)?;
        in_open("evaluation.confidence", self.confidence, 0.0, 1.0)?;
        at_least("evaluation.eval_every", self.eval_every, 1)?;
        at_least("evaluation.val_episodes", self.val_episodes, 1)?;
        at_least("evaluation.finetune_steps", self.finetune_steps, 1)?;
        super::validate::positive("evaluation.finetune_lr", self.finetune_lr)?;
        if let Some(patience) = self.early_stopping_patience {
            at_least("evaluation.early_stopping_patience", patience, 1)?;
        }
        // Per-episode scores are kept for the statistics.
        super::validate::at_most_count("evaluation.episodes", self.episodes)?;
        super::validate::at_most_count("evaluation.val_episodes", self.val_episodes)?;
        Ok(())
    }
}
