//! The `memory_optimization` section: ways to trade compute for memory.

use serde::{Deserialize, Serialize};

use super::choice::choice_enum;
use super::validate::{at_least, invalid, non_negative, positive};
use crate::{Error, Result};

choice_enum! {
    /// Floating-point type of the frozen base and the activations. With bf16 or
    /// f16 the trainable tensors (LoRA, head), the optimiser state, the head's
    /// computation and the loss stay in f32 (mixed precision).
    pub enum Precision {
        /// 32-bit float.
        F32 = "f32",
        /// bfloat16.
        Bf16 = "bf16",
        /// IEEE half precision.
        F16 = "f16",
    }
    default = F32;
}

choice_enum! {
    /// What replaces the support-set Hessian in the `melora` meta-gradient.
    pub enum HessianKind {
        /// Drops the Hessian term (first order).
        None = "none",
        /// Diagonal estimated with Hutchinson probes.
        Diagonal = "diagonal",
        /// Generalized Gauss-Newton products.
        GaussNewton = "gauss_newton",
        /// Exact blocks of each parameter tensor, cross-tensor terms dropped.
        BlockDiagonal = "block_diagonal",
    }
    default = None;
}

choice_enum! {
    /// A setting that [`crate::plan::budget`] may change to fit a memory budget.
    pub enum BudgetLever {
        /// Gradient checkpointing: every 2 layers, then every layer.
        Checkpointing = "checkpointing",
        /// Micro-batches (gradient accumulation), halved down to 1 example.
        MicroBatch = "micro_batch",
        /// A bf16 frozen base and activations (mixed precision).
        Precision = "precision",
    }
    default = Checkpointing;
}

/// The `memory_optimization` section.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MemoryOptimizationConfig {
    /// Splitting each task's examples into micro-batches.
    pub gradient_accumulation: GradientAccumulationConfig,
    /// Activation checkpointing.
    pub checkpointing: CheckpointingConfig,
    /// Floating-point type of the frozen base and the activations.
    pub precision: Precision,
    /// Dynamic loss scaling, used with `precision: f16`.
    pub loss_scaling: LossScalingConfig,
    /// Hessian approximation used by the `melora` method.
    pub hessian_approximation: HessianApproximationConfig,
    /// A memory budget the run must fit in.
    pub budget: MemoryBudgetConfig,
}

/// The `memory_optimization.budget` section: a peak-heap limit. Before a run the
/// planner's prediction picks the first configuration that fits, changing the
/// settings of `order` one after another (the method stays as given); during the
/// run a meta-step whose heap goes above the limit is redone with half the
/// micro-batch (the result is the same: gradients are accumulated).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MemoryBudgetConfig {
    /// The limit, such as `4GiB` or `512MB`, or `auto` for the memory the run's
    /// device has free when it starts (a GPU's free memory, the CPU's available
    /// memory); `None`: no budget (`--memory-budget`).
    pub limit: Option<String>,
    /// The settings tried, in this order, each to its most frugal level before the
    /// next is changed.
    pub order: Vec<BudgetLever>,
}

impl Default for MemoryBudgetConfig {
    fn default() -> Self {
        MemoryBudgetConfig {
            limit: None,
            order: vec![
                BudgetLever::Checkpointing,
                BudgetLever::MicroBatch,
                BudgetLever::Precision,
            ],
        }
    }
}

/// The size of a memory budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetLimit {
    /// This many bytes.
    Bytes(u64),
    /// What the run's device has free when the run starts (`auto`).
    Free,
}

impl MemoryBudgetConfig {
    /// The limit, if one is set.
    pub fn limit(&self) -> Result<Option<BudgetLimit>> {
        let Some(text) = self.limit.as_deref() else {
            return Ok(None);
        };
        if text.trim().eq_ignore_ascii_case("auto") {
            return Ok(Some(BudgetLimit::Free));
        }
        super::bytes::parse_bytes(text)
            .map(|bytes| Some(BudgetLimit::Bytes(bytes)))
            .map_err(|e| {
                invalid(
                    "memory_optimization.budget.limit",
                    format!("{e}; or `auto` for the memory free on the run's device"),
                )
            })
    }
}

/// The `memory_optimization.gradient_accumulation` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GradientAccumulationConfig {
    /// Examples per micro-batch (at least 1); `None` processes a whole set at once.
    pub micro_batch: Option<usize>,
    /// Examples per micro-batch of the second-order products only: the exact
    /// Hessian-vector products of `maml`/`metasgd` in recompute mode and `melora`'s
    /// curvature products (at least 1; the smaller of this and `micro_batch`
    /// applies). Their double-backward graph is what makes exact second order
    /// expensive in memory, and its sum over examples is exact in any split, so by
    /// default it is bounded at 9 examples while first-order passes keep whole sets;
    /// `None` (`null`) runs them on whole sets too. Models that normalise with batch
    /// statistics ignore it.
    pub second_order_micro_batch: Option<usize>,
}

/// Examples per second-order micro-batch unless configured. On all-MiniLM-L6-v2
/// with 25 support examples (5-way 5-shot) recompute-MAML at K = 8 peaks at 694 MiB
/// on whole sets, 332 MiB in micro-batches of at most 9 (1.24× FOMAML's 268 MiB) at
/// the same speed, and 266 MiB in micro-batches of 5 but 1.5× slower: every product
/// has a fixed cost (the kernels pack each weight matrix whatever the rows).
pub(crate) const DEFAULT_SECOND_ORDER_MICRO_BATCH: usize = 9;

impl Default for GradientAccumulationConfig {
    fn default() -> Self {
        GradientAccumulationConfig {
            micro_batch: None,
            second_order_micro_batch: Some(DEFAULT_SECOND_ORDER_MICRO_BATCH),
        }
    }
}

/// The `memory_optimization.checkpointing` section: gradient checkpointing of the
/// transformer layers (see `engine::Checkpointed`). The forward pass keeps only the
/// inputs of the chosen layers; every backward pass (gradients, and the
/// Hessian-vector and Gauss-Newton products of `maml` recompute mode and `melora`)
/// rebuilds one segment's graph at a time from its stored input. Results equal the
/// unsegmented ones to float rounding; the cost is about one extra forward pass per
/// gradient (more for second-order products). Full-graph MAML (`inner.mode:
/// full_graph`) keeps every inner step's graph by definition, so only its query
/// gradient is segmented; use `inner.mode: recompute` for the saving.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CheckpointingConfig {
    /// Keep only segment inputs and recompute activations during backward
    /// (transformer models only).
    pub enabled: bool,
    /// Keep the input of every `every`-th layer (at least 1): segments of `every`
    /// layers. Ignored when `layers` is set (which then requires the default 1).
    pub every: usize,
    /// Keep the inputs of exactly these layers (0-based); checked against the model's
    /// layer count when the model is built. `None`: use `every`.
    pub layers: Option<Vec<usize>>,
    /// Selective recomputation: the frozen base's attention cores (scores,
    /// probabilities) and feed-forward blocks without adapters (the 4×-wide
    /// intermediate) keep only their inputs and are rebuilt in the backward pass; the
    /// layers' inputs, projections and LoRA branches stay stored. Works with or
    /// without `enabled` (then inside each recomputed segment), and in every learner,
    /// full-graph MAML included (transformer models only).
    pub selective: bool,
}

/// Which layer inputs the forward pass keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckpointPlan {
    /// The input of every `n`-th layer (0, n, 2n, …): segments of `n` layers.
    Every(usize),
    /// The inputs of the listed layers (0-based; order and repeats do not matter).
    Layers(Vec<usize>),
}

impl CheckpointPlan {
    /// The sorted, distinct layers whose input is kept in a stack of `layers` layers;
    /// an error names the valid range and the configuration key.
    pub fn boundaries(&self, layers: usize) -> Result<Vec<usize>> {
        if layers == 0 {
            return Err(Error::InvalidArgument(
                "gradient checkpointing needs a stack with at least one layer; set \
                 memory_optimization.checkpointing.enabled to false"
                    .into(),
            ));
        }
        match self {
            CheckpointPlan::Every(0) => Err(Error::InvalidArgument(
                "checkpointing every 0 layers is meaningless; set \
                 memory_optimization.checkpointing.every to at least 1"
                    .into(),
            )),
            CheckpointPlan::Every(n) => Ok((0..layers).step_by(*n).collect()),
            CheckpointPlan::Layers(list) => {
                if list.is_empty() {
                    return Err(Error::InvalidArgument(
                        "memory_optimization.checkpointing.layers is empty: the whole stack would \
                         be one segment recomputed at once, which saves nothing; list at least \
                         one layer, or unset it to use `every`"
                            .into(),
                    ));
                }
                if let Some(bad) = list.iter().find(|&&l| l >= layers) {
                    return Err(Error::InvalidArgument(format!(
                        "memory_optimization.checkpointing.layers names layer {bad}, but the \
                         model has layers 0..={} ({layers} layers); list indices in that range",
                        layers - 1
                    )));
                }
                let mut sorted = list.clone();
                sorted.sort_unstable();
                sorted.dedup();
                Ok(sorted)
            }
        }
    }
}

impl CheckpointingConfig {
    /// The layers to checkpoint, when checkpointing is enabled.
    pub fn plan(&self) -> Option<CheckpointPlan> {
        self.enabled.then(|| match &self.layers {
            Some(layers) => CheckpointPlan::Layers(layers.clone()),
            None => CheckpointPlan::Every(self.every),
        })
    }
}

impl Default for CheckpointingConfig {
    fn default() -> Self {
        CheckpointingConfig {
            enabled: false,
            every: 1,
            layers: None,
            selective: false,
        }
    }
}

/// The `memory_optimization.loss_scaling` section: with `precision: f16`, every
/// backward pass runs on the loss times a scale, so that small gradients do not
/// underflow in f16; a meta-step whose gradients overflow is skipped and the scale
/// halved; after `growth_interval` good steps in a row it doubles.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LossScalingConfig {
    /// The first scale (at least 1; a power of two keeps scaling exact).
    pub initial_scale: f64,
    /// Good meta-steps in a row before the scale doubles (at least 1).
    pub growth_interval: usize,
}

impl Default for LossScalingConfig {
    fn default() -> Self {
        LossScalingConfig {
            initial_scale: 65536.0,
            growth_interval: 2000,
        }
    }
}

/// The `memory_optimization.hessian_approximation` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HessianApproximationConfig {
    /// The approximation.
    pub kind: HessianKind,
    /// Random probes per estimate of the `diagonal` kind (at least 1).
    pub probes: usize,
    /// Added to the approximated Hessian's diagonal (at least 0).
    pub damping: f64,
}

impl Default for HessianApproximationConfig {
    fn default() -> Self {
        HessianApproximationConfig {
            kind: HessianKind::None,
            probes: 1,
            damping: 0.0,
        }
    }
}

impl MemoryOptimizationConfig {
    pub(crate) fn validate(&self) -> Result<()> {
        if let Some(micro_batch) = self.gradient_accumulation.micro_batch {
            at_least(
                "memory_optimization.gradient_accumulation.micro_batch",
                micro_batch,
                1,
            )?;
        }
        if let Some(micro_batch) = self.gradient_accumulation.second_order_micro_batch {
            at_least(
                "memory_optimization.gradient_accumulation.second_order_micro_batch",
                micro_batch,
                1,
            )?;
        }
        at_least(
            "memory_optimization.checkpointing.every",
            self.checkpointing.every,
            1,
        )?;
        if let Some(layers) = &self.checkpointing.layers {
            if layers.is_empty() {
                return Err(invalid(
                    "memory_optimization.checkpointing.layers",
                    "lists no layer: the whole stack would be one segment recomputed at once, \
                     which saves nothing; list at least one layer index, or set it to null to \
                     use `every`",
                ));
            }
            if self.checkpointing.every != 1 {
                return Err(invalid(
                    "memory_optimization.checkpointing.every",
                    format!(
                        "is {} while `layers` also chooses the checkpointed layers; set one of \
                         them: `every` back to 1, or `layers` to null",
                        self.checkpointing.every
                    ),
                ));
            }
        }
        if self.budget.limit()? == Some(BudgetLimit::Bytes(0)) {
            return Err(invalid(
                "memory_optimization.budget.limit",
                "is 0 bytes; give a size such as 4GiB, or null for no budget",
            ));
        }
        for (i, lever) in self.budget.order.iter().enumerate() {
            if self.budget.order[..i].contains(lever) {
                return Err(invalid(
                    "memory_optimization.budget.order",
                    format!("names {lever} twice; list each setting once"),
                ));
            }
        }
        positive(
            "memory_optimization.loss_scaling.initial_scale",
            self.loss_scaling.initial_scale,
        )?;
        at_least(
            "memory_optimization.loss_scaling.initial_scale",
            self.loss_scaling.initial_scale,
            crate::tensor::loss_scale::MIN_LOSS_SCALE,
        )?;
        at_least(
            "memory_optimization.loss_scaling.growth_interval",
            self.loss_scaling.growth_interval,
            1,
        )?;
        let hessian = &self.hessian_approximation;
        at_least(
            "memory_optimization.hessian_approximation.probes",
            hessian.probes,
            1,
        )?;
        non_negative(
            "memory_optimization.hessian_approximation.damping",
            hessian.damping,
        )?;
        // The probes are drawn and held together.
        super::validate::at_most_count(
            "memory_optimization.hessian_approximation.probes",
            hessian.probes,
        )
    }
}
