//! The inner loop every learner shares: K steps of full-batch SGD on the support
//! loss (or Adam, for the first-order learners), and Hessian-vector products of that
//! loss.
//!
//! Every step is taken at fresh leaf variables (`ParamSet::to_leaves`): candle's
//! backward runs to the leaves, so a gradient taken at a non-leaf θ_k would
//! back-propagate through all earlier steps. A step keeps, when asked, the graph from
//! its leaves to θ_{k+1}; the meta-gradient then crosses the steps one at a time by
//! vector-Jacobian products — the same arithmetic as one backward pass through the
//! unrolled loop.
//!
//! Every derivative comes from the [`GradEngine`] the learner is given (whole graph,
//! or checkpointed segment sweeps), wrapped in the loop's micro-batches
//! ([`InnerLoop::engine`]).

use crate::data::Batch;
use crate::engine::{GradEngine, MicroBatched};
use crate::models::{HEAD_BIAS, HEAD_WEIGHT};
use crate::nn::Mode;
use crate::optim::{Optimizer, OptimizerKind};
use crate::tensor::{GradGraph, ParamSet};
use crate::{Error, Result};

use super::loss::{accuracy, check_finite, finite_value};

/// K steps of SGD with learning rate `lr` on the support loss.
///
/// Every learner adapts with it; micro-batches change the memory, not the result:
///
/// ```
/// use melora::prelude::*;
///
/// melora::init();
/// let model = Mlp::new(1, &[16], 1, DType::F32, &Device::Cpu)?;
/// let engine = WholeGraph::new(&model);
/// let task = SinusoidTasks { k_shot: 10, n_query: 10, seed: 0 }.episode(0)?;
/// let params = model.init_params(0)?;
/// let inner = InnerLoop::new(5, 0.01);
/// let adapted = Maml { inner, mode: MamlMode::Recompute }
///     .adapt(&engine, &params, &task.support, Mode::Eval)?;
/// // Gradient accumulation over micro-batches of 3 support points: the same steps.
/// let batched = Maml { inner: inner.with_micro_batch(3), mode: MamlMode::Recompute }
///     .adapt(&engine, &params, &task.support, Mode::Eval)?;
/// assert!(adapted.sub(&batched)?.norm()? <= 1e-5 * adapted.norm()?);
/// // Five steps lower the support loss.
/// let loss = |p: &ParamSet| -> melora::Result<f64> {
///     let outputs = model.logits(p, &task.support, Mode::Eval)?;
///     Ok(TaskLoss.value(&outputs, &task.support)?.to_scalar::<f32>()? as f64)
/// };
/// assert!(loss(&adapted)? < loss(&params)?);
/// // Zero steps or a non-positive rate are refused with a clear error.
/// assert!(InnerLoop::new(0, 0.01).validate().is_err());
/// # Ok::<(), melora::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InnerLoop {
    /// Number of steps K (≥ 1).
    pub steps: usize,
    /// Step size α (> 0).
    pub lr: f64,
    /// Gradient accumulation: process support and query sets in micro-batches of at
    /// most this many examples, summing their gradients (and Hessian-vector products)
    /// weighted by size, which equals the whole-batch result for mean losses while
    /// only one micro-batch's graph is alive. `None`: whole batches.
    pub micro_batch: Option<usize>,
    /// Micro-batches of the second-order products only (the exact Hessian-vector
    /// products of recompute-mode MAML and MetaSGD, MELoRA's curvature products): a
    /// double-backward graph holds several forward graphs' worth of activations, so
    /// bounding it bounds the peak while the first-order passes keep their whole,
    /// faster batches. The smaller of this and `micro_batch` applies; ignored for a
    /// model that normalises with batch statistics (it cannot be split). `None`:
    /// `micro_batch`.
    pub second_order_micro_batch: Option<usize>,
    /// Adapt only the classification head (`classifier.weight`, `classifier.bias`):
    /// ANIL (Raghu et al., 2020). Every other parameter stays at θ₀ within the task;
    /// the meta-gradient still reaches it, exactly, through the head's dependence on
    /// the features. The inner loop still differentiates the whole network (the
    /// other parameters' gradients are computed and not applied), so ANIL here
    /// changes what is learned, not the cost of a step.
    pub head_only: bool,
    /// How each step moves along the support gradient: SGD, or Adam for the
    /// learners that do not differentiate through the loop (Reptile, FOMAML).
    pub rule: InnerStepRule,
}

/// The step rule of an inner loop.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum InnerStepRule {
    /// θ ← θ − α·∇L.
    Sgd,
    /// θ ← θ − α·m̂/(√v̂ + ε) with ε = 1e-8, Adam's moments started at zero for every
    /// task (bias-corrected), as Reptile's code adapts (β₁ = 0 there). First order
    /// only: the second-order learners refuse it.
    Adam {
        /// First-moment decay, in [0, 1).
        beta1: f64,
        /// Second-moment decay, in [0, 1).
        beta2: f64,
    },
}

impl InnerLoop {
    /// K steps of rate `lr` on whole batches, adapting every parameter.
    pub const fn new(steps: usize, lr: f64) -> Self {
        Self {
            steps,
            lr,
            micro_batch: None,
            second_order_micro_batch: None,
            head_only: false,
            rule: InnerStepRule::Sgd,
        }
    }

    /// The same loop stepping with Adam (first-order learners only).
    pub const fn with_adam(mut self, beta1: f64, beta2: f64) -> Self {
        self.rule = InnerStepRule::Adam { beta1, beta2 };
        self
    }

    /// An error unless the loop takes plain SGD steps: `learner` differentiates
    /// through them.
    pub(crate) fn require_sgd(&self, learner: &str) -> Result<()> {
        match self.rule {
            InnerStepRule::Sgd => Ok(()),
            InnerStepRule::Adam { .. } => Err(Error::InvalidArgument(format!(
                "{learner} differentiates through its inner SGD steps and cannot adapt \
                 with Adam; use meta_learning.inner.optimizer: sgd (Adam is for reptile \
                 and fomaml)"
            ))),
        }
    }

    /// The same loop adapting only the classification head (ANIL).
    pub const fn with_head_only(mut self) -> Self {
        self.head_only = true;
        self
    }

    /// The uniform step of this loop: every parameter, or only the head.
    pub(crate) fn step_size(&self) -> StepSize<'static> {
        if self.head_only {
            StepSize::HeadOnly(self.lr)
        } else {
            StepSize::Uniform(self.lr)
        }
    }

    /// The same loop with gradient accumulation over micro-batches of `size`.
    pub const fn with_micro_batch(mut self, size: usize) -> Self {
        self.micro_batch = Some(size);
        self
    }

    /// The same loop with the second-order products in micro-batches of `size`.
    pub const fn with_second_order_micro_batch(mut self, size: usize) -> Self {
        self.second_order_micro_batch = Some(size);
        self
    }

    /// `engine` in this loop's micro-batches (the whole batch without them).
    pub fn engine<'e>(&self, engine: &'e dyn GradEngine) -> MicroBatched<'e> {
        MicroBatched::new(engine, self.micro_batch)
    }

    /// `engine` in the micro-batches of the second-order products: the smaller of
    /// `second_order_micro_batch` and `micro_batch`, the latter alone for a model
    /// whose examples are coupled.
    pub fn second_order_engine<'e>(&self, engine: &'e dyn GradEngine) -> MicroBatched<'e> {
        let size = match (self.micro_batch, self.second_order_micro_batch) {
            (micro, Some(_)) if engine.model().couples_examples() => micro,
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        MicroBatched::new(engine, size)
    }

    /// Rejects K = 0 and non-positive or non-finite learning rates.
    pub fn validate(&self) -> Result<()> {
        if self.steps == 0 {
            return Err(Error::InvalidArgument(
                "the inner loop needs at least 1 step (meta_learning.inner.steps)".into(),
            ));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(Error::InvalidArgument(format!(
                "the inner learning rate must be a positive number, got {} (meta_learning.inner.lr)",
                self.lr
            )));
        }
        if self.micro_batch == Some(0) {
            return Err(Error::InvalidArgument(
                "micro-batches need at least 1 example \
                 (memory_optimization.gradient_accumulation.micro_batch)"
                    .into(),
            ));
        }
        if let InnerStepRule::Adam { beta1, beta2 } = self.rule {
            if !((0.0..1.0).contains(&beta1) && (0.0..1.0).contains(&beta2)) {
                return Err(Error::InvalidArgument(format!(
                    "Adam's decays must be at least 0 and below 1, got β₁ = {beta1}, \
                     β₂ = {beta2} (meta_learning.inner.adam_beta1, adam_beta2)"
                )));
            }
        }
        if self.second_order_micro_batch == Some(0) {
            return Err(Error::InvalidArgument(
                "second-order micro-batches need at least 1 example \
                 (memory_optimization.gradient_accumulation.second_order_micro_batch)"
                    .into(),
            ));
        }
        Ok(())
    }
}

/// The inner step size: one rate for every entry, or one per entry (MetaSGD).
#[derive(Debug, Clone, Copy)]
pub(crate) enum StepSize<'a> {
    /// θ ← θ − α·g.
    Uniform(f64),
    /// θ ← θ − α⊙g, α with θ's names and shapes.
    PerEntry(&'a ParamSet),
    /// θ_head ← θ_head − α·g_head, every other parameter unchanged (ANIL).
    HeadOnly(f64),
}

/// Whether `name` is a parameter of the classification head (what ANIL adapts).
pub(crate) fn is_head(name: &str) -> bool {
    name == HEAD_WEIGHT || name == HEAD_BIAS
}

impl StepSize<'_> {
    fn step(&self, theta: &ParamSet, grads: &ParamSet) -> Result<ParamSet> {
        match self {
            StepSize::Uniform(lr) => theta.axpy(-lr, grads),
            StepSize::PerEntry(alpha) => theta.sub(&alpha.mul(grads)?),
            StepSize::HeadOnly(lr) => {
                let mut next = theta.clone();
                let mut heads = 0;
                for (name, t) in theta.iter().filter(|(name, _)| is_head(name)) {
                    next.set(name, (t - (grads.require(name)? * *lr)?)?);
                    heads += 1;
                }
                if heads == 0 {
                    return Err(Error::InvalidArgument(format!(
                        "meta_learning.inner.adapt: head (ANIL) adapts the classification \
                         head ({HEAD_WEIGHT}, {HEAD_BIAS}), which this model's parameters \
                         lack; use inner.adapt: all"
                    )));
                }
                Ok(next)
            }
        }
    }

    /// The step's Jacobian factor applied to an adjoint `v`: `α·v` (uniform), `α⊙v`
    /// (per entry), or `α·P v` with P keeping the head's entries (ANIL). The
    /// vector-Jacobian product of one step is then `v − H·(this)`.
    pub(crate) fn scaled(&self, v: &ParamSet) -> Result<ParamSet> {
        match self {
            StepSize::Uniform(lr) => v.scale(*lr),
            StepSize::PerEntry(alpha) => alpha.mul(v),
            StepSize::HeadOnly(lr) => self.projected(v)?.scale(*lr),
        }
    }

    /// `v` restricted to the entries this step moves: the head's for ANIL (zeros
    /// elsewhere), all of `v` otherwise.
    pub(crate) fn projected(&self, v: &ParamSet) -> Result<ParamSet> {
        match self {
            StepSize::HeadOnly(_) => {
                let mut out = v.zeros_like()?;
                for (name, t) in v.iter().filter(|(name, _)| is_head(name)) {
                    out.set(name, t.clone());
                }
                Ok(out)
            }
            StepSize::Uniform(_) | StepSize::PerEntry(_) => Ok(v.clone()),
        }
    }
}

/// One SGD step from `leaves`: returns θ_{k+1} = θ_k − α∇L (carrying the graph back to
/// `leaves` when `graph` is [`GradGraph::Keep`]) and L(θ_k).
pub(crate) fn sgd_step(
    engine: &dyn GradEngine,
    leaves: &ParamSet,
    support: &Batch,
    step_size: StepSize<'_>,
    graph: GradGraph,
    mode: Mode,
    context: &dyn Fn() -> String,
) -> Result<(ParamSet, f64)> {
    let (grads, value) = support_gradient(engine, leaves, support, graph, mode, context)?;
    Ok((step_size.step(leaves, &grads)?, value))
}

/// ∇L(θ_k) at `leaves` (with its graph when `graph` is [`GradGraph::Keep`]) and
/// L(θ_k), both checked finite.
fn support_gradient(
    engine: &dyn GradEngine,
    leaves: &ParamSet,
    support: &Batch,
    graph: GradGraph,
    mode: Mode,
    context: &dyn Fn() -> String,
) -> Result<(ParamSet, f64)> {
    let (grads, loss) = match graph {
        // A kept graph is differentiated again across steps (full-graph MAML).
        GradGraph::Keep => engine.differentiable_gradient(leaves, support, mode)?,
        GradGraph::Detach => {
            let g = engine.gradient(leaves, support, mode)?;
            (g.grads, g.loss)
        }
    };
    let value = finite_value(&loss, &|| format!("{}: the support loss", context()))?;
    check_finite(&grads, context)?;
    Ok((grads, value))
}

/// First-order adaptation: θ_K from `params`, with the support loss before each step.
/// No graph is kept.
pub(crate) fn adapt(
    engine: &dyn GradEngine,
    params: &ParamSet,
    support: &Batch,
    inner: InnerLoop,
    mode: Mode,
) -> Result<(ParamSet, Vec<f64>)> {
    let (_, adapted, losses) = adapt_storing(engine, params, support, inner, mode)?;
    Ok((adapted, losses))
}

/// First-order adaptation that also returns θ₀…θ_{K−1} (values, no graphs), for
/// recursions that revisit each step.
pub(crate) fn adapt_storing(
    engine: &dyn GradEngine,
    params: &ParamSet,
    support: &Batch,
    inner: InnerLoop,
    mode: Mode,
) -> Result<(Vec<ParamSet>, ParamSet, Vec<f64>)> {
    inner.validate()?;
    adapt_with(engine, params, support, inner, inner.step_size(), mode)
}

/// [`adapt_storing`] with any step size.
pub(crate) fn adapt_with(
    engine: &dyn GradEngine,
    params: &ParamSet,
    support: &Batch,
    inner: InnerLoop,
    step_size: StepSize<'_>,
    mode: Mode,
) -> Result<(Vec<ParamSet>, ParamSet, Vec<f64>)> {
    let engine = inner.engine(engine);
    let mut theta = params.detach();
    let mut thetas = Vec::with_capacity(inner.steps);
    let mut losses = Vec::with_capacity(inner.steps);
    let mut adam = match inner.rule {
        InnerStepRule::Sgd => None,
        InnerStepRule::Adam { beta1, beta2 } => Some(Optimizer::new(OptimizerKind::AdamW {
            beta1,
            beta2,
            eps: 1e-8,
            weight_decay: 0.0,
        })),
    };
    for step in 0..inner.steps {
        let leaves = theta.to_leaves()?;
        let context = || format!("inner step {}", step + 1);
        let (grads, loss) =
            support_gradient(&engine, &leaves, support, GradGraph::Detach, mode, &context)?;
        let direction = match &mut adam {
            None => grads,
            Some(adam) => adam.direction(&leaves, &grads)?,
        };
        let next = step_size.step(&leaves, &direction)?;
        losses.push(loss);
        thetas.push(theta);
        theta = next.detach();
    }
    Ok((thetas, theta, losses))
}

/// The gradient (first order) of the loss on `batch` at `theta`, the loss, and the
/// accuracy of the same forward passes.
pub(crate) fn gradient(
    engine: &dyn GradEngine,
    theta: &ParamSet,
    batch: &Batch,
    mode: Mode,
    context: &dyn Fn() -> String,
) -> Result<(ParamSet, f64, f64)> {
    let g = engine.gradient(theta, batch, mode)?;
    let value = finite_value(&g.loss, context)?;
    let correct = accuracy(&g.logits, &batch.labels)?;
    check_finite(&g.grads, context)?;
    Ok((g.grads, value, correct))
}

/// Loss and accuracy on `batch` at `theta`: forward passes only, in the engine's
/// micro-batches.
pub(crate) fn evaluate(
    engine: &MicroBatched<'_>,
    theta: &ParamSet,
    batch: &Batch,
    mode: Mode,
    context: &dyn Fn() -> String,
) -> Result<(f64, f64)> {
    let (mut value, mut correct) = (0.0, 0.0);
    for (chunk, w) in engine.chunks(batch)? {
        let logits = engine.model().logits(theta, &chunk, mode)?;
        let loss = engine.loss().value(&logits, &chunk)?;
        value += finite_value(&loss, context)? * w;
        correct += accuracy(&logits, &chunk.labels)? * w;
    }
    Ok((value, correct))
}
