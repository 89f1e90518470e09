//! The `comparison` section: what `melora full` runs besides the configured method —
//! baselines, seeds and an ablation grid.

use serde::{Deserialize, Serialize};

use super::choice::choice_enum;
use super::validate::{at_least, invalid};
use super::{Config, HessianKind, InnerMode, Method};
use crate::Result;

choice_enum! {
    /// A method with the setting that distinguishes it from its siblings: the name of a
    /// row in a comparison.
    pub enum Variant {
        /// MAML, exact second order, recompute mode.
        Maml = "maml",
        /// MAML, exact second order, every inner step's graph kept.
        MamlFullGraph = "maml-full_graph",
        /// First-order MAML.
        Fomaml = "fomaml",
        /// Reptile.
        Reptile = "reptile",
        /// MELoRA without the Hessian term.
        MeloraNone = "melora-none",
        /// MELoRA with a Hutchinson diagonal.
        MeloraDiagonal = "melora-diagonal",
        /// MELoRA with Gauss-Newton products.
        MeloraGaussNewton = "melora-gauss_newton",
        /// MELoRA with per-tensor Hessian blocks.
        MeloraBlockDiagonal = "melora-block_diagonal",
        /// Fine-tuning the head on each test task, no meta-training.
        Finetune = "finetune",
        /// Fine-tuning LoRA and head on each test task, no meta-training.
        LoraFinetune = "lora-finetune",
    }
    default = Maml;
}

impl Variant {
    /// The variant a configuration runs.
    pub fn of(config: &Config) -> Self {
        let ml = &config.meta_learning;
        match ml.method {
            Method::Maml => match ml.inner.mode {
                InnerMode::Recompute => Self::Maml,
                InnerMode::FullGraph => Self::MamlFullGraph,
            },
            Method::Fomaml => Self::Fomaml,
            Method::Reptile => Self::Reptile,
            Method::Melora => match config.memory_optimization.hessian_approximation.kind {
                HessianKind::None => Self::MeloraNone,
                HessianKind::Diagonal => Self::MeloraDiagonal,
                HessianKind::GaussNewton => Self::MeloraGaussNewton,
                HessianKind::BlockDiagonal => Self::MeloraBlockDiagonal,
            },
            Method::Finetune => Self::Finetune,
            Method::LoraFinetune => Self::LoraFinetune,
        }
    }

    /// `config` changed to run this variant (everything else kept).
    pub fn apply(self, config: &Config) -> Config {
        let mut c = config.clone();
        let (method, mode, hessian) = match self {
            Self::Maml => (Method::Maml, Some(InnerMode::Recompute), None),
            Self::MamlFullGraph => (Method::Maml, Some(InnerMode::FullGraph), None),
            Self::Fomaml => (Method::Fomaml, None, None),
            Self::Reptile => (Method::Reptile, None, None),
            Self::MeloraNone => (Method::Melora, None, Some(HessianKind::None)),
            Self::MeloraDiagonal => (Method::Melora, None, Some(HessianKind::Diagonal)),
            Self::MeloraGaussNewton => (Method::Melora, None, Some(HessianKind::GaussNewton)),
            Self::MeloraBlockDiagonal => (Method::Melora, None, Some(HessianKind::BlockDiagonal)),
            Self::Finetune => (Method::Finetune, None, None),
            Self::LoraFinetune => (Method::LoraFinetune, None, None),
        };
        c.meta_learning.method = method;
        if let Some(mode) = mode {
            c.meta_learning.inner.mode = mode;
        }
        if let Some(kind) = hessian {
            c.memory_optimization.hessian_approximation.kind = kind;
        }
        c
    }

    /// Whether the variant meta-trains (the fine-tuning baselines only adapt).
    pub fn meta_trains(self) -> bool {
        !matches!(self, Self::Finetune | Self::LoraFinetune)
    }
}

/// The `comparison.ablation` section: a grid of the configured method's settings,
/// each point trained and evaluated by `melora full`. Empty lists keep the
/// configuration's value; all empty turns the ablation off.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AblationConfig {
    /// LoRA ranks.
    pub lora_ranks: Vec<usize>,
    /// Inner steps K.
    pub inner_steps: Vec<usize>,
    /// Hessian approximations (the `melora` method only).
    pub hessian: Vec<HessianKind>,
}

impl AblationConfig {
    /// Whether any axis is set.
    pub fn is_enabled(&self) -> bool {
        !(self.lora_ranks.is_empty() && self.inner_steps.is_empty() && self.hessian.is_empty())
    }
}

/// The `comparison` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ComparisonConfig {
    /// Methods run beside `meta_learning.method` (which is skipped here if listed).
    pub baselines: Vec<Variant>,
    /// Training seeds per method (at least 1): seed, seed + 1, ...; every seed is
    /// evaluated on the same test episodes.
    pub seeds: usize,
    /// The ablation grid of the configured method.
    pub ablation: AblationConfig,
    /// Inner-step counts K at which each meta-learning method's peak memory for one
    /// task is measured (the report's memory-vs-K plot); empty skips it.
    pub memory_inner_steps: Vec<usize>,
}

impl Default for ComparisonConfig {
    fn default() -> Self {
        ComparisonConfig {
            baselines: vec![
                Variant::Maml,
                Variant::Fomaml,
                Variant::Reptile,
                Variant::MeloraDiagonal,
                Variant::MeloraGaussNewton,
                Variant::MeloraBlockDiagonal,
                Variant::Finetune,
                Variant::LoraFinetune,
            ],
            seeds: 1,
            ablation: AblationConfig::default(),
            memory_inner_steps: vec![1, 2, 4, 8],
        }
    }
}

impl ComparisonConfig {
    pub(crate) fn validate(&self) -> Result<()> {
        at_least("comparison.seeds", self.seeds, 1)?;
        for (i, v) in self.baselines.iter().enumerate() {
            if self.baselines[..i].contains(v) {
                return Err(invalid(
                    "comparison.baselines",
                    format!("`{v}` is listed twice"),
                ));
            }
        }
        let ablation = &self.ablation;
        if let Some(r) = ablation.lora_ranks.iter().find(|&&r| r == 0) {
            return Err(invalid(
                "comparison.ablation.lora_ranks",
                format!("ranks must be at least 1, got {r}"),
            ));
        }
        if let Some(k) = ablation.inner_steps.iter().find(|&&k| k == 0) {
            return Err(invalid(
                "comparison.ablation.inner_steps",
                format!("inner steps must be at least 1, got {k}"),
            ));
        }
        if let Some(k) = self.memory_inner_steps.iter().find(|&&k| k == 0) {
            return Err(invalid(
                "comparison.memory_inner_steps",
                format!("inner steps must be at least 1, got {k}"),
            ));
        }
        // As lora.rank and meta_learning.inner.steps, which these values replace.
        for (key, values) in [
            ("comparison.ablation.lora_ranks", &ablation.lora_ranks),
            ("comparison.ablation.inner_steps", &ablation.inner_steps),
            ("comparison.memory_inner_steps", &self.memory_inner_steps),
        ] {
            for &value in values {
                super::validate::at_most_count(key, value)?;
            }
        }
        Ok(())
    }
}
