//! The gradient engine: gradients, Hessian-vector products and curvature products of
//! a loss of a model's outputs, computed one way or another, chosen once when a run
//! is built.
//!
//! A learner is written against [`GradEngine`], not against a model type or a memory
//! mode: [`WholeGraph`] builds one graph per batch and differentiates it (twice for
//! second order); [`Checkpointed`] runs a transformer stack one segment graph at a
//! time (recomputing activations, with Pearlmutter's R-operator for the products),
//! giving the same numbers to float rounding in less memory; [`MicroBatched`] wraps
//! either and sums the results over micro-batches (gradient accumulation). The
//! [`Loss`] is the engine's parameter, so any loss of the outputs can be meta-learned.
//!
//! ```
//! use melora::engine::{GradEngine, WholeGraph};
//! use melora::models::mlp::Mlp;
//! use melora::models::FewShotModel;
//! use melora::data::{EpisodeSource, SinusoidTasks};
//! use melora::nn::Mode;
//!
//! melora::init();
//! let model = Mlp::new(1, &[40, 40], 1, candle_core::DType::F32, &candle_core::Device::Cpu)?;
//! let params = model.init_params(0)?;
//! let task = SinusoidTasks { k_shot: 5, n_query: 5, seed: 0 }.episode(0)?;
//! let engine = WholeGraph::new(&model);
//! let gradient = engine.gradient(&params, &task.support, Mode::Eval)?;
//! assert_eq!(gradient.grads.len(), params.len());
//! // H·g, exact second order.
//! let (_, products) = engine.gradient_and_hvps(&params, &task.support, &[gradient.grads.clone()], Mode::Eval)?;
//! assert!(products[0].norm()? > 0.0);
//! # Ok::<(), melora::Error>(())
//! ```

mod checkpoint;
mod curvature;
mod loss;
mod micro_batch;
mod whole_graph;

pub use checkpoint::Checkpointed;
pub use curvature::{
    block_diagonal_product, exact_hessian_diagonal, hessian_vector_product, hutchinson_diagonal,
};
pub use loss::{Loss, TaskLoss};
pub use micro_batch::MicroBatched;
pub use whole_graph::WholeGraph;

/// Where checkpointing keeps layer inputs (plain data of the configuration).
pub use crate::config::CheckpointPlan;

use candle_core::Tensor;

use crate::data::Batch;
use crate::models::FewShotModel;
use crate::nn::Mode;
use crate::tensor::ParamSet;
use crate::Result;

/// A first-order gradient with the forward's loss and outputs (detached).
#[derive(Debug, Clone)]
pub struct Gradient {
    /// ∇_θ of the loss, detached.
    pub grads: ParamSet,
    /// The loss, a 0-d tensor.
    pub loss: Tensor,
    /// The model's outputs (logits `[b, classes]`).
    pub logits: Tensor,
}

/// Derivatives of an engine's [`Loss`] of its model's outputs on a batch, at a point
/// θ (a ParamSet with the model's trainable names). Every method takes θ's values;
/// none keeps a graph after it returns except
/// [`differentiable_gradient`](Self::differentiable_gradient).
pub trait GradEngine {
    /// The model being differentiated.
    fn model(&self) -> &dyn FewShotModel;

    /// The loss being differentiated.
    fn loss(&self) -> &dyn Loss;

    /// The gradient of the loss on `batch` at `theta`, with the loss and outputs.
    fn gradient(&self, theta: &ParamSet, batch: &Batch, mode: Mode) -> Result<Gradient>;

    /// The gradient at `leaves` (leaf variables, see [`ParamSet::to_leaves`]) with its
    /// graph kept, to be differentiated again across inner steps (full-graph MAML),
    /// and the loss. That needs the whole graph by definition, so every engine builds
    /// it whole.
    fn differentiable_gradient(
        &self,
        leaves: &ParamSet,
        batch: &Batch,
        mode: Mode,
    ) -> Result<(ParamSet, Tensor)> {
        whole_graph::differentiable_gradient(self.model(), self.loss(), leaves, batch, mode)
    }

    /// The gradient (detached) and `H·v` for every `v` of `vs`, H the Hessian of the
    /// loss on `batch` at `theta`. Each `v` must have θ's names and shapes
    /// ([`crate::Error::Params`] otherwise).
    fn gradient_and_hvps(
        &self,
        theta: &ParamSet,
        batch: &Batch,
        vs: &[ParamSet],
        mode: Mode,
    ) -> Result<(ParamSet, Vec<ParamSet>)>;

    /// Block products: for each `(i, v)` of `blocks`, tensor `i`'s part of `H·v` for a
    /// `v` read only on tensor `i` (`H_ii·v_i`: block-diagonal curvature, exact
    /// diagonals), in order.
    fn block_products(
        &self,
        theta: &ParamSet,
        batch: &Batch,
        blocks: &[(usize, &ParamSet)],
        mode: Mode,
    ) -> Result<Vec<Tensor>>;

    /// The generalised Gauss-Newton product `Jᵀ·H_z·J·v`, J the Jacobian of the
    /// outputs z and H_z the loss's Hessian in z ([`Loss::output_hessian_product`]):
    /// positive semi-definite for a convex loss; equal to the Hessian for a model
    /// linear in θ.
    fn gauss_newton_product(
        &self,
        theta: &ParamSet,
        batch: &Batch,
        v: &ParamSet,
        mode: Mode,
    ) -> Result<ParamSet>;

    /// The model's features of `batch` at `theta` ([`FewShotModel::features`],
    /// detached) and their pullback: given the adjoint `a` of the features (the
    /// derivative of some objective in them), `∇_θ ⟨features(θ), a⟩`. Metric
    /// learners score support and query features together, so they differentiate
    /// their objective in the features and pull the adjoints back through the
    /// network with this, which a checkpointed engine does one segment at a time.
    /// The whole-graph default keeps the forward graph until the pullback runs.
    fn feature_pullback<'s>(
        &'s self,
        theta: &ParamSet,
        batch: &Batch,
        mode: Mode,
    ) -> Result<(Tensor, FeaturePullback<'s>)> {
        whole_graph::feature_pullback(self.model(), theta, batch, mode)
    }
}

/// The pullback of [`GradEngine::feature_pullback`]: the features' adjoint in, the
/// θ-gradient out.
pub type FeaturePullback<'s> = Box<dyn FnOnce(&Tensor) -> Result<ParamSet> + 's>;

/// `Σ ⟨a, b⟩` as a 0-d tensor, in f32 when `a` and `b` are half precision: the
/// sweeps add products of half-precision activations to products of the f32
/// trainable tensors (mixed precision), and only differentiate the sum, whose own
/// value is never read.
pub(crate) fn inner(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let sum = (a * b)?.sum_all()?;
    Ok(match sum.dtype() {
        candle_core::DType::BF16 | candle_core::DType::F16 => {
            sum.to_dtype(candle_core::DType::F32)?
        }
        _ => sum,
    })
}

/// Checks block products' vectors against θ and their indices against its tensors.
pub(crate) fn check_blocks(theta: &ParamSet, blocks: &[(usize, &ParamSet)]) -> Result<()> {
    for (i, v) in blocks {
        theta.check_compatible(v)?;
        if *i >= theta.len() {
            return Err(crate::Error::InvalidArgument(format!(
                "block product of tensor {i}, but θ has {} tensors",
                theta.len()
            )));
        }
    }
    Ok(())
}
