//! The configured method resolved once: which learner, in which mode, with which
//! Hessian approximation. Every place that needs to know (building the learner, the
//! planner's and the benchmark's labels, the comparison's variants) reads it from
//! here.

use super::{Config, HessianKind, InnerMode, Method, PrototypeDistance};

/// What `meta_learning.method` names, with the settings that qualify it: each
/// variant carries only what its learner reads, so no meaningless combination (a
/// mode for Reptile, a Hessian approximation for MAML) can be built.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LearnerSpec {
    /// MAML, exact second order, in `mode`.
    Maml {
        /// Every inner step's graph kept, or recomputed.
        mode: InnerMode,
    },
    /// MetaSGD (learned per-entry step sizes), in `mode`.
    MetaSgd {
        /// Every inner step's graph kept, or recomputed.
        mode: InnerMode,
    },
    /// First-order MAML.
    Fomaml,
    /// Reptile.
    Reptile,
    /// MELoRA: MAML with the Hessian term approximated by `hessian`.
    Melora {
        /// The approximation of the inner Hessian.
        hessian: HessianKind,
        /// Hutchinson probes per estimate (the diagonal kind).
        probes: usize,
        /// Damping added to the approximation.
        damping: f64,
    },
    /// Prototypical networks.
    ProtoNet {
        /// Query-to-prototype comparison.
        distance: PrototypeDistance,
        /// Factor of the cosines (`distance: cosine`).
        cosine_scale: f64,
    },
    /// The Few-Shot Cosine Transformer (`meta_learning.fsct`).
    Fsct {
        /// Cosine attention (`fsct_cosine`), or softmax (`fsct_softmax`).
        cosine: bool,
    },
    /// A baseline without meta-training: it only adapts to test tasks.
    Baseline(Baseline),
}

/// The methods without meta-training, which only adapt to each test task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Baseline {
    /// Every base weight and the head fine-tuned.
    Finetune,
    /// A fresh LoRA adapter and head fine-tuned.
    LoraFinetune,
    /// The initial model as it is.
    NoAdaptation,
    /// Nearest class mean of the frozen base's features.
    Prototype,
    /// Supervised pre-training, then a head (or everything) fine-tuned.
    PretrainFinetune,
}

impl Baseline {
    /// The baseline's `meta_learning.method`.
    pub fn method(self) -> Method {
        match self {
            Self::Finetune => Method::Finetune,
            Self::LoraFinetune => Method::LoraFinetune,
            Self::NoAdaptation => Method::NoAdaptation,
            Self::Prototype => Method::Prototype,
            Self::PretrainFinetune => Method::PretrainFinetune,
        }
    }
}

impl LearnerSpec {
    /// The learner `config` configures.
    pub fn of(config: &Config) -> Self {
        let ml = &config.meta_learning;
        let hessian = &config.memory_optimization.hessian_approximation;
        match ml.method {
            Method::Maml => Self::Maml {
                mode: ml.inner.mode,
            },
            Method::Metasgd => Self::MetaSgd {
                mode: ml.inner.mode,
            },
            Method::Fomaml => Self::Fomaml,
            Method::Reptile => Self::Reptile,
            Method::Melora => Self::Melora {
                hessian: hessian.kind,
                probes: hessian.probes,
                damping: hessian.damping,
            },
            Method::Protonet => Self::ProtoNet {
                distance: ml.protonet.distance,
                cosine_scale: ml.protonet.cosine_scale,
            },
            Method::FsctCosine => Self::Fsct { cosine: true },
            Method::FsctSoftmax => Self::Fsct { cosine: false },
            Method::Finetune => Self::Baseline(Baseline::Finetune),
            Method::LoraFinetune => Self::Baseline(Baseline::LoraFinetune),
            Method::NoAdaptation => Self::Baseline(Baseline::NoAdaptation),
            Method::Prototype => Self::Baseline(Baseline::Prototype),
            Method::PretrainFinetune => Self::Baseline(Baseline::PretrainFinetune),
        }
    }

    /// Whether it adapts to a task by gradient steps of `meta_learning.inner` (the
    /// MAML family and Reptile), so its score can be drawn against the step count.
    pub fn has_inner_loop(self) -> bool {
        matches!(
            self,
            Self::Maml { .. }
                | Self::MetaSgd { .. }
                | Self::Fomaml
                | Self::Reptile
                | Self::Melora { .. }
        )
    }

    /// Whether it meta-trains (a baseline only adapts).
    pub fn meta_trains(self) -> bool {
        !matches!(self, Self::Baseline(_))
    }

    /// The method and its qualifier as tables and plots show them:
    /// `maml (full graph)`, `melora (gauss newton)`, `fomaml`.
    pub fn label(self) -> String {
        let qualified =
            |method: &str, qualifier: String| format!("{method} ({})", qualifier.replace('_', " "));
        match self {
            Self::Maml { mode } => qualified("maml", mode.to_string()),
            Self::MetaSgd { mode } => qualified("metasgd", mode.to_string()),
            Self::Melora { hessian, .. } => qualified("melora", hessian.to_string()),
            Self::Fomaml => Method::Fomaml.to_string(),
            Self::Reptile => Method::Reptile.to_string(),
            Self::ProtoNet { distance, .. } => qualified("protonet", distance.to_string()),
            Self::Fsct { cosine: true } => Method::FsctCosine.to_string(),
            Self::Fsct { cosine: false } => Method::FsctSoftmax.to_string(),
            Self::Baseline(baseline) => baseline.method().to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_method_resolves_to_its_learner_and_label() {
        let mut config = Config::default();
        config.meta_learning.inner.mode = InnerMode::FullGraph;
        assert_eq!(LearnerSpec::of(&config).label(), "maml (full graph)");
        config.meta_learning.method = Method::Melora;
        config.memory_optimization.hessian_approximation.kind = HessianKind::GaussNewton;
        assert_eq!(LearnerSpec::of(&config).label(), "melora (gauss newton)");
        config.meta_learning.method = Method::Prototype;
        let spec = LearnerSpec::of(&config);
        assert!(!spec.meta_trains());
        assert_eq!(spec.label(), "prototype");
    }
}
