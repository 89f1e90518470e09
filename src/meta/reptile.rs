//! Reptile: the meta-direction is θ₀ − θ_K, so that the outer optimiser's descent
//! step moves the initialisation toward the adapted parameters.

use crate::data::{Batch, Episode};
use crate::engine::GradEngine;
use crate::nn::Mode;
use crate::tensor::ParamSet;
use crate::Result;

use super::inner::{adapt, evaluate, InnerLoop};
use super::{Adapter, MetaLearner, TaskOutcome};

/// Reptile, with its own inner loop (typically more steps than MAML's).
#[derive(Debug, Clone, Copy)]
pub struct Reptile {
    /// The inner loop.
    pub inner: InnerLoop,
}

impl MetaLearner for Reptile {
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
        // The query set only reports how well the adapted parameters do.
        let (query_loss, query_accuracy) = evaluate(
            &self.inner.engine(engine),
            &adapted,
            &task.query,
            mode,
            &|| "the query loss after adaptation".into(),
        )?;
        Ok(TaskOutcome {
            meta_gradient: params.detach().sub(&adapted)?,
            support_losses,
            query_loss,
            query_accuracy,
        })
    }
}

impl Adapter for Reptile {
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
