//! First-order MAML: the query gradient at the adapted parameters, ∇L_q(θ_K),
//! ignoring how θ_K depends on θ₀.

use crate::data::{Batch, Episode};
use crate::engine::GradEngine;
use crate::nn::Mode;
use crate::tensor::ParamSet;
use crate::Result;

use super::inner::{adapt, InnerLoop};
use super::{query_outcome, Adapter, MetaLearner, TaskOutcome};

/// First-order MAML.
#[derive(Debug, Clone, Copy)]
pub struct Fomaml {
    /// The inner loop.
    pub inner: InnerLoop,
}

impl MetaLearner for Fomaml {
    fn set_micro_batch(&mut self, size: Option<usize>) -> bool {
        self.inner.micro_batch = size;
        true
    }

    fn meta_gradient(
        &self,
        engine: &dyn GradEngine,
        params: &ParamSet,
        task: &Episode,
        mode: Mode,
    ) -> Result<TaskOutcome> {
        let (adapted, support_losses) = adapt(engine, params, &task.support, self.inner, mode)?;
        let (meta_gradient, query_loss, query_accuracy) =
            query_outcome(engine, &adapted, &task.query, mode, self.inner.micro_batch)?;
        Ok(TaskOutcome {
            meta_gradient,
            support_losses,
            query_loss,
            query_accuracy,
        })
    }
}

impl Adapter for Fomaml {
    fn adapt(
        &self,
        engine: &dyn GradEngine,
        params: &ParamSet,
        support: &Batch,
        mode: Mode,
    ) -> Result<ParamSet> {
        Ok(adapt(engine, params, support, self.inner, mode)?.0)
    }
}
