//! MAML with the exact second-order meta-gradient
//! `(I − αH₀)(I − αH₁)…(I − αH_{K−1})·∇L_q(θ_K)`, H_k the support-loss Hessian at θ_k,
//! and its MetaSGD variant with a learned step size per parameter entry.

use crate::data::{Batch, Episode};
use crate::engine::GradEngine;
use crate::nn::Mode;
use crate::tensor::{GradGraph, ParamSet};
use crate::{Error, Result};

use super::inner::{adapt_with, sgd_step, InnerLoop, StepSize};
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
///
/// Both [`MamlMode`]s give the same meta-gradient; `Recompute` keeps memory constant in
/// the number of inner steps:
///
/// ```
/// use melora::prelude::*;
///
/// melora::init(); // second order needs it, before any backward pass
/// let model = Mlp::new(1, &[16], 1, DType::F32, &Device::Cpu)?;
/// let engine = WholeGraph::new(&model);
/// let task = SinusoidTasks { k_shot: 5, n_query: 5, seed: 0 }.episode(0)?;
/// let params = model.init_params(0)?;
/// let inner = InnerLoop::new(3, 0.01);
/// let full = Maml { inner, mode: MamlMode::FullGraph }
///     .meta_gradient(&engine, &params, &task, Mode::Eval)?;
/// let recomputed = Maml { inner, mode: MamlMode::Recompute }
///     .meta_gradient(&engine, &params, &task, Mode::Eval)?;
/// let gap = full.meta_gradient.sub(&recomputed.meta_gradient)?.norm()?;
/// assert!(gap <= 1e-4 * full.meta_gradient.norm()?, "modes differ by {gap}");
/// // The second-order terms matter: FOMAML's gradient is another one.
/// let first_order = Fomaml { inner }.meta_gradient(&engine, &params, &task, Mode::Eval)?;
/// assert!(first_order.meta_gradient.sub(&full.meta_gradient)?.norm()? > gap);
/// # Ok::<(), melora::Error>(())
/// ```
#[derive(Debug, Clone, Copy)]
pub struct Maml {
    /// The inner loop.
    pub inner: InnerLoop,
    /// How second-order terms are computed.
    pub mode: MamlMode,
}

/// MAML with a learned step size per parameter entry (MetaSGD, Li et al. 2017):
/// `θ_{k+1} = θ_k − α⊙∇L_s(θ_k)`, with α meta-trained beside θ₀. The step sizes live
/// in the same ParamSet as `meta_sgd_lr.<name>` (models ignore them); create them with
/// [`MetaSgd::with_step_sizes`]. The meta-gradient holds both parts; the step sizes'
/// part is `Σ_k −∇L_s(θ_k) ⊙ v_{k+1}`, with v_{k+1} the adjoint of θ_{k+1}.
#[derive(Debug, Clone, Copy)]
pub struct MetaSgd {
    /// Inner steps, and the initial value of every step size.
    pub inner: InnerLoop,
    /// How second-order terms are computed.
    pub mode: MamlMode,
}

/// Prefix of the learned step sizes' names.
pub const STEP_SIZE_PREFIX: &str = "meta_sgd_lr.";

impl MetaSgd {
    /// `params` with a step size per entry, all equal to `inner.lr`.
    pub fn with_step_sizes(&self, params: &ParamSet) -> Result<ParamSet> {
        self.inner.validate()?;
        let mut out = params.clone();
        for (name, t) in params.iter() {
            out.insert(
                format!("{STEP_SIZE_PREFIX}{name}"),
                (t.ones_like()? * self.inner.lr)?,
            )?;
        }
        Ok(out)
    }

    /// Splits a ParamSet into θ and the step sizes (named like θ).
    fn split(params: &ParamSet) -> Result<(ParamSet, ParamSet)> {
        let mut theta = ParamSet::new();
        let mut alpha = ParamSet::new();
        for (name, t) in params.iter() {
            match name.strip_prefix(STEP_SIZE_PREFIX) {
                Some(of) => alpha.insert(of, t.clone())?,
                None => theta.insert(name, t.clone())?,
            }
        }
        let ordered = ParamSet::from_pairs(
            theta
                .names()
                .map(|n| {
                    let t = alpha.get(n).cloned().ok_or_else(|| {
                        Error::Params(format!(
                    "MetaSGD has no step size for `{n}`; create them with MetaSgd::with_step_sizes"
                ))
                    });
                    (n.to_string(), t)
                })
                .map(|(n, t)| t.map(|t| (n, t)))
                .collect::<Result<Vec<_>>>()?,
        )?;
        if ordered.len() != alpha.len() {
            return Err(Error::Params(
                "MetaSGD step sizes name parameters that do not exist".into(),
            ));
        }
        Ok((theta, ordered))
    }
}

/// Exact second-order meta-gradient with uniform (`alpha = None`) or per-entry step
/// sizes; returns the outcome for θ and, with per-entry sizes, their gradient.
fn second_order(
    engine: &dyn GradEngine,
    theta0: &ParamSet,
    alpha: Option<&ParamSet>,
    inner: InnerLoop,
    method: MamlMode,
    task: &Episode,
    mode: Mode,
) -> Result<(TaskOutcome, Option<ParamSet>)> {
    inner.validate()?;
    inner.require_sgd(if alpha.is_some() { "MetaSGD" } else { "MAML" })?;
    match method {
        MamlMode::FullGraph => {
            // Per-entry step sizes are leaves shared by every step's graph.
            let alpha_leaves = alpha.map(ParamSet::to_leaves).transpose()?;
            let step_size = match &alpha_leaves {
                Some(a) => StepSize::PerEntry(a),
                None => inner.step_size(),
            };
            let batched = inner.engine(engine);
            let mut leaves = theta0.to_leaves()?;
            let mut steps = Vec::with_capacity(inner.steps);
            let mut support_losses = Vec::with_capacity(inner.steps);
            for step in 0..inner.steps {
                let context = || format!("inner step {}", step + 1);
                let (next, loss) = sgd_step(
                    &batched,
                    &leaves,
                    &task.support,
                    step_size,
                    GradGraph::Keep,
                    mode,
                    &context,
                )?;
                support_losses.push(loss);
                let next_leaves = next.to_leaves()?;
                steps.push((leaves, next));
                leaves = next_leaves;
            }
            let (mut v, query_loss, query_accuracy) =
                query_outcome(engine, &leaves, &task.query, mode, inner.micro_batch)?;
            let mut alpha_grad = alpha.map(ParamSet::zeros_like).transpose()?;
            // v ← ∂⟨θ_{k+1}(θ_k, α), v⟩/∂θ_k = v − H_k(α⊙v), through the kept graphs;
            // the step sizes collect ∂⟨θ_{k+1}, v⟩/∂α = −g_k⊙v.
            for (step_leaves, next) in steps.iter().rev() {
                if let (Some(a), Some(total)) = (&alpha_leaves, alpha_grad.as_mut()) {
                    *total = total.add(&a.vjp(next, &v, GradGraph::Detach)?)?;
                }
                v = step_leaves.vjp(next, &v, GradGraph::Detach)?;
            }
            Ok((
                TaskOutcome {
                    meta_gradient: v,
                    support_losses,
                    query_loss,
                    query_accuracy,
                },
                alpha_grad,
            ))
        }
        MamlMode::Recompute => {
            let step_size = match alpha {
                Some(a) => StepSize::PerEntry(a),
                None => inner.step_size(),
            };
            let (thetas, adapted, support_losses) =
                adapt_with(engine, theta0, &task.support, inner, step_size, mode)?;
            let (mut v, query_loss, query_accuracy) =
                query_outcome(engine, &adapted, &task.query, mode, inner.micro_batch)?;
            let mut alpha_grad = alpha.map(ParamSet::zeros_like).transpose()?;
            let batched = inner.second_order_engine(engine);
            for theta_k in thetas.iter().rev() {
                let scaled = step_size.scaled(&v)?;
                let (g, mut products) = batched.gradient_and_hvps(
                    theta_k,
                    &task.support,
                    std::slice::from_ref(&scaled),
                    mode,
                )?;
                let h_scaled = products.pop().expect("one product per vector");
                if let Some(total) = alpha_grad.as_mut() {
                    *total = total.sub(&g.mul(&v)?)?;
                }
                v = v.sub(&h_scaled)?;
            }
            Ok((
                TaskOutcome {
                    meta_gradient: v,
                    support_losses,
                    query_loss,
                    query_accuracy,
                },
                alpha_grad,
            ))
        }
    }
}

impl MetaLearner for Maml {
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
        Ok(second_order(engine, params, None, self.inner, self.mode, task, mode)?.0)
    }
}

impl Adapter for Maml {
    fn adapt(
        &self,
        engine: &dyn GradEngine,
        params: &ParamSet,
        support: &Batch,
        mode: Mode,
    ) -> Result<ParamSet> {
        self.inner.validate()?;
        Ok(adapt_with(
            engine,
            params,
            support,
            self.inner,
            self.inner.step_size(),
            mode,
        )?
        .1)
    }
}

impl MetaLearner for MetaSgd {
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
        let (theta, alpha) = Self::split(params)?;
        let (mut outcome, alpha_grad) = second_order(
            engine,
            &theta,
            Some(&alpha),
            self.inner,
            self.mode,
            task,
            mode,
        )?;
        let alpha_grad = alpha_grad.expect("per-entry step sizes give their gradient");
        // Back in the caller's layout: θ's gradient, then the step sizes'.
        let mut gradient = outcome.meta_gradient.clone();
        for (name, g) in alpha_grad.iter() {
            gradient.insert(format!("{STEP_SIZE_PREFIX}{name}"), g.clone())?;
        }
        outcome.meta_gradient = gradient.restricted_to(params.names())?;
        Ok(outcome)
    }
}

impl Adapter for MetaSgd {
    /// Adapts θ with the learned step sizes; returns θ_K (without the step sizes).
    fn adapt(
        &self,
        engine: &dyn GradEngine,
        params: &ParamSet,
        support: &Batch,
        mode: Mode,
    ) -> Result<ParamSet> {
        let (theta, alpha) = Self::split(params)?;
        Ok(adapt_with(
            engine,
            &theta,
            support,
            self.inner,
            StepSize::PerEntry(&alpha),
            mode,
        )?
        .1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::WholeGraph;
    use crate::meta::test_models::{dense_episode, TwoLayerProbe};
    use crate::models::FewShotModel;

    const INNER: InnerLoop = InnerLoop::new(3, 0.2);

    fn gap(a: &ParamSet, b: &ParamSet) -> f64 {
        a.sub(b).unwrap().norm().unwrap() / b.norm().unwrap().max(1e-300)
    }

    fn theta_part(p: &ParamSet) -> ParamSet {
        MetaSgd::split(p).unwrap().0
    }

    /// With every step size equal to the MAML rate, MetaSGD's θ-gradient is MAML's,
    /// in both modes, and the modes agree on the step sizes' gradient.
    #[test]
    fn uniform_step_sizes_reduce_to_maml() {
        let model = TwoLayerProbe {
            classes: 3,
            dim: 4,
            hidden: 5,
        };
        let (params, task) = (model.init_params(1).unwrap(), dense_episode(3, 4, 2, 3));
        let mut grads = Vec::new();
        for mode in [MamlMode::FullGraph, MamlMode::Recompute] {
            let maml = Maml { inner: INNER, mode }
                .meta_gradient(&WholeGraph::new(&model), &params, &task, Mode::Eval)
                .unwrap();
            let learner = MetaSgd { inner: INNER, mode };
            let with = learner.with_step_sizes(&params).unwrap();
            let sgd = learner
                .meta_gradient(&WholeGraph::new(&model), &with, &task, Mode::Eval)
                .unwrap();
            assert!(gap(&theta_part(&sgd.meta_gradient), &maml.meta_gradient) < 1e-12);
            assert_eq!(
                sgd.meta_gradient.names().collect::<Vec<_>>(),
                with.names().collect::<Vec<_>>()
            );
            grads.push(sgd.meta_gradient);
        }
        assert!(gap(&grads[0], &grads[1]) < 1e-12, "modes differ");
    }

    /// The step sizes' gradient against central finite differences of the query loss.
    #[test]
    fn step_size_gradient_matches_finite_differences() {
        let model = TwoLayerProbe {
            classes: 3,
            dim: 4,
            hidden: 5,
        };
        let (params, task) = (model.init_params(2).unwrap(), dense_episode(3, 4, 2, 4));
        let learner = MetaSgd {
            inner: INNER,
            mode: MamlMode::Recompute,
        };
        let base = learner.with_step_sizes(&params).unwrap();
        // Different rates per entry, so the test is not the uniform special case.
        let base = base
            .map(|n, t| {
                if n.starts_with(STEP_SIZE_PREFIX) {
                    (t * 0.5)?
                        + (crate::tensor::gradcheck::random_tensor(t.dims(), 5, t.device())?
                            .abs()?
                            * 0.1)?
                } else {
                    Ok(t.clone())
                }
            })
            .unwrap();
        let analytic = learner
            .meta_gradient(&WholeGraph::new(&model), &base, &task, Mode::Eval)
            .unwrap()
            .meta_gradient;
        let query_loss = |p: &ParamSet| {
            learner
                .meta_gradient(&WholeGraph::new(&model), p, &task, Mode::Eval)
                .unwrap()
                .query_loss
        };
        let h = 1e-6;
        for name in ["meta_sgd_lr.w1", "meta_sgd_lr.w2"] {
            for index in [0usize, 3] {
                let shift = |delta: f64| {
                    base.map(|n, t| {
                        if n != name {
                            return Ok(t.clone());
                        }
                        let mut v = t.flatten_all()?.to_vec1::<f64>()?;
                        v[index] += delta;
                        Tensor::from_vec(v, t.dims(), t.device())
                    })
                    .unwrap()
                };
                let numeric = (query_loss(&shift(h)) - query_loss(&shift(-h))) / (2.0 * h);
                let a = analytic
                    .get(name)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap()[index];
                assert!(
                    (a - numeric).abs() <= 1e-6 * numeric.abs().max(1e-3),
                    "{name}[{index}]: {a} vs {numeric}"
                );
            }
        }
    }

    #[test]
    fn missing_step_sizes_are_an_error() {
        let model = TwoLayerProbe {
            classes: 3,
            dim: 4,
            hidden: 5,
        };
        let (params, task) = (model.init_params(1).unwrap(), dense_episode(3, 4, 2, 3));
        let err = MetaSgd {
            inner: INNER,
            mode: MamlMode::FullGraph,
        }
        .meta_gradient(&WholeGraph::new(&model), &params, &task, Mode::Eval)
        .unwrap_err()
        .to_string();
        assert!(err.contains("with_step_sizes"), "{err}");
    }

    use candle_core::Tensor;

    /// The loss is the engine's parameter: MAML with a custom loss (label-smoothed
    /// cross-entropy, written as a closure) has the exact meta-gradient of that loss
    /// — finite differences of L_q(θ − α∇L_s(θ)) agree along random directions, in
    /// both modes — and it differs from the task loss's.
    #[test]
    fn maml_meta_learns_with_a_custom_loss() {
        let model = TwoLayerProbe {
            classes: 3,
            dim: 4,
            hidden: 5,
        };
        let (params, task) = (model.init_params(2).unwrap(), dense_episode(3, 4, 2, 6));
        let smoothed = |logits: &Tensor, batch: &crate::data::Batch| -> crate::Result<Tensor> {
            Ok(crate::tensor::ops::cross_entropy(
                logits,
                &batch.labels,
                0.2,
            )?)
        };
        let engine = WholeGraph::with_loss(&model, &smoothed);
        let inner = InnerLoop::new(2, 0.3);
        let objective = |theta: &ParamSet| -> f64 {
            let adapted = Maml {
                inner,
                mode: MamlMode::Recompute,
            }
            .adapt(&engine, theta, &task.support, Mode::Eval)
            .unwrap();
            let logits = model.logits(&adapted, &task.query, Mode::Eval).unwrap();
            smoothed(&logits, &task.query)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let plain = Maml {
            inner,
            mode: MamlMode::Recompute,
        }
        .meta_gradient(&WholeGraph::new(&model), &params, &task, Mode::Eval)
        .unwrap()
        .meta_gradient;
        for mode in [MamlMode::FullGraph, MamlMode::Recompute] {
            let g = Maml { inner, mode }
                .meta_gradient(&engine, &params, &task, Mode::Eval)
                .unwrap()
                .meta_gradient;
            assert!(gap(&g, &plain) > 1e-3, "the custom loss changed nothing");
            for seed in 0..3 {
                let d = params
                    .map(|_, t| {
                        crate::tensor::gradcheck::random_tensor(t.dims(), 40 + seed, t.device())
                    })
                    .unwrap();
                let eps = 1e-5;
                let numeric = (objective(&params.axpy(eps, &d).unwrap())
                    - objective(&params.axpy(-eps, &d).unwrap()))
                    / (2.0 * eps);
                let analytic = g.dot(&d).unwrap().to_scalar::<f64>().unwrap();
                assert!(
                    (numeric - analytic).abs() < 1e-7 * (1.0 + analytic.abs()),
                    "{mode:?}: {analytic} vs finite differences {numeric}"
                );
            }
        }
    }

    /// ANIL (only the head adapted): the body stays at θ₀ within the task, the head
    /// moves, and the meta-gradient of every parameter, the body's included, is
    /// exact: central finite differences of L_q(θ_K(θ)) agree along random
    /// directions, in both modes. MELoRA's Gauss-Newton curvature, exact on a
    /// model whose logits are linear in θ, gives the same meta-gradient; a model
    /// without a head is refused, naming it.
    #[test]
    fn anil_adapts_the_head_only_with_the_exact_meta_gradient() {
        use crate::meta::test_models::HeadedProbe;
        use crate::meta::{HessianApproximation, Melora};
        use crate::models::HEAD_WEIGHT;
        let model = HeadedProbe {
            classes: 3,
            dim: 4,
            hidden: 5,
            linear: false,
        };
        let (params, task) = (model.init_params(4).unwrap(), dense_episode(3, 4, 2, 8));
        let engine = WholeGraph::new(&model);
        let inner = InnerLoop::new(2, 0.4).with_head_only();
        let learner = |mode| Maml { inner, mode };
        let adapted = learner(MamlMode::Recompute)
            .adapt(&engine, &params, &task.support, Mode::Eval)
            .unwrap();
        let moved = |name: &str| {
            crate::tensor::test_support::max_abs_diff(
                adapted.require(name).unwrap(),
                params.require(name).unwrap(),
            )
        };
        assert_eq!(moved("w1"), 0.0, "the body does not adapt");
        assert!(moved(HEAD_WEIGHT) > 1e-3, "the head adapts");
        let objective = |theta: &ParamSet| -> f64 {
            learner(MamlMode::Recompute)
                .meta_gradient(&engine, theta, &task, Mode::Eval)
                .unwrap()
                .query_loss
        };
        let grads: Vec<ParamSet> = [MamlMode::FullGraph, MamlMode::Recompute]
            .into_iter()
            .map(|mode| {
                learner(mode)
                    .meta_gradient(&engine, &params, &task, Mode::Eval)
                    .unwrap()
                    .meta_gradient
            })
            .collect();
        assert!(gap(&grads[0], &grads[1]) < 1e-12, "modes differ");
        let body = grads[1]
            .require("w1")
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap();
        assert!(
            body.to_scalar::<f64>().unwrap() > 1e-8,
            "the body is meta-trained"
        );
        for seed in 0..3 {
            let d = params
                .map(|_, t| {
                    crate::tensor::gradcheck::random_tensor(t.dims(), 60 + seed, t.device())
                })
                .unwrap();
            let eps = 1e-5;
            let numeric = (objective(&params.axpy(eps, &d).unwrap())
                - objective(&params.axpy(-eps, &d).unwrap()))
                / (2.0 * eps);
            let analytic = grads[1].dot(&d).unwrap().to_scalar::<f64>().unwrap();
            assert!(
                (numeric - analytic).abs() < 1e-7 * (1.0 + analytic.abs()),
                "{analytic} vs finite differences {numeric}"
            );
            // Plain MAML's meta-gradient is another one.
            let maml = Maml {
                inner: InnerLoop::new(2, 0.4),
                mode: MamlMode::Recompute,
            }
            .meta_gradient(&engine, &params, &task, Mode::Eval)
            .unwrap()
            .meta_gradient;
            assert!(gap(&maml, &grads[1]) > 1e-3);
        }
        let linear = HeadedProbe {
            classes: 3,
            dim: 4,
            hidden: 3,
            linear: true,
        };
        let params = linear.init_params(5).unwrap();
        let engine = WholeGraph::new(&linear);
        let exact = learner(MamlMode::Recompute)
            .meta_gradient(&engine, &params, &task, Mode::Eval)
            .unwrap()
            .meta_gradient;
        let gauss_newton = Melora {
            inner,
            approximation: HessianApproximation::GaussNewton,
            damping: 0.0,
            clamp: None,
            seed: 0,
        }
        .meta_gradient(&engine, &params, &task, Mode::Eval)
        .unwrap()
        .meta_gradient;
        assert!(
            gap(&gauss_newton, &exact) < 1e-10,
            "{}",
            gap(&gauss_newton, &exact)
        );
        let headless = TwoLayerProbe {
            classes: 3,
            dim: 4,
            hidden: 5,
        };
        let err = learner(MamlMode::Recompute)
            .meta_gradient(
                &WholeGraph::new(&headless),
                &headless.init_params(1).unwrap(),
                &task,
                Mode::Eval,
            )
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("classifier.weight") && err.contains("inner.adapt"),
            "{err}"
        );
    }

    /// TwoLayerProbe whose examples count as coupled (as batch statistics couple them).
    struct Coupled(TwoLayerProbe);

    impl FewShotModel for Coupled {
        fn init_params(&self, seed: u64) -> crate::Result<ParamSet> {
            self.0.init_params(seed)
        }
        fn features(&self, p: &ParamSet, b: &crate::data::Batch, m: Mode) -> crate::Result<Tensor> {
            self.0.features(p, b, m)
        }
        fn logits(&self, p: &ParamSet, b: &crate::data::Batch, m: Mode) -> crate::Result<Tensor> {
            self.0.logits(p, b, m)
        }
        fn couples_examples(&self) -> bool {
            true
        }
    }

    /// Second-order products in micro-batches (of 2 of 6 support examples, so 3
    /// chunks) give every second-order learner the whole-set meta-gradient; a model
    /// with coupled examples ignores the setting instead of refusing the run.
    #[test]
    fn second_order_micro_batches_change_nothing_but_memory() {
        use crate::meta::{HessianApproximation, Melora};
        let probe = || TwoLayerProbe {
            classes: 3,
            dim: 4,
            hidden: 5,
        };
        let model = probe();
        let (params, task) = (model.init_params(3).unwrap(), dense_episode(3, 4, 2, 3));
        let split = INNER.with_second_order_micro_batch(2);
        let learners = |inner: InnerLoop| -> Vec<(String, Box<dyn MetaLearner>)> {
            let mut all: Vec<(String, Box<dyn MetaLearner>)> = vec![
                (
                    "maml".into(),
                    Box::new(Maml {
                        inner,
                        mode: MamlMode::Recompute,
                    }),
                ),
                (
                    "metasgd".into(),
                    Box::new(MetaSgd {
                        inner,
                        mode: MamlMode::Recompute,
                    }),
                ),
            ];
            for approximation in [
                HessianApproximation::GaussNewton,
                HessianApproximation::BlockDiagonal,
                HessianApproximation::Diagonal {
                    probes: 2,
                    exact: false,
                },
            ] {
                all.push((
                    format!("melora {approximation:?}"),
                    Box::new(Melora {
                        inner,
                        approximation,
                        damping: 0.0,
                        clamp: None,
                        seed: 5,
                    }),
                ));
            }
            all
        };
        let engine = WholeGraph::new(&model);
        let chunks = |inner: InnerLoop, engine: &dyn GradEngine| {
            inner
                .second_order_engine(engine)
                .chunks(&task.support)
                .unwrap()
                .len()
        };
        assert_eq!(chunks(split, &engine), 3);
        assert_eq!(chunks(INNER, &engine), 1);
        assert_eq!(chunks(split.with_micro_batch(1), &engine), 6);
        assert_eq!(
            split.engine(&engine).chunks(&task.support).unwrap().len(),
            1
        );
        let with_sizes = MetaSgd {
            inner: INNER,
            mode: MamlMode::Recompute,
        }
        .with_step_sizes(&params)
        .unwrap();
        for ((name, whole), (_, chunked)) in learners(INNER).iter().zip(learners(split)) {
            let p = if name == "metasgd" {
                &with_sizes
            } else {
                &params
            };
            let a = whole.meta_gradient(&engine, p, &task, Mode::Eval).unwrap();
            let b = chunked
                .meta_gradient(&engine, p, &task, Mode::Eval)
                .unwrap();
            let g = gap(&b.meta_gradient, &a.meta_gradient);
            assert!(g < 1e-12, "{name}: micro-batched products moved it by {g}");
        }
        let coupled = Coupled(probe());
        let engine = WholeGraph::new(&coupled);
        assert_eq!(chunks(split, &engine), 1);
        let learner = Maml {
            inner: split,
            mode: MamlMode::Recompute,
        };
        let a = learner
            .meta_gradient(&engine, &params, &task, Mode::Eval)
            .unwrap();
        let b = Maml {
            inner: INNER,
            mode: MamlMode::Recompute,
        }
        .meta_gradient(&engine, &params, &task, Mode::Eval)
        .unwrap();
        assert!(gap(&a.meta_gradient, &b.meta_gradient) < 1e-12);
        assert!(InnerLoop {
            second_order_micro_batch: Some(0),
            ..INNER
        }
        .validate()
        .is_err());
    }
}
