//! Typed configuration, read from YAML.
//!
//! A [`Config`] has one section per concern; every key has a default, so a
//! file sets only what differs (an empty file is the default configuration).
//! `configs/default.yml` in the repository shows every key with its default.
//!
//! | section | what it sets |
//! |---|---|
//! | `seed` | seed of every random choice (initialization, task sampling, dropout) |
//! | `device` | where tensors live and ops run: `cpu` (default), `cuda` or `cuda:N` ([`ComputeDevice`]; CUDA needs the `cuda` build) |
//! | [`model`](ModelConfig) | the network to adapt: a built-in tiny model or a local Hugging Face directory, sequence length, dtype |
//! | [`lora`](LoraConfig) | adapter rank, scale, dropout and the layers adapted |
//! | [`meta_learning`](MetaLearningConfig) | the [`Method`], tasks per meta-batch, iterations, the inner loop (steps, learning rate, [`InnerMode`]) and the outer loop (optimizer, learning rate, weight decay, clipping, schedule) |
//! | [`memory_optimization`](MemoryOptimizationConfig) | micro-batches, activation checkpointing, activation precision, the Hessian approximation of `melora` |
//! | [`data`](DataConfig) | the [`DataSource`] and the task shape (`n_way` classes, `k_shot` support and `n_query` query examples per class) |
//! | [`evaluation`](EvaluationConfig) | test episodes, confidence level, validation interval |
//! | [`tracking`](TrackingConfig) | output folder, experiment name, TensorBoard and MLflow output |
//!
//! Unknown keys, values of the wrong type and values out of range are all
//! errors ([`Error::Config`]) whose one-line message names the dotted key
//! (`lora.rank`), the value and what is allowed. Command-line values come in
//! as [`ConfigOverrides`].
//!
//! ```
//! use melora::config::{Config, Method};
//!
//! let config = Config::from_yaml_str("lora:\n  rank: 4\nmeta_learning:\n  method: fomaml\n")?;
//! assert_eq!(config.lora.rank, 4);
//! assert_eq!(config.meta_learning.method, Method::Fomaml);
//! assert_eq!(config.lora.alpha, 16.0); // the default
//!
//! let err = Config::from_yaml_str("lora:\n  rank: 0\n").unwrap_err();
//! assert_eq!(err.to_string(), "config: `lora.rank`: must be at least 1, got 0");
//! # Ok::<(), melora::Error>(())
//! ```

mod backbone;
mod bytes;
mod choice;
mod comparison;
mod data;
mod device;
mod evaluation;
mod learner;
mod load;
mod lora;
mod memory_optimization;
mod meta_learning;
mod model;
mod overrides;
pub(crate) mod pairing;
mod tracking;
mod validate;

#[cfg(test)]
mod tests;

use std::path::Path;

use serde::{Deserialize, Serialize};

pub use backbone::Backbone;
pub use bytes::parse_bytes;
pub use choice::UnknownValue;
pub use comparison::{AblationConfig, ComparisonConfig, PretrainConfig, PretrainTune, Variant};
pub use data::{
    DataConfig, DataSource, ImageColor, ImageNormalization, SmallClasses, SyntheticTask,
};
pub use data::{MAX_EPISODE_EXAMPLES, MAX_IMAGE_SIZE};
pub use device::{ComputeDevice, UnknownDevice};
pub use evaluation::{BatchNormEvaluation, EvaluationConfig};
pub use learner::{Baseline, LearnerSpec};
pub use lora::LoraConfig;
pub use memory_optimization::{
    BudgetLever, BudgetLimit, CheckpointPlan, CheckpointingConfig, GradientAccumulationConfig,
    HessianApproximationConfig, HessianKind, LossScalingConfig, MemoryBudgetConfig,
    MemoryOptimizationConfig, Precision,
};
pub use meta_learning::{
    FsctFeatureNorm, FsctSettings, InnerAdapt, InnerLoopConfig, InnerMode, InnerOptimizer,
    LrSchedule, MetaLearningConfig, Method, OuterLoopConfig, OuterOptimizer, ProtoNetConfig,
    PrototypeDistance,
};
pub use model::{DType, HeadInit, ModelConfig, Quantization};
pub use overrides::ConfigOverrides;
pub use tracking::TrackingConfig;

use crate::{Error, Result};

/// The whole configuration of a run. See the [module documentation](self).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Seed of every random choice.
    pub seed: u64,
    /// Where tensors live and ops run: `cpu`, `cuda` or `cuda:N`.
    pub device: ComputeDevice,
    /// The network to adapt.
    pub model: ModelConfig,
    /// The low-rank adapters.
    pub lora: LoraConfig,
    /// The learner and its loops.
    pub meta_learning: MetaLearningConfig,
    /// Memory-saving techniques.
    pub memory_optimization: MemoryOptimizationConfig,
    /// Tasks and where their examples come from.
    pub data: DataConfig,
    /// Scoring of adapted models.
    pub evaluation: EvaluationConfig,
    /// Where results are written.
    pub tracking: TrackingConfig,
    /// What `melora full` compares.
    pub comparison: ComparisonConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            seed: 42,
            device: ComputeDevice::Cpu,
            model: ModelConfig::default(),
            lora: LoraConfig::default(),
            meta_learning: MetaLearningConfig::default(),
            memory_optimization: MemoryOptimizationConfig::default(),
            data: DataConfig::default(),
            evaluation: EvaluationConfig::default(),
            tracking: TrackingConfig::default(),
            comparison: ComparisonConfig::default(),
        }
    }
}

impl Config {
    /// Parses and validates a YAML document; keys left out take their defaults.
    pub fn from_yaml_str(text: &str) -> Result<Self> {
        let config = load::parse(text, None)?;
        config.validate()?;
        Ok(config)
    }

    /// Reads, parses and validates a YAML file; an empty file gives the defaults.
    ///
    /// A file that cannot be read is an [`Error::Io`], a document that is not a
    /// mapping an [`Error::Format`], both naming the file; errors about one key
    /// are [`Error::Config`] with the file in the message.
    pub fn from_file(path: &Path) -> Result<Self> {
        let config = load::read(path)?;
        config
            .validate()
            .map_err(|e| load::annotate(e, |_| Some(format!("in {}", path.display()))))?;
        Ok(config)
    }

    /// The file at `path` (or the defaults when `None`) with `overrides`
    /// applied, then validated once: an override may correct a bad value of
    /// the file. Errors name the flag of an overridden key, or the file.
    pub fn load(path: Option<&Path>, overrides: &ConfigOverrides) -> Result<Self> {
        let mut config = match path {
            Some(path) => load::read(path)?,
            None => Config::default(),
        };
        overrides.write_into(&mut config);
        config.validate().map_err(|e| {
            load::annotate(e, |key| match overrides.flag_for(key) {
                Some(flag) => Some(format!("set by {flag}")),
                None => path.map(|p| format!("in {}", p.display())),
            })
        })?;
        Ok(config)
    }

    /// Applies `overrides` and validates the result. On error `self` is left
    /// unchanged, and the message names the flag of an overridden key.
    pub fn apply(&mut self, overrides: &ConfigOverrides) -> Result<()> {
        let mut updated = self.clone();
        overrides.write_into(&mut updated);
        updated.validate().map_err(|e| {
            load::annotate(e, |key| {
                overrides.flag_for(key).map(|flag| format!("set by {flag}"))
            })
        })?;
        *self = updated;
        Ok(())
    }

    /// Checks every value against its allowed range, reporting the first
    /// problem as an [`Error::Config`]. NaN and infinities are rejected.
    pub fn validate(&self) -> Result<()> {
        self.model.validate()?;
        self.lora.validate()?;
        self.meta_learning.validate()?;
        self.memory_optimization.validate()?;
        self.data.validate()?;
        self.evaluation.validate()?;
        self.tracking.validate()?;
        self.comparison.validate()?;
        if !self.comparison.ablation.hessian.is_empty()
            && self.meta_learning.method != Method::Melora
        {
            return Err(validate::invalid(
                "comparison.ablation.hessian",
                format!(
                    "Hessian approximations only vary the melora method, but \
                     meta_learning.method is {}; empty this list or use method: melora",
                    self.meta_learning.method
                ),
            ));
        }
        pairing::validate(self)?;
        if self.memory_optimization.checkpointing.selective
            && pairing::ModelKind::of(self) != pairing::ModelKind::Transformer
        {
            return Err(validate::invalid(
                "memory_optimization.checkpointing.selective",
                format!(
                    "selective recomputation rebuilds the attention and feed-forward blocks \
                     of transformer layers, and {} has none; set it to false \
                     (checkpointing.enabled cuts a vision backbone at its stages)",
                    self.model.name
                ),
            ));
        }
        if self.evaluation.batch_norm == BatchNormEvaluation::Running
            && !matches!(pairing::ModelKind::of(self), pairing::ModelKind::Vision(_))
        {
            return Err(validate::invalid(
                "evaluation.batch_norm",
                format!(
                    "{} has no BatchNorm layers: running statistics apply to the vision \
                     backbones ({}); set it to batch",
                    self.model.name,
                    Backbone::ALL
                        .iter()
                        .map(|b| b.name())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        self.validate_precision()
    }

    /// The combinations of `model` and `memory_optimization.precision` the models
    /// implement.
    fn validate_precision(&self) -> Result<()> {
        let precision = self.memory_optimization.precision;
        // Vision backbones and the mlp train every parameter: there is no frozen base to
        // store differently. Backbones run their activations in bf16 (f32 master weights).
        let kind = pairing::ModelKind::of(self);
        let all_trained = kind.trains_everything();
        let vision = matches!(kind, pairing::ModelKind::Vision(_));
        if precision != Precision::F32 {
            if self.model.dtype != DType::F32 {
                return Err(validate::invalid(
                    "memory_optimization.precision",
                    format!(
                        "{precision} mixed precision keeps the trainable tensors in f32, but \
                         model.dtype is {}; set model.dtype: f32 (or precision: f32 to run the \
                         whole model in {})",
                        self.model.dtype, self.model.dtype
                    ),
                ));
            }
            if vision && precision != Precision::Bf16 {
                return Err(validate::invalid(
                    "memory_optimization.precision",
                    format!(
                        "{} runs mixed precision in bf16 only (f16 activations would need \
                         loss scaling); set precision: bf16 or f32",
                        self.model.name
                    ),
                ));
            }
            if all_trained && !vision {
                return Err(validate::invalid(
                    "memory_optimization.precision",
                    format!(
                        "{} has no frozen base (every parameter is trained), so {precision} \
                         mixed precision does not apply; set it to f32 with {}",
                        self.model.name, self.model.name
                    ),
                ));
            }
        }
        if precision == Precision::F16 && self.memory_optimization.checkpointing.enabled {
            // The checkpointed passes do not run under the loss scale, and f16 gradients
            // underflow without it.
            return Err(validate::invalid(
                "memory_optimization.checkpointing.enabled",
                "gradient checkpointing does not run under f16 loss scaling; use precision: \
                 bf16 with checkpointing (same memory, no scaling needed), or turn \
                 checkpointing off with f16",
            ));
        }
        if self.model.quantization == Quantization::Int8 && all_trained {
            return Err(validate::invalid(
                "model.quantization",
                format!(
                    "{} has no frozen base (every parameter is trained) to store in int8; set \
                     it to none with {}",
                    self.model.name, self.model.name
                ),
            ));
        }
        Ok(())
    }

    /// The configuration as YAML, every key written out; parsing it back
    /// gives an equal configuration.
    pub fn to_yaml_string(&self) -> Result<String> {
        serde_norway::to_string(self).map_err(|e| Error::Config {
            key: "(top level)".to_owned(),
            message: format!("cannot be written as YAML: {e}"),
        })
    }
}
