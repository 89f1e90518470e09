//! The inner loop every learner shares: K steps of full-batch SGD on the support
//! loss, and Hessian-vector products of that loss.
//!
//! Every step is taken at fresh leaf variables (`ParamSet::to_leaves`): candle's
//! backward runs to the leaves, so a gradient taken at a non-leaf θ_k would
//! back-propagate through all earlier steps. A step keeps, when asked, the graph from
//! its leaves to θ_{k+1}; the meta-gradient then crosses the steps one at a time by
//! vector-Jacobian products — the same arithmetic as one backward pass through the
//! unrolled loop.
//!
//! On a model with gradient checkpointing ([`FewShotModel::checkpointing`]) the
//! first-order gradients and the Hessian-vector products come from the engine's
//! segment sweeps (`memory::checkpoint`), equal to the whole-graph ones to rounding.
//! Gradients whose graph is kept across steps (full-graph MAML) are not segmented:
//! they need the whole graph by definition.

use crate::data::Batch;
use crate::models::FewShotModel;
use crate::nn::Mode;
use crate::tensor::{GradGraph, ParamSet};
use crate::{Error, Result};

use super::loss::{batch_loss, check_finite, finite_value, task_loss};

/// K steps of SGD with learning rate `lr` on the support loss.
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
}

impl InnerLoop {
    /// K steps of rate `lr` on whole batches.
    pub const fn new(steps: usize, lr: f64) -> Self {
        Self {
            steps,
            lr,
            micro_batch: None,
        }
    }

    /// The same loop with gradient accumulation over micro-batches of `size`.
    pub const fn with_micro_batch(mut self, size: usize) -> Self {
        self.micro_batch = Some(size);
        self
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
        Ok(())
    }
}

/// The micro-batches of `batch` with their weights n_i/N: the whole batch (weight 1)
/// when `micro` is `None` or not smaller than the batch.
pub(crate) fn chunks(
    model: &dyn FewShotModel,
    batch: &Batch,
    micro: Option<usize>,
) -> Result<Vec<(Batch, f64)>> {
    match micro {
        Some(size) if size < batch.len() => {
            if model.couples_examples() {
                return Err(Error::InvalidArgument(
                    "this model normalises with the statistics of the whole batch, so splitting \
                     it into micro-batches would change the result; unset \
                     memory_optimization.gradient_accumulation.micro_batch"
                        .into(),
                ));
            }
            let n = batch.len() as f64;
            Ok(batch
                .split(size)?
                .into_iter()
                .map(|b| {
                    let w = b.len() as f64 / n;
                    (b, w)
                })
                .collect())
        }
        _ => Ok(vec![(batch.clone(), 1.0)]),
    }
}

/// Σ_i w_i·f(chunk_i) over the micro-batches of `batch`.
pub(crate) fn weighted_sum(
    model: &dyn FewShotModel,
    batch: &Batch,
    micro: Option<usize>,
    mut f: impl FnMut(&Batch) -> Result<ParamSet>,
) -> Result<ParamSet> {
    let mut total: Option<ParamSet> = None;
    for (chunk, w) in chunks(model, batch, micro)? {
        let part = f(&chunk)?;
        // Under a memory budget, stop at the first chunk that went above it.
        crate::memory::check_budget()?;
        let part = if w == 1.0 { part } else { part.scale(w)? };
        total = Some(match total {
            Some(t) => t.add(&part)?,
            None => part,
        });
    }
    total.ok_or_else(|| Error::InvalidArgument("an empty batch has no gradient".into()))
}

/// The inner step size: one rate for every entry, or one per entry (MetaSGD).
#[derive(Debug, Clone, Copy)]
pub(crate) enum StepSize<'a> {
    /// θ ← θ − α·g.
    Uniform(f64),
    /// θ ← θ − α⊙g, α with θ's names and shapes.
    PerEntry(&'a ParamSet),
}

impl StepSize<'_> {
    fn step(&self, theta: &ParamSet, grads: &ParamSet) -> Result<ParamSet> {
        match self {
            StepSize::Uniform(lr) => theta.axpy(-lr, grads),
            StepSize::PerEntry(alpha) => theta.sub(&alpha.mul(grads)?),
        }
    }
}

/// One SGD step from `leaves`: returns θ_{k+1} = θ_k − α∇L (carrying the graph back to
/// `leaves` when `graph` is [`GradGraph::Keep`]) and L(θ_k), accumulating over
/// micro-batches of `micro` examples.
#[allow(clippy::too_many_arguments)]
pub(crate) fn sgd_step(
    model: &dyn FewShotModel,
    leaves: &ParamSet,
    support: &Batch,
    step_size: StepSize<'_>,
    graph: GradGraph,
    mode: Mode,
    micro: Option<usize>,
    context: &dyn Fn() -> String,
) -> Result<(ParamSet, f64)> {
    let mut value = 0.0;
    let grads = weighted_sum(model, support, micro, |chunk| {
        let (grads, loss) = match (graph, model.checkpointing()) {
            // A kept graph is differentiated again across steps (full-graph MAML): that
            // needs the whole graph, so it is never segmented (see memory::checkpoint).
            (GradGraph::Detach, Some(engine)) => {
                let g = engine.gradient(leaves, chunk, mode, &task_loss)?;
                (g.grads, g.loss)
            }
            _ => {
                let loss = batch_loss(model, leaves, chunk, mode)?;
                (leaves.gradients(&loss, graph)?, loss)
            }
        };
        value += finite_value(&loss, &|| format!("{}: the support loss", context()))?
            * chunk.len() as f64;
        Ok(grads)
    })?;
    check_finite(&grads, context)?;
    Ok((
        step_size.step(leaves, &grads)?,
        value / support.len() as f64,
    ))
}

/// First-order adaptation: θ_K from `params`, with the support loss before each step.
/// No graph is kept.
pub(crate) fn adapt(
    model: &dyn FewShotModel,
    params: &ParamSet,
    support: &Batch,
    inner: InnerLoop,
    mode: Mode,
) -> Result<(ParamSet, Vec<f64>)> {
    let (_, adapted, losses) = adapt_storing(model, params, support, inner, mode)?;
    Ok((adapted, losses))
}

/// First-order adaptation that also returns θ₀…θ_{K−1} (values, no graphs), for
/// recursions that revisit each step.
pub(crate) fn adapt_storing(
    model: &dyn FewShotModel,
    params: &ParamSet,
    support: &Batch,
    inner: InnerLoop,
    mode: Mode,
) -> Result<(Vec<ParamSet>, ParamSet, Vec<f64>)> {
    inner.validate()?;
    adapt_with(
        model,
        params,
        support,
        inner,
        StepSize::Uniform(inner.lr),
        mode,
    )
}

/// [`adapt_storing`] with any step size.
pub(crate) fn adapt_with(
    model: &dyn FewShotModel,
    params: &ParamSet,
    support: &Batch,
    inner: InnerLoop,
    step_size: StepSize<'_>,
    mode: Mode,
) -> Result<(Vec<ParamSet>, ParamSet, Vec<f64>)> {
    let mut theta = params.detach();
    let mut thetas = Vec::with_capacity(inner.steps);
    let mut losses = Vec::with_capacity(inner.steps);
    for step in 0..inner.steps {
        let leaves = theta.to_leaves()?;
        let context = || format!("inner step {}", step + 1);
        let (next, loss) = sgd_step(
            model,
            &leaves,
            support,
            step_size,
            GradGraph::Detach,
            mode,
            inner.micro_batch,
            &context,
        )?;
        losses.push(loss);
        thetas.push(theta);
        theta = next.detach();
    }
    Ok((thetas, theta, losses))
}

/// The gradient (first order) of the loss on `batch` at `theta`, the loss, and the
/// accuracy of the same forward passes, accumulated over micro-batches of `micro`.
pub(crate) fn gradient(
    model: &dyn FewShotModel,
    theta: &ParamSet,
    batch: &Batch,
    mode: Mode,
    micro: Option<usize>,
    context: &dyn Fn() -> String,
) -> Result<(ParamSet, f64, f64)> {
    let leaves = theta.to_leaves()?;
    let (mut value, mut correct) = (0.0, 0.0);
    let grads = weighted_sum(model, batch, micro, |chunk| {
        let n = chunk.len() as f64;
        if let Some(engine) = model.checkpointing() {
            let g = engine.gradient(&leaves, chunk, mode, &task_loss)?;
            value += finite_value(&g.loss, context)? * n;
            correct += super::loss::accuracy(&g.logits, &chunk.labels)? * n;
            return Ok(g.grads);
        }
        let logits = model.logits(&leaves, chunk, mode)?;
        let loss = super::loss::task_loss(&logits, chunk)?;
        value += finite_value(&loss, context)? * n;
        correct += super::loss::accuracy(&logits.detach(), &chunk.labels)? * n;
        leaves.gradients(&loss, GradGraph::Detach)
    })?;
    check_finite(&grads, context)?;
    let n = batch.len() as f64;
    Ok((grads, value / n, correct / n))
}

/// Loss and accuracy on `batch` at `theta`: forward passes only, in micro-batches of
/// `micro`.
pub(crate) fn evaluate(
    model: &dyn FewShotModel,
    theta: &ParamSet,
    batch: &Batch,
    mode: Mode,
    micro: Option<usize>,
    context: &dyn Fn() -> String,
) -> Result<(f64, f64)> {
    let (mut value, mut correct) = (0.0, 0.0);
    for (chunk, w) in chunks(model, batch, micro)? {
        let logits = model.logits(theta, &chunk, mode)?;
        let loss = super::loss::task_loss(&logits, &chunk)?;
        value += finite_value(&loss, context)? * w;
        correct += super::loss::accuracy(&logits, &chunk.labels)? * w;
    }
    Ok((value, correct))
}

/// `H·v` with `H` the Hessian of the loss on `batch` at `theta` (Pearlmutter: the
/// gradient of ⟨∇L, v⟩).
pub fn hessian_vector_product(
    model: &dyn FewShotModel,
    theta: &ParamSet,
    batch: &Batch,
    v: &ParamSet,
    mode: Mode,
) -> Result<ParamSet> {
    Ok(gradient_and_hvp(model, theta, batch, v, mode, None)?.1)
}

/// The gradient (detached) and `H·v`, each micro-batch's from one graph, or with
/// checkpointing from one forward and one backward sweep over the segments.
pub(crate) fn gradient_and_hvp(
    model: &dyn FewShotModel,
    theta: &ParamSet,
    batch: &Batch,
    v: &ParamSet,
    mode: Mode,
    micro: Option<usize>,
) -> Result<(ParamSet, ParamSet)> {
    let leaves = theta.to_leaves()?;
    let mut total: Option<(ParamSet, ParamSet)> = None;
    for (chunk, w) in chunks(model, batch, micro)? {
        let (grads, hv) = match model.checkpointing() {
            Some(engine) => {
                let (g, mut hv) = engine.gradient_and_hvps(
                    &leaves,
                    &chunk,
                    std::slice::from_ref(v),
                    mode,
                    &task_loss,
                )?;
                (g, hv.pop().expect("one product per vector"))
            }
            None => {
                let loss = batch_loss(model, &leaves, &chunk, mode)?;
                let grads = leaves.gradients(&loss, GradGraph::Keep)?;
                let hv = leaves.vjp(&grads, v, GradGraph::Detach)?;
                (grads.detach(), hv)
            }
        };
        crate::memory::check_budget()?;
        let (g, hv) = (grads.scale(w)?, hv.scale(w)?);
        total = Some(match total {
            Some((tg, th)) => (tg.add(&g)?, th.add(&hv)?),
            None => (g, hv),
        });
    }
    total.ok_or_else(|| Error::InvalidArgument("an empty batch has no Hessian".into()))
}
