//! Meta-learners: each turns one task into a meta-gradient for the shared
//! initialisation, and adapts that initialisation to a task's support set.
//!
//! | learner | meta-gradient | memory in K |
//! |---|---|---|
//! | [`Maml`] full graph | exact second order, every step's graph kept | linear |
//! | [`Maml`] recompute | exact second order: θ₀…θ_K stored, each step's graph rebuilt for one Hessian-vector product | constant |
//! | [`MetaSgd`] | MAML with learned per-entry step sizes (either mode) | as MAML |
//! | [`Fomaml`] | ∇L_q(θ_K) | constant |
//! | [`Reptile`] | θ₀ − θ_K | constant |
//! | [`Melora`] | the MAML recursion with an approximate Hessian | constant |
//!
//! The baselines ([`NoAdaptation`], [`Prototype`], [`LoraFinetune`], [`FullFinetune`],
//! [`Finetune`] and [`HeadFinetune`]) only adapt (they implement [`Adapter`], not
//! [`MetaLearner`]): there is nothing to meta-train.

mod baseline;
mod fomaml;
mod fsct;
mod inner;
mod loss;
mod maml;
mod melora;
mod metric;
mod protonet;
mod reptile;

#[cfg(test)]
mod fixture_tests;
#[cfg(test)]
pub(crate) mod test_models;

pub use baseline::{
    Finetune, FullFinetune, HeadFinetune, LoraFinetune, NoAdaptation, Prototype, PROTOTYPE_MEANS,
};
pub use fomaml::Fomaml;
pub use fsct::{FsctLearner, VicWeights, FSCT_PREFIX, FSCT_SUPPORT};
pub(crate) use inner::gradient as loss_gradient;
pub use inner::{InnerLoop, InnerStepRule};
pub(crate) use loss::loss_value;
pub use maml::{Maml, MamlMode, MetaSgd, STEP_SIZE_PREFIX};
pub use melora::{HessianApproximation, Melora};
pub use protonet::{Distance, ProtoNet, PROTONET_PROTOTYPES};
pub use reptile::Reptile;

use candle_core::Tensor;

use crate::data::{Batch, Episode};
use crate::engine::{GradEngine, MicroBatched};
use crate::nn::Mode;
use crate::tensor::ParamSet;
use crate::Result;

/// What one task contributes to a meta-step.
#[derive(Debug, Clone)]
pub struct TaskOutcome {
    /// The task's meta-gradient (the outer optimiser descends along it).
    pub meta_gradient: ParamSet,
    /// Support loss before each inner step.
    pub support_losses: Vec<f64>,
    /// Query loss after adaptation.
    pub query_loss: f64,
    /// Query accuracy after adaptation.
    pub query_accuracy: f64,
}

/// Anything that adapts parameters to a task's support set: every meta-learner, and
/// the fine-tuning baselines. The [`GradEngine`] gives the model, the loss and how
/// derivatives are taken (whole graph or checkpointed); `mode` carries the dropout
/// seed of the forward passes (or [`Mode::Eval`]).
pub trait Adapter {
    /// `params` adapted to a support set (no graph kept).
    fn adapt(
        &self,
        engine: &dyn GradEngine,
        params: &ParamSet,
        support: &Batch,
        mode: Mode,
    ) -> Result<ParamSet>;

    /// Logits `[b, classes]` (or regression outputs) of `batch` at the `adapted`
    /// parameters: the model's own by default; a metric learner scores by distance.
    fn predict(
        &self,
        engine: &dyn GradEngine,
        adapted: &ParamSet,
        batch: &Batch,
        mode: Mode,
    ) -> Result<Tensor> {
        engine.model().logits(adapted, batch, mode)
    }
}

/// A meta-learning algorithm; memory is measured by the caller around the call.
///
/// A meta-step averages the meta-gradients of a meta-batch of tasks and lets an outer
/// optimiser descend along them; code written against `&dyn MetaLearner` runs every
/// algorithm:
///
/// ```
/// use melora::prelude::*;
///
/// /// One meta-step of any learner on tasks `first..first + 4`; returns θ and the
/// /// mean query loss after adaptation.
/// fn meta_step(learner: &dyn MetaLearner, engine: &dyn GradEngine, params: &ParamSet,
///              tasks: &dyn EpisodeSource, first: u64) -> melora::Result<(ParamSet, f64)> {
///     let mut gradients = Vec::new();
///     let mut loss = 0.0;
///     for index in first..first + 4 {
///         let outcome = learner.meta_gradient(engine, params, &tasks.episode(index)?, Mode::Eval)?;
///         loss += outcome.query_loss / 4.0;
///         gradients.push(outcome.meta_gradient);
///     }
///     Ok((params.axpy(-1e-3, &average(&gradients)?)?, loss))
/// }
///
/// melora::init();
/// let model = Mlp::new(1, &[16], 1, DType::F32, &Device::Cpu)?;
/// let engine = WholeGraph::new(&model);
/// let tasks = SinusoidTasks { k_shot: 5, n_query: 5, seed: 0 };
/// let inner = InnerLoop::new(2, 0.01);
/// let learners: [Box<dyn MetaLearner>; 3] = [
///     Box::new(Maml { inner, mode: MamlMode::Recompute }),
///     Box::new(Fomaml { inner }),
///     Box::new(Reptile { inner }),
/// ];
/// let params = model.init_params(0)?;
/// for learner in &learners {
///     let (next, loss) = meta_step(learner.as_ref(), &engine, &params, &tasks, 0)?;
///     assert!(loss.is_finite() && next.sub(&params)?.norm()? > 0.0);
/// }
/// # Ok::<(), melora::Error>(())
/// ```
pub trait MetaLearner: Adapter {
    /// The meta-gradient of one task at the shared initialisation `params`.
    fn meta_gradient(
        &self,
        engine: &dyn GradEngine,
        params: &ParamSet,
        task: &Episode,
        mode: Mode,
    ) -> Result<TaskOutcome>;

    /// Processes support and query sets `size` examples at a time from now on
    /// (`None`: whole sets), which gives the same meta-gradient with less memory:
    /// what a run does when a step goes above its memory budget. Returns `false` for
    /// a learner that cannot split its batches (the default).
    fn set_micro_batch(&mut self, size: Option<usize>) -> bool {
        let _ = size;
        false
    }
}

/// The query gradient, loss and accuracy at adapted parameters `theta`.
pub(crate) fn query_outcome(
    engine: &dyn GradEngine,
    theta: &ParamSet,
    query: &Batch,
    mode: Mode,
    micro: Option<usize>,
) -> Result<(ParamSet, f64, f64)> {
    inner::gradient(
        &MicroBatched::new(engine, micro),
        theta,
        query,
        mode,
        &|| "the query loss after adaptation".into(),
    )
}
