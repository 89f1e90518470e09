//! MAML with the exact second-order meta-gradient
//! `(I − αH₀)(I − αH₁)…(I − αH_{K−1})·∇L_q(θ_K)`, H_k the support-loss Hessian at θ_k.

use crate::data::{Batch, Episode};
use crate::models::FewShotModel;
use crate::nn::Mode;
use crate::tensor::{GradGraph, ParamSet};
use crate::Result;

use super::inner::{adapt, adapt_storing, hessian_vector_product, sgd_step, InnerLoop};
use super::{query_outcome, Adapter, MetaLearner, TaskOutcome};

/// How the second-order terms are obtained; both give the same numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MamlMode {
    /// Keep every inner step's graph and back-propagate through them all: memory
    /// grows linearly with K (the reference behaviour).
    FullGraph,
    /// Store only θ₀…θ_K; for k = K−1…0 rebuild step k's graph for one
    /// Hessian-vector product, `g ← g − α·H_k·g`: memory constant in K, one extra
    /// forward per step.
    Recompute,
}

/// Second-order MAML.
#[derive(Debug, Clone, Copy)]
pub struct Maml {
    /// The inner loop.
    pub inner: InnerLoop,
    /// How second-order terms are computed.
    pub mode: MamlMode,
}

impl Maml {
    fn full_graph(
        &self,
        model: &dyn FewShotModel,
        params: &ParamSet,
        task: &Episode,
        mode: Mode,
    ) -> Result<TaskOutcome> {
        let mut leaves = params.to_leaves()?;
        let mut steps = Vec::with_capacity(self.inner.steps);
        let mut support_losses = Vec::with_capacity(self.inner.steps);
        for step in 0..self.inner.steps {
            let context = || format!("inner step {}", step + 1);
            let (next, loss) = sgd_step(
                model,
                &leaves,
                &task.support,
                self.inner.lr,
                GradGraph::Keep,
                mode,
                &context,
            )?;
            support_losses.push(loss);
            let next_leaves = next.to_leaves()?;
            steps.push((leaves, next));
            leaves = next_leaves;
        }
        let (mut v, query_loss, query_accuracy) = query_outcome(model, &leaves, &task.query, mode)?;
        // v ← ∂⟨θ_{k+1}(θ_k), v⟩/∂θ_k = (I − αH_k)·v, through the kept graphs.
        for (step_leaves, next) in steps.iter().rev() {
            v = step_leaves.gradients(&next.dot(&v)?, GradGraph::Detach)?;
        }
        Ok(TaskOutcome {
            meta_gradient: v,
            support_losses,
            query_loss,
            query_accuracy,
        })
    }

    fn recompute(
        &self,
        model: &dyn FewShotModel,
        params: &ParamSet,
        task: &Episode,
        mode: Mode,
    ) -> Result<TaskOutcome> {
        let (thetas, adapted, support_losses) =
            adapt_storing(model, params, &task.support, self.inner, mode)?;
        let (mut v, query_loss, query_accuracy) =
            query_outcome(model, &adapted, &task.query, mode)?;
        for theta_k in thetas.iter().rev() {
            let hv = hessian_vector_product(model, theta_k, &task.support, &v, mode)?;
            v = v.axpy(-self.inner.lr, &hv)?;
        }
        Ok(TaskOutcome {
            meta_gradient: v,
            support_losses,
            query_loss,
            query_accuracy,
        })
    }
}

impl MetaLearner for Maml {
    fn meta_gradient(
        &self,
        model: &dyn FewShotModel,
        params: &ParamSet,
        task: &Episode,
        mode: Mode,
    ) -> Result<TaskOutcome> {
        self.inner.validate()?;
        match self.mode {
            MamlMode::FullGraph => self.full_graph(model, params, task, mode),
            MamlMode::Recompute => self.recompute(model, params, task, mode),
        }
    }
}

impl Adapter for Maml {
    fn adapt(
        &self,
        model: &dyn FewShotModel,
        params: &ParamSet,
        support: &Batch,
        mode: Mode,
    ) -> Result<ParamSet> {
        Ok(adapt(model, params, support, self.inner, mode)?.0)
    }
}
