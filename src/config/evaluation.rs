//! The `evaluation` section: how adapted models are scored.

use serde::{Deserialize, Serialize};

use super::choice::choice_enum;
use super::validate::{at_least, in_open};
use crate::Result;

choice_enum! {
    /// Which statistics the vision backbones' BatchNorm layers use in evaluation
    /// (training always normalises with each batch's own).
    pub enum BatchNormEvaluation {
        /// Each set's own statistics: support and query sets normalised apart
        /// (transductive, as MAML evaluates).
        Batch = "batch",
        /// Running statistics: each layer's population mean and variance, estimated
        /// over `batch_norm_episodes` training episodes before each evaluation (as
        /// ProtoNets' and FS-CT's reference code evaluate in PyTorch's eval mode).
        Running = "running",
    }
    default = Batch;
}

/// Largest number of adaptation steps `evaluation.curve_steps` accepts: each point
/// adapts every test task that many times.
const MAX_CURVE_STEPS: usize = 1000;

impl EvaluationConfig {
    /// `curve_steps` sorted, without repeats.
    pub fn curve_step_counts(&self) -> Vec<usize> {
        let mut steps = self.curve_steps.clone();
        steps.sort_unstable();
        steps.dedup();
        steps
    }
}

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
    /// BatchNorm's statistics in evaluation and validation (vision backbones).
    pub batch_norm: BatchNormEvaluation,
    /// Training episodes whose support and query sets estimate the running
    /// statistics (at least 1).
    pub batch_norm_episodes: usize,
    /// `melora full` only: numbers of adaptation steps at which every method with an
    /// inner loop (and the pre-trained baseline, adapted by the same SGD steps) is
    /// scored again on the test episodes, for the score-against-steps curve; on
    /// sinusoid tasks also the fits plotted for the first test task. Empty: no curve.
    pub curve_steps: Vec<usize>,
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
            batch_norm: BatchNormEvaluation::Batch,
            batch_norm_episodes: 50,
            curve_steps: Vec::new(),
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
        at_least(
            "evaluation.batch_norm_episodes",
            self.batch_norm_episodes,
            1,
        )?;
        if let Some(&steps) = self.curve_steps.iter().find(|&&s| s > MAX_CURVE_STEPS) {
            return Err(crate::Error::Config {
                key: "evaluation.curve_steps".into(),
                message: format!(
                    "{steps} adaptation steps is more than the curve's limit of \
                     {MAX_CURVE_STEPS}; list step counts such as [0, 1, 5, 10]"
                ),
            });
        }
        if let Some(patience) = self.early_stopping_patience {
            at_least("evaluation.early_stopping_patience", patience, 1)?;
        }
        // Per-episode scores are kept for the statistics.
        super::validate::at_most_count("evaluation.episodes", self.episodes)?;
        super::validate::at_most_count("evaluation.val_episodes", self.val_episodes)?;
        Ok(())
    }
}
