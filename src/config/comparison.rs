//! The `comparison` section: what `melora full` runs besides the configured method —
//! baselines, seeds and an ablation grid.

use serde::{Deserialize, Serialize};

use super::choice::choice_enum;
use super::validate::{at_least, invalid};
use super::{Baseline, Config, HessianKind, InnerMode, LearnerSpec, Method, PrototypeDistance};
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
        /// MetaSGD (learned per-entry step sizes), recompute mode.
        Metasgd = "metasgd",
        /// Prototypical networks, squared Euclidean distance.
        Protonet = "protonet",
        /// Prototypical networks, scaled cosine similarity.
        ProtonetCosine = "protonet-cosine",
        /// The Few-Shot Cosine Transformer, cosine attention.
        FsctCosine = "fsct_cosine",
        /// The Few-Shot Cosine Transformer, softmax attention.
        FsctSoftmax = "fsct_softmax",
        /// Full fine-tuning (every base weight and the head) on each test task.
        Finetune = "finetune",
        /// A fresh LoRA adapter and head fine-tuned on each test task.
        LoraFinetune = "lora-finetune",
        /// The initial model without adaptation.
        NoAdaptation = "no-adaptation",
        /// Nearest class mean of the frozen base's features.
        Prototype = "prototype",
        /// Supervised pre-training on the meta-training classes, then a new head
        /// fine-tuned on each test task.
        PretrainFinetune = "pretrain-finetune",
        /// The configured method's meta-trained initialisation, adapted to each test
        /// task by the fine-tuning baselines' optimiser instead of its inner loop:
        /// what the learned start brings apart from the inner optimiser.
        MetaInitFinetune = "meta-init-finetune",
    }
    default = Maml;
}

impl Variant {
    /// The variant a configuration runs.
    pub fn of(config: &Config) -> Self {
        match LearnerSpec::of(config) {
            LearnerSpec::Maml {
                mode: InnerMode::Recompute,
            } => Self::Maml,
            LearnerSpec::Maml {
                mode: InnerMode::FullGraph,
            } => Self::MamlFullGraph,
            LearnerSpec::Fomaml => Self::Fomaml,
            LearnerSpec::Reptile => Self::Reptile,
            LearnerSpec::Melora { hessian, .. } => match hessian {
                HessianKind::None => Self::MeloraNone,
                HessianKind::Diagonal => Self::MeloraDiagonal,
                HessianKind::GaussNewton => Self::MeloraGaussNewton,
                HessianKind::BlockDiagonal => Self::MeloraBlockDiagonal,
            },
            LearnerSpec::MetaSgd { .. } => Self::Metasgd,
            LearnerSpec::Fsct { cosine: true } => Self::FsctCosine,
            LearnerSpec::Fsct { cosine: false } => Self::FsctSoftmax,
            LearnerSpec::ProtoNet { distance, .. } => match distance {
                PrototypeDistance::Euclidean => Self::Protonet,
                PrototypeDistance::Cosine => Self::ProtonetCosine,
            },
            LearnerSpec::Baseline(baseline) => match baseline {
                Baseline::Finetune => Self::Finetune,
                Baseline::LoraFinetune => Self::LoraFinetune,
                Baseline::NoAdaptation => Self::NoAdaptation,
                Baseline::Prototype => Self::Prototype,
                Baseline::PretrainFinetune => Self::PretrainFinetune,
            },
        }
    }

    /// `config` changed to run this variant (everything else kept). The
    /// meta-initialisation baseline keeps the configured method, whose checkpoint it
    /// adapts differently.
    pub fn apply(self, config: &Config) -> Config {
        let mut c = config.clone();
        let (method, mode, hessian) = match self {
            Self::MetaInitFinetune => return c,
            Self::FsctCosine => (Method::FsctCosine, None, None),
            Self::FsctSoftmax => (Method::FsctSoftmax, None, None),
            Self::Protonet | Self::ProtonetCosine => {
                c.meta_learning.method = Method::Protonet;
                c.meta_learning.protonet.distance = if self == Self::Protonet {
                    PrototypeDistance::Euclidean
                } else {
                    PrototypeDistance::Cosine
                };
                return c;
            }
            Self::Metasgd => (Method::Metasgd, Some(InnerMode::Recompute), None),
            Self::NoAdaptation => (Method::NoAdaptation, None, None),
            Self::Prototype => (Method::Prototype, None, None),
            Self::PretrainFinetune => (Method::PretrainFinetune, None, None),
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

    /// Whether the variant meta-trains (the baselines only adapt; pre-training is
    /// supervised, not meta-training).
    pub fn meta_trains(self) -> bool {
        !self.is_baseline()
    }

    /// Whether the variant is a baseline without meta-learning of its own.
    pub fn is_baseline(self) -> bool {
        matches!(
            self,
            Self::Finetune
                | Self::LoraFinetune
                | Self::NoAdaptation
                | Self::Prototype
                | Self::PretrainFinetune
                | Self::MetaInitFinetune
        )
    }

    /// Whether the variant adapts by the fine-tuning optimiser (AdamW steps), whose
    /// learning rate `melora full` chooses by a sweep on meta-validation tasks.
    pub fn fine_tunes(self) -> bool {
        matches!(
            self,
            Self::Finetune | Self::LoraFinetune | Self::PretrainFinetune | Self::MetaInitFinetune
        )
    }
}

/// The `comparison.pretrain` section: the supervised pre-training of the
/// `pretrain-finetune` baseline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PretrainConfig {
    /// AdamW steps of supervised training on the meta-training classes (at least 1);
    /// `None`: `meta_learning.num_iterations`, as many steps as meta-training takes.
    pub steps: Option<usize>,
    /// Examples per step (at least 1); `None`: as many as a meta-batch holds
    /// (`meta_batch_size × n_way × (k_shot + n_query)`), so that pre-training sees as
    /// many examples as meta-training.
    pub batch_size: Option<usize>,
    /// AdamW learning rate (> 0); `None`: `meta_learning.outer.lr`.
    pub lr: Option<f64>,
    /// What is fine-tuned on each test task afterwards: `head` (a new head on the
    /// pre-trained features, Chen et al.'s Baseline) or `all` (the adapters too).
    pub tune: PretrainTune,
}

choice_enum! {
    /// What the `pretrain-finetune` baseline fine-tunes per task.
    pub enum PretrainTune {
        /// The head only (new for data sets whose test classes are new).
        Head = "head",
        /// Every trainable tensor: the adapters (or a dense model's weights) and the
        /// head.
        All = "all",
    }
    default = Head;
}

impl PretrainConfig {
    /// Steps, batch size and learning rate, with the defaults resolved against
    /// `config` (see the fields).
    pub fn resolved(&self, config: &Config) -> (usize, usize, f64) {
        let ml = &config.meta_learning;
        let data = &config.data;
        (
            self.steps.unwrap_or(ml.num_iterations),
            self.batch_size.unwrap_or_else(|| {
                ml.meta_batch_size
                    .saturating_mul(data.n_way)
                    .saturating_mul(data.k_shot.saturating_add(data.n_query))
            }),
            self.lr.unwrap_or(ml.outer.lr),
        )
    }
}

impl Default for PretrainConfig {
    fn default() -> Self {
        Self {
            steps: None,
            batch_size: None,
            lr: None,
            tune: PretrainTune::Head,
        }
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
    /// Learning rates tried for each fine-tuning baseline on the meta-validation
    /// tasks (`evaluation.val_episodes` of them) before it is tested with the best
    /// one; empty uses `evaluation.finetune_lr` untried.
    pub finetune_lr_sweep: Vec<f64>,
    /// Pre-training of the `pretrain-finetune` baseline.
    pub pretrain: PretrainConfig,
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
                Variant::NoAdaptation,
                Variant::Prototype,
                Variant::LoraFinetune,
                Variant::Finetune,
                Variant::PretrainFinetune,
                Variant::MetaInitFinetune,
            ],
            seeds: 1,
            ablation: AblationConfig::default(),
            memory_inner_steps: vec![1, 2, 4, 8],
            finetune_lr_sweep: vec![1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2],
            pretrain: PretrainConfig::default(),
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
        for (i, &lr) in self.finetune_lr_sweep.iter().enumerate() {
            super::validate::positive(&format!("comparison.finetune_lr_sweep[{i}]"), lr)?;
        }
        for (key, value) in [
            ("comparison.pretrain.steps", self.pretrain.steps),
            ("comparison.pretrain.batch_size", self.pretrain.batch_size),
        ] {
            if let Some(value) = value {
                at_least(key, value, 1)?;
                super::validate::at_most_count(key, value)?;
            }
        }
        if let Some(lr) = self.pretrain.lr {
            super::validate::positive("comparison.pretrain.lr", lr)?;
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
