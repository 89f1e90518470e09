//! The whole-graph engine: one forward graph per batch, differentiated as often as a
//! product needs (double backward for second order).

use candle_core::{Tensor, Var};

use crate::data::Batch;
use crate::models::FewShotModel;
use crate::nn::Mode;
use crate::tensor::{GradGraph, ParamSet};
use crate::Result;

use super::{inner, FeaturePullback, GradEngine, Gradient, Loss, TaskLoss};

/// [`GradEngine::feature_pullback`] through one graph: the features at leaf copies
/// of θ, their graph kept until the pullback differentiates `⟨features, a⟩`.
pub(crate) fn feature_pullback<'s>(
    model: &'s dyn FewShotModel,
    theta: &ParamSet,
    batch: &Batch,
    mode: Mode,
) -> Result<(Tensor, FeaturePullback<'s>)> {
    let leaves = theta.to_leaves()?;
    let features = model.features(&leaves, batch, mode)?;
    let value = features.detach();
    let pullback = move |a: &Tensor| leaves.gradients(&inner(&features, a)?, GradGraph::Detach);
    Ok((value, Box::new(pullback)))
}

/// Differentiates the whole graph of a batch: the reference every other engine
/// agrees with, and the only one for models that are not transformer stacks.
///
/// ```
/// use melora::engine::{GradEngine, WholeGraph};
/// use melora::models::{mlp::Mlp, FewShotModel};
/// use melora::data::{EpisodeSource, SinusoidTasks};
/// use melora::nn::Mode;
///
/// melora::init();
/// let model = Mlp::new(1, &[8], 1, candle_core::DType::F32, &candle_core::Device::Cpu)?;
/// let task = SinusoidTasks { k_shot: 4, n_query: 4, seed: 1 }.episode(0)?;
/// // A custom loss: the mean absolute error.
/// let mae = |outputs: &candle_core::Tensor, batch: &melora::data::Batch| -> melora::Result<_> {
///     Ok((outputs - batch.regression_targets()?)?.abs()?.mean_all()?)
/// };
/// let engine = WholeGraph::with_loss(&model, &mae);
/// let g = engine.gradient(&model.init_params(0)?, &task.support, Mode::Eval)?;
/// assert!(g.loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()? > 0.0);
/// # Ok::<(), melora::Error>(())
/// ```
#[derive(Clone, Copy)]
pub struct WholeGraph<'a> {
    model: &'a dyn FewShotModel,
    loss: &'a dyn Loss,
}

impl<'a> WholeGraph<'a> {
    /// The engine of `model` with the task's own loss ([`TaskLoss`]).
    pub fn new(model: &'a dyn FewShotModel) -> Self {
        Self::with_loss(model, &TaskLoss)
    }

    /// The engine of `model` with any `loss` of its outputs.
    pub fn with_loss(model: &'a dyn FewShotModel, loss: &'a dyn Loss) -> Self {
        Self { model, loss }
    }

    /// Fresh leaves of `theta`, and the gradient there with its graph kept.
    fn gradient_with_graph(
        &self,
        theta: &ParamSet,
        batch: &Batch,
        mode: Mode,
    ) -> Result<(ParamSet, ParamSet)> {
        let leaves = theta.to_leaves()?;
        let (grads, _) = self.differentiable_gradient(&leaves, batch, mode)?;
        Ok((leaves, grads))
    }
}

/// The gradient at `leaves` with its graph kept, and the loss: the whole graph.
pub(super) fn differentiable_gradient(
    model: &dyn FewShotModel,
    loss: &dyn Loss,
    leaves: &ParamSet,
    batch: &Batch,
    mode: Mode,
) -> Result<(ParamSet, Tensor)> {
    let value = loss.value(&model.logits(leaves, batch, mode)?, batch)?;
    Ok((leaves.gradients(&value, GradGraph::Keep)?, value))
}

impl GradEngine for WholeGraph<'_> {
    fn model(&self) -> &dyn FewShotModel {
        self.model
    }

    fn loss(&self) -> &dyn Loss {
        self.loss
    }

    fn gradient(&self, theta: &ParamSet, batch: &Batch, mode: Mode) -> Result<Gradient> {
        let leaves = theta.to_leaves()?;
        let logits = self.model.logits(&leaves, batch, mode)?;
        let loss = self.loss.value(&logits, batch)?;
        let grads = leaves.gradients(&loss, GradGraph::Detach)?;
        Ok(Gradient {
            grads,
            loss: loss.detach(),
            logits: logits.detach(),
        })
    }

    fn gradient_and_hvps(
        &self,
        theta: &ParamSet,
        batch: &Batch,
        vs: &[ParamSet],
        mode: Mode,
    ) -> Result<(ParamSet, Vec<ParamSet>)> {
        for v in vs {
            theta.check_compatible(v)?;
        }
        let (leaves, grads) = self.gradient_with_graph(theta, batch, mode)?;
        let products = vs
            .iter()
            .map(|v| leaves.vjp(&grads, v, GradGraph::Detach))
            .collect::<Result<Vec<_>>>()?;
        Ok((grads.detach(), products))
    }

    fn block_products(
        &self,
        theta: &ParamSet,
        batch: &Batch,
        blocks: &[(usize, &ParamSet)],
        mode: Mode,
    ) -> Result<Vec<Tensor>> {
        super::check_blocks(theta, blocks)?;
        let (leaves, grads) = self.gradient_with_graph(theta, batch, mode)?;
        blocks
            .iter()
            .map(|&(index, v)| {
                // ⟨∇_i L, v_i⟩ alone, not ⟨∇L, v⟩ with zeros elsewhere: the backward then
                // walks only the part of the double-backward graph this tensor's
                // gradient depends on, instead of the whole graph once per block.
                let (_, g_i) = grads.iter().nth(index).expect("checked index");
                let (name, v_i) = v.iter().nth(index).expect("checked index");
                let h = leaves.gradients(&(g_i * v_i)?.sum_all()?, GradGraph::Detach)?;
                Ok(h.require(name)?.clone())
            })
            .collect()
    }

    /// `J·v` comes from the double-backward trick (∇_u⟨Jᵀu, v⟩ with a zero variable
    /// u), `Jᵀr` from one backward: three passes over one forward graph.
    fn gauss_newton_product(
        &self,
        theta: &ParamSet,
        batch: &Batch,
        v: &ParamSet,
        mode: Mode,
    ) -> Result<ParamSet> {
        theta.check_compatible(v)?;
        let leaves = theta.to_leaves()?;
        let logits = self.model.logits(&leaves, batch, mode)?;
        let u = ParamSet::from_pairs([(
            "u",
            Var::zeros(logits.dims(), logits.dtype(), logits.device())?.into_inner(),
        )])?;
        let j_t_u = leaves.gradients(&(&logits * u.require("u")?)?.sum_all()?, GradGraph::Keep)?;
        let jv = u.gradients(&j_t_u.dot(v)?, GradGraph::Detach)?;
        let r = self
            .loss
            .output_hessian_product(&logits, batch, jv.require("u")?)?;
        leaves.gradients(&(&logits * r)?.sum_all()?, GradGraph::Detach)
    }
}
