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
}

impl Default for EvaluationConfig {
    fn default() -> Self {
        EvaluationConfig {
            episodes: 600,
            confidence: 0.95,
            eval_every: 100,
        }
    }
}

impl EvaluationConfig {
    pub(crate) fn validate(&self) -> Result<()> {
        at_least("evaluation.episodes", self.episodes, 1)?;
        in_open("evaluation.confidence", self.confidence, 0.0, 1.0)?;
        at_least("evaluation.eval_every", self.eval_every, 1)
    }
}
