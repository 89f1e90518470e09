//! The inner loop every learner shares: K steps of full-batch SGD on the support
//! loss, and Hessian-vector products of that loss.
//!
//! Every step is taken at fresh leaf variables (`ParamSet::to_leaves`): candle's
//! backward runs to the leaves, so a gradient taken at a non-leaf θ_k would
//! back-propagate through all earlier steps. A step keeps, when asked, the graph from
//! its leaves to θ_{k+1}; the meta-gradient then crosses the steps one at a time by
//! vector-Jacobian products — the same arithmetic as one backward pass through the
//! unrolled loop.

use crate::data::Batch;
use crate::models::FewShotModel;
use crate::nn::Mode;
use crate::tensor::{GradGraph, ParamSet};
use crate::{Error, Result};

use super::loss::{batch_loss, check_finite, finite_value};

/// K steps of SGD with learning rate `lr` on the support loss.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InnerLoop {
    /// Number of steps K (≥ 1).
    pub steps: usize,
    /// Step size α (> 0).
    pub lr: f64,
}

impl InnerLoop {
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
/// `leaves` when `graph` is [`GradGraph::Keep`]) and L(θ_k).
pub(crate) fn sgd_step(
    model: &dyn FewShotModel,
    leaves: &ParamSet,
    support: &Batch,
    step_size: StepSize<'_>,
    graph: GradGraph,
    mode: Mode,
    context: &dyn Fn() -> String,
) -> Result<(ParamSet, f64)> {
    let loss = batch_loss(model, leaves, support, mode)?;
    let value = finite_value(&loss, &|| format!("{}: the support loss", context()))?;
    let grads = leaves.gradients(&loss, graph)?;
    check_finite(&grads, context)?;
    Ok((step_size.step(leaves, &grads)?, value))
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
        inner.steps,
        StepSize::Uniform(inner.lr),
        mode,
    )
}

/// [`adapt_storing`] with any step size.
pub(crate) fn adapt_with(
    model: &dyn FewShotModel,
    params: &ParamSet,
    support: &Batch,
    steps: usize,
    step_size: StepSize<'_>,
    mode: Mode,
) -> Result<(Vec<ParamSet>, ParamSet, Vec<f64>)> {
    let mut theta = params.detach();
    let mut thetas = Vec::with_capacity(steps);
    let mut losses = Vec::with_capacity(steps);
    for step in 0..steps {
        let leaves = theta.to_leaves()?;
        let context = || format!("inner step {}", step + 1);
        let (next, loss) = sgd_step(
            model,
            &leaves,
            support,
            step_size,
            GradGraph::Detach,
            mode,
            &context,
        )?;
        losses.push(loss);
        thetas.push(theta);
        theta = next.detach();
    }
    Ok((thetas, theta, losses))
}

/// The gradient (first order) of the loss on `batch` at `theta`, the loss, and the
/// accuracy of the same forward pass.
pub(crate) fn gradient(
    model: &dyn FewShotModel,
    theta: &ParamSet,
    batch: &Batch,
    mode: Mode,
    context: &dyn Fn() -> String,
) -> Result<(ParamSet, f64, f64)> {
    let leaves = theta.to_leaves()?;
    let logits = model.logits(&leaves, batch, mode)?;
    let loss = crate::tensor::ops::cross_entropy(&logits, &batch.labels, 0.0)?;
    let value = finite_value(&loss, context)?;
    let accuracy = super::loss::accuracy(&logits.detach(), &batch.labels)?;
    let grads = leaves.gradients(&loss, GradGraph::Detach)?;
    check_finite(&grads, context)?;
    Ok((grads, value, accuracy))
}

/// Loss and accuracy on `batch` at `theta`: a forward pass only.
pub(crate) fn evaluate(
    model: &dyn FewShotModel,
    theta: &ParamSet,
    batch: &Batch,
    mode: Mode,
    context: &dyn Fn() -> String,
) -> Result<(f64, f64)> {
    let logits = model.logits(theta, batch, mode)?;
    let loss = crate::tensor::ops::cross_entropy(&logits, &batch.labels, 0.0)?;
    Ok((
        finite_value(&loss, context)?,
        super::loss::accuracy(&logits, &batch.labels)?,
    ))
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
    Ok(gradient_and_hvp(model, theta, batch, v, mode)?.1)
}

/// The gradient (detached) and `H·v` from one graph.
pub(crate) fn gradient_and_hvp(
    model: &dyn FewShotModel,
    theta: &ParamSet,
    batch: &Batch,
    v: &ParamSet,
    mode: Mode,
) -> Result<(ParamSet, ParamSet)> {
    let leaves = theta.to_leaves()?;
    let loss = batch_loss(model, &leaves, batch, mode)?;
    let grads = leaves.gradients(&loss, GradGraph::Keep)?;
    let hv = leaves.gradients(&grads.dot(v)?, GradGraph::Detach)?;
    Ok((grads.detach(), hv))
}
