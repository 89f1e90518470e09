//! The `lora` section: shape and scaling of the low-rank adapters.

use serde::{Deserialize, Serialize};

use super::validate::{at_least, in_half_open, invalid, non_empty, positive};
use crate::Result;

/// The `lora` section.
///
/// An adapted linear layer computes `W x + (alpha / rank) * B A x`, with `A`
/// of shape `rank × in` and `B` of shape `out × rank`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraConfig {
    /// Rank of the adapters (at least 1).
    pub rank: usize,
    /// Scale numerator: the update is scaled by `alpha / rank` (> 0).
    pub alpha: f64,
    /// Dropout on the adapter's input during training, in `[0, 1)`.
    pub dropout: f64,
    /// Names of the linear layers to adapt (e.g. `query`, `value`); `None`
    /// uses the model family's defaults.
    pub target_modules: Option<Vec<String>>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            rank: 8,
            alpha: 16.0,
            dropout: 0.0,
            target_modules: None,
        }
    }
}

impl LoraConfig {
    pub(crate) fn validate(&self) -> Result<()> {
        at_least("lora.rank", self.rank, 1)?;
        positive("lora.alpha", self.alpha)?;
        in_half_open("lora.dropout", self.dropout, 0.0, 1.0)?;
        if let Some(modules) = &self.target_modules {
            if modules.is_empty() {
                return Err(invalid(
                    "lora.target_modules",
                    "must name at least one module, or be left out for the model's defaults",
                ));
            }
            for (i, module) in modules.iter().enumerate() {
                non_empty(&format!("lora.target_modules[{i}]"), module)?;
            }
        }
        // A rank near usize::MAX overflowed rank × features when the adapters are built.
        super::validate::at_most_count("lora.rank", self.rank)?;
        Ok(())
    }
}
