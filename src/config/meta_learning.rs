//! The `meta_learning` section: the learner and its inner and outer loops.

use serde::{Deserialize, Serialize};

use super::choice::choice_enum;
use super::validate::{at_least, invalid, non_negative, positive};
use crate::Result;

choice_enum! {
    /// The learning method.
    pub enum Method {
        /// Model-agnostic meta-learning with the exact second-order meta-gradient.
        Maml = "maml",
        /// First-order MAML: the query gradient at the adapted parameters.
        Fomaml = "fomaml",
        /// Reptile: moves towards the adapted parameters.
        Reptile = "reptile",
        /// MAML with the support Hessian replaced by an approximation
        /// (see `memory_optimization.hessian_approximation`).
        Melora = "melora",
        /// MAML with a learned step size per parameter entry (Li et al., 2017), exact
        /// second order in the configured `inner.mode`.
        Metasgd = "metasgd",
        /// Prototypical networks (Snell et al., 2017): queries scored by their
        /// distance to the class means of the support embeddings
        /// (`meta_learning.protonet`); no inner loop.
        Protonet = "protonet",
        /// The Few-Shot Cosine Transformer (Nguyen et al., 2023): a transformer head
        /// with cosine attention from prototypes to queries, trained with VIC
        /// regularisation (`meta_learning.fsct`); no inner loop.
        FsctCosine = "fsct_cosine",
        /// FS-CT with the softmax attention of the reference project's comparison.
        FsctSoftmax = "fsct_softmax",
        /// Baseline without meta-learning: full fine-tuning per task, every weight of
        /// the base model trainable (not frozen) plus the head.
        Finetune = "finetune",
        /// Baseline without meta-learning: a fresh LoRA adapter and head trained per
        /// task on the frozen base.
        LoraFinetune = "lora-finetune",
        /// Baseline: the initial model as it is, no adaptation (chance for a zero head).
        NoAdaptation = "no-adaptation",
        /// Baseline: nearest class mean (cosine) of the frozen base's pooled features.
        Prototype = "prototype",
        /// Baseline (Chen et al., 2019): supervised training of LoRA and a head over
        /// all meta-training classes, then a new head fine-tuned per task.
        PretrainFinetune = "pretrain-finetune",
    }
    default = Maml;
}

choice_enum! {
    /// Which axis FS-CT's cosine classifier normalises over.
    pub enum FsctFeatureNorm {
        /// The classes of each query and feature, as the reference project does.
        Classes = "classes",
        /// The features of each (query, class) pair.
        Features = "features",
    }
    default = Classes;
}

choice_enum! {
    /// How a prototypical network compares a query with the prototypes.
    pub enum PrototypeDistance {
        /// The negative squared Euclidean distance (Snell et al.).
        Euclidean = "euclidean",
        /// The cosine similarity times `meta_learning.protonet.cosine_scale`.
        Cosine = "cosine",
    }
    default = Euclidean;
}

choice_enum! {
    /// How the second-order meta-gradient is computed.
    pub enum InnerMode {
        /// Keeps the graph of every inner step and back-propagates through all
        /// of them; memory grows linearly with the number of steps.
        FullGraph = "full_graph",
        /// Keeps only the parameters of each inner step and rebuilds one step's
        /// graph at a time; same result, memory constant in the number of steps.
        Recompute = "recompute",
    }
    default = Recompute;
}

choice_enum! {
    /// Which parameters the inner loop adapts.
    pub enum InnerAdapt {
        /// Every trainable parameter (MAML).
        All = "all",
        /// Only the classification head (ANIL, Raghu et al. 2020): the rest is
        /// meta-trained by the outer loop but fixed within a task.
        Head = "head",
    }
    default = All;
}

choice_enum! {
    /// How the inner loop steps on the support loss.
    pub enum InnerOptimizer {
        /// Gradient descent, θ ← θ − α·∇L (every method).
        Sgd = "sgd",
        /// Adam with bias correction and its moments started fresh for every task
        /// (`adam_beta1`, `adam_beta2`, ε = 1e-8), as Reptile's code adapts;
        /// `reptile` and `fomaml` only, whose inner loop is not differentiated.
        Adam = "adam",
    }
    default = Sgd;
}

choice_enum! {
    /// Optimizer applying the averaged meta-gradient.
    pub enum OuterOptimizer {
        /// AdamW (decoupled weight decay).
        Adamw = "adamw",
        /// Plain stochastic gradient descent.
        Sgd = "sgd",
    }
    default = Adamw;
}

choice_enum! {
    /// Learning-rate schedule of the outer loop.
    pub enum LrSchedule {
        /// The same rate throughout.
        Constant = "constant",
        /// Cosine decay from the rate to 0 over all iterations.
        Cosine = "cosine",
        /// Linear warm-up over `warmup_steps`, then cosine decay.
        WarmupCosine = "warmup_cosine",
    }
    default = Constant;
}

/// The `meta_learning` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetaLearningConfig {
    /// The learning method.
    pub method: Method,
    /// Tasks whose meta-gradients are averaged into one outer step (at least 1).
    pub meta_batch_size: usize,
    /// Outer steps of meta-training (at least 1).
    pub num_iterations: usize,
    /// The per-task adaptation loop.
    pub inner: InnerLoopConfig,
    /// The meta-update.
    pub outer: OuterLoopConfig,
    /// Prototypical networks' settings (`method: protonet`).
    pub protonet: ProtoNetConfig,
    /// The Few-Shot Cosine Transformer's settings (`method: fsct_cosine`,
    /// `fsct_softmax`).
    pub fsct: FsctSettings,
}

/// The `meta_learning.fsct` section: the head's sizes (the reference project's
/// defaults) and the loss's weights (its VIC fork's: `λ_V = λ_C = 0` is plain FS-CT).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FsctSettings {
    /// Attention heads (at least 1).
    pub heads: usize,
    /// Width of each head (at least 1).
    pub dim_head: usize,
    /// Hidden width of the feed-forward block (at least 1).
    pub mlp_dim: usize,
    /// Attention + feed-forward rounds, sharing their weights (at least 1).
    pub depth: usize,
    /// The cosine classifier's normalisation axis.
    pub feature_norm: FsctFeatureNorm,
    /// Weight of the query cross-entropy (λ_I, at least 0).
    pub lambda_i: f64,
    /// Weight of VIC's variance hinge on the support embeddings (λ_V, at least 0).
    pub lambda_v: f64,
    /// Weight of VIC's covariance term (λ_C, at least 0).
    pub lambda_c: f64,
}

impl Default for FsctSettings {
    fn default() -> Self {
        Self {
            heads: 8,
            dim_head: 64,
            mlp_dim: 512,
            depth: 1,
            feature_norm: FsctFeatureNorm::Classes,
            lambda_i: 1.0,
            lambda_v: 1.0,
            lambda_c: 0.04,
        }
    }
}

/// The `meta_learning.protonet` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProtoNetConfig {
    /// Query-to-prototype comparison.
    pub distance: PrototypeDistance,
    /// Factor of the cosine similarities (> 0), so that their softmax can be
    /// confident; `distance: cosine` only.
    pub cosine_scale: f64,
}

impl Default for ProtoNetConfig {
    fn default() -> Self {
        Self {
            distance: PrototypeDistance::Euclidean,
            cosine_scale: 10.0,
        }
    }
}

impl Default for MetaLearningConfig {
    fn default() -> Self {
        MetaLearningConfig {
            method: Method::Maml,
            meta_batch_size: 4,
            num_iterations: 1000,
            inner: InnerLoopConfig::default(),
            outer: OuterLoopConfig::default(),
            protonet: ProtoNetConfig::default(),
            fsct: FsctSettings::default(),
        }
    }
}

/// The `meta_learning.inner` section: adaptation to one task's support set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InnerLoopConfig {
    /// Gradient steps on the support set (at least 1).
    pub steps: usize,
    /// Step size of the inner gradient descent (> 0).
    pub lr: f64,
    /// How second-order meta-gradients are computed.
    pub mode: InnerMode,
    /// Which parameters the inner loop adapts: `all`, or only the `head` (ANIL).
    pub adapt: InnerAdapt,
    /// How each step moves: `sgd`, or `adam` (first-order methods only).
    pub optimizer: InnerOptimizer,
    /// First-moment decay of `optimizer: adam` (in [0, 1)); 0 is Reptile's choice,
    /// so that the few steps of a task are not smoothed away.
    pub adam_beta1: f64,
    /// Second-moment decay of `optimizer: adam` (in [0, 1)).
    pub adam_beta2: f64,
}

impl Default for InnerLoopConfig {
    fn default() -> Self {
        InnerLoopConfig {
            steps: 1,
            lr: 0.01,
            mode: InnerMode::Recompute,
            adapt: InnerAdapt::All,
            optimizer: InnerOptimizer::Sgd,
            adam_beta1: 0.0,
            adam_beta2: 0.999,
        }
    }
}

/// The `meta_learning.outer` section: the meta-update.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OuterLoopConfig {
    /// The optimizer.
    pub optimizer: OuterOptimizer,
    /// Peak learning rate (> 0).
    pub lr: f64,
    /// Decoupled weight decay (at least 0).
    pub weight_decay: f64,
    /// Largest global norm of the meta-gradient; larger ones are scaled down.
    /// `None` (`null` in YAML) turns clipping off.
    pub grad_clip: Option<f64>,
    /// Learning-rate schedule.
    pub schedule: LrSchedule,
    /// Linear warm-up steps of `warmup_cosine` (at most `num_iterations`).
    pub warmup_steps: usize,
}

impl Default for OuterLoopConfig {
    fn default() -> Self {
        OuterLoopConfig {
            optimizer: OuterOptimizer::Adamw,
            lr: 1e-3,
            weight_decay: 0.0,
            grad_clip: Some(1.0),
            schedule: LrSchedule::Constant,
            warmup_steps: 0,
        }
    }
}

impl MetaLearningConfig {
    pub(crate) fn validate(&self) -> Result<()> {
        at_least("meta_learning.meta_batch_size", self.meta_batch_size, 1)?;
        at_least("meta_learning.num_iterations", self.num_iterations, 1)?;
        at_least("meta_learning.inner.steps", self.inner.steps, 1)?;
        positive("meta_learning.inner.lr", self.inner.lr)?;
        self.validate_inner_optimizer()?;
        positive(
            "meta_learning.protonet.cosine_scale",
            self.protonet.cosine_scale,
        )?;
        let fsct = &self.fsct;
        at_least("meta_learning.fsct.heads", fsct.heads, 1)?;
        at_least("meta_learning.fsct.dim_head", fsct.dim_head, 1)?;
        at_least("meta_learning.fsct.mlp_dim", fsct.mlp_dim, 1)?;
        at_least("meta_learning.fsct.depth", fsct.depth, 1)?;
        non_negative("meta_learning.fsct.lambda_i", fsct.lambda_i)?;
        non_negative("meta_learning.fsct.lambda_v", fsct.lambda_v)?;
        non_negative("meta_learning.fsct.lambda_c", fsct.lambda_c)?;
        let outer = &self.outer;
        positive("meta_learning.outer.lr", outer.lr)?;
        non_negative("meta_learning.outer.weight_decay", outer.weight_decay)?;
        if let Some(clip) = outer.grad_clip {
            positive("meta_learning.outer.grad_clip", clip)?;
        }
        if outer.warmup_steps > self.num_iterations {
            return Err(invalid(
                "meta_learning.outer.warmup_steps",
                format!(
                    "must be at most meta_learning.num_iterations ({}), got {}",
                    self.num_iterations, outer.warmup_steps
                ),
            ));
        }
        // Episode `iteration × meta_batch_size + task` is drawn by a u64 index.
        let episodes = self
            .num_iterations
            .checked_mul(self.meta_batch_size)
            .and_then(|n| u64::try_from(n).ok());
        if episodes.is_none() {
            return Err(invalid(
                "meta_learning.num_iterations",
                format!(
                    "{} iterations of meta_batch_size {} episodes overflow the episode \
                     index; lower num_iterations or meta_batch_size",
                    self.num_iterations, self.meta_batch_size
                ),
            ));
        }
        // Both size per-step vectors (tasks of a meta-batch, the inner trajectory).
        super::validate::at_most_count("meta_learning.meta_batch_size", self.meta_batch_size)?;
        super::validate::at_most_count("meta_learning.inner.steps", self.inner.steps)?;
        Ok(())
    }

    /// Adam's moments are taken as constants of each step, so only the learners
    /// that never differentiate through the inner loop may use it.
    fn validate_inner_optimizer(&self) -> Result<()> {
        for (key, beta) in [
            ("meta_learning.inner.adam_beta1", self.inner.adam_beta1),
            ("meta_learning.inner.adam_beta2", self.inner.adam_beta2),
        ] {
            if !(0.0..1.0).contains(&beta) {
                return Err(invalid(
                    key,
                    format!("must be at least 0 and below 1, got {beta}"),
                ));
            }
        }
        if self.inner.optimizer == InnerOptimizer::Adam
            && !matches!(self.method, Method::Reptile | Method::Fomaml)
        {
            return Err(invalid(
                "meta_learning.inner.optimizer",
                format!(
                    "`adam` is for `reptile` and `fomaml`, whose inner loop is not \
                     differentiated; `{}` {}; use `sgd`",
                    self.method.as_str(),
                    if matches!(self.method, Method::Maml | Method::Melora | Method::Metasgd) {
                        "differentiates through its SGD steps"
                    } else {
                        "has no such inner loop"
                    }
                ),
            ));
        }
        Ok(())
    }
}
