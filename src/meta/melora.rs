//! MELoRA: the MAML recursion `g ← g − α·H̃(θ_k)·g` for k = K−1…0 with the support
//! Hessian replaced by an approximation H̃. Memory is constant in K (θ₀…θ_K stored,
//! one step's graph alive at a time).
//!
//! Cost per inner step of the backward recursion (besides one forward and backward to
//! build the step's graph):
//!
//! | approximation | extra passes per step | notes |
//! |---|---|---|
//! | `none` | 0 | first-order MAML |
//! | `diagonal` (Hutchinson) | `probes` double-backwards | unbiased estimate of diag(H) |
//! | `diagonal` (exact) | one double-backward per parameter entry | tiny sets and tests |
//! | `gauss_newton` | 2 backwards + 1 double-backward | PSD; exact for models linear in θ |
//! | `block_diagonal` | one double-backward per parameter tensor | exact MAML for one tensor |
//!
//! `damping` λ adds λ·I to H̃; `clamp` c bounds the curvature: diagonal entries are
//! clamped to [0, c], other products rescaled so that ‖H̃g‖ ≤ c‖g‖ — either keeps
//! every factor (I − αH̃) from amplifying g when αc ≤ 2.

use crate::data::{Batch, Episode};
use crate::engine::{
    block_diagonal_product, exact_hessian_diagonal, hutchinson_diagonal, GradEngine,
};
use crate::nn::Mode;
use crate::tensor::ParamSet;
use crate::{Error, Result};

use super::inner::{adapt_storing, InnerLoop};
use super::{query_outcome, Adapter, MetaLearner, TaskOutcome};

/// The stand-in for the support Hessian.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HessianApproximation {
    /// H̃ = 0: first-order MAML.
    None,
    /// H̃ = diag(H), estimated with `probes` Rademacher probes, or exact.
    Diagonal {
        /// Hutchinson probes per step (ignored when `exact`).
        probes: usize,
        /// Compute the diagonal exactly (one double-backward per entry).
        exact: bool,
    },
    /// The generalised Gauss-Newton matrix of the engine's loss.
    GaussNewton,
    /// Exact per-tensor Hessian blocks.
    BlockDiagonal,
}

/// MAML with an approximate Hessian.
///
/// ```
/// use melora::prelude::*;
///
/// melora::init(); // the curvature products are second order
/// let model = Mlp::new(1, &[16], 1, DType::F32, &Device::Cpu)?;
/// let engine = WholeGraph::new(&model);
/// let task = SinusoidTasks { k_shot: 5, n_query: 5, seed: 0 }.episode(0)?;
/// let params = model.init_params(0)?;
/// let inner = InnerLoop::new(2, 0.01);
/// let melora = |approximation| Melora { inner, approximation, damping: 0.0, clamp: None, seed: 0 };
/// // Gauss-Newton curvature: positive semi-definite, two extra passes per inner step.
/// let gauss_newton = melora(HessianApproximation::GaussNewton)
///     .meta_gradient(&engine, &params, &task, Mode::Eval)?;
/// assert!(gauss_newton.query_loss.is_finite());
/// // With no curvature at all the recursion is first-order MAML.
/// let none = melora(HessianApproximation::None).meta_gradient(&engine, &params, &task, Mode::Eval)?;
/// let fomaml = Fomaml { inner }.meta_gradient(&engine, &params, &task, Mode::Eval)?;
/// assert!(none.meta_gradient.sub(&fomaml.meta_gradient)?.norm()? <= 1e-6 * fomaml.meta_gradient.norm()?);
/// # Ok::<(), melora::Error>(())
/// ```
#[derive(Debug, Clone, Copy)]
pub struct Melora {
    /// The inner loop.
    pub inner: InnerLoop,
    /// The Hessian approximation.
    pub approximation: HessianApproximation,
    /// λ ≥ 0 added to the curvature.
    pub damping: f64,
    /// Bound on the curvature's magnitude, if any.
    pub clamp: Option<f64>,
    /// Seed of Hutchinson's probes.
    pub seed: u64,
}

impl Melora {
    fn validate(&self) -> Result<()> {
        self.inner.validate()?;
        self.inner.require_sgd("MELoRA")?;
        if !(self.damping.is_finite() && self.damping >= 0.0) {
            return Err(Error::InvalidArgument(format!(
                "damping must be ≥ 0, got {}",
                self.damping
            )));
        }
        if let Some(c) = self.clamp {
            if !(c.is_finite() && c > 0.0) {
                return Err(Error::InvalidArgument(format!(
                    "clamp must be > 0, got {c}"
                )));
            }
        }
        if let HessianApproximation::Diagonal {
            probes: 0,
            exact: false,
        } = self.approximation
        {
            return Err(Error::InvalidArgument(
                "Hutchinson's estimate needs at least 1 probe".into(),
            ));
        }
        Ok(())
    }

    /// H̃(θ_k)·g, damped and clamped.
    fn curvature(
        &self,
        engine: &dyn GradEngine,
        theta: &ParamSet,
        support: &Batch,
        g: &ParamSet,
        step: usize,
        mode: Mode,
    ) -> Result<ParamSet> {
        let engine = &self.inner.second_order_engine(engine);
        let product = match self.approximation {
            HessianApproximation::None => g.zeros_like()?,
            HessianApproximation::Diagonal { probes, exact } => {
                let diagonal = if exact {
                    exact_hessian_diagonal(engine, theta, support, None, mode)?
                } else {
                    let seed = crate::tensor::ops::mix_seed(self.seed, step as u64);
                    hutchinson_diagonal(engine, theta, support, probes, seed, mode)?
                };
                let diagonal = match self.clamp {
                    Some(c) => diagonal.map(|_, d| d.clamp(0.0, c))?,
                    None => diagonal,
                };
                diagonal.mul(g)?
            }
            HessianApproximation::GaussNewton => {
                self.bounded(engine.gauss_newton_product(theta, support, g, mode)?, g)?
            }
            HessianApproximation::BlockDiagonal => {
                self.bounded(block_diagonal_product(engine, theta, support, g, mode)?, g)?
            }
        };
        if self.damping > 0.0 {
            product.axpy(self.damping, g)
        } else {
            Ok(product)
        }
    }

    fn bounded(&self, product: ParamSet, g: &ParamSet) -> Result<ParamSet> {
        let Some(c) = self.clamp else {
            return Ok(product);
        };
        let (norm, limit) = (product.norm()?, c * g.norm()?);
        if norm > limit && norm > 0.0 {
            product.scale(limit / norm)
        } else {
            Ok(product)
        }
    }
}

impl MetaLearner for Melora {
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
        self.validate()?;
        let (thetas, adapted, support_losses) =
            adapt_storing(engine, params, &task.support, self.inner, mode)?;
        let (mut g, query_loss, query_accuracy) =
            query_outcome(engine, &adapted, &task.query, mode, self.inner.micro_batch)?;
        if self.approximation != HessianApproximation::None || self.damping > 0.0 {
            // g ← g − α·H̃_k·P g, P the identity or (ANIL) the head's entries.
            let step_size = self.inner.step_size();
            for (step, theta_k) in thetas.iter().enumerate().rev() {
                let direction = step_size.projected(&g)?;
                let h = self.curvature(engine, theta_k, &task.support, &direction, step, mode)?;
                g = g.axpy(-self.inner.lr, &h)?;
            }
        }
        Ok(TaskOutcome {
            meta_gradient: g,
            support_losses,
            query_loss,
            query_accuracy,
        })
    }
}

impl Adapter for Melora {
    fn adapt(
        &self,
        engine: &dyn GradEngine,
        params: &ParamSet,
        support: &Batch,
        mode: Mode,
    ) -> Result<ParamSet> {
        Ok(adapt_storing(engine, params, support, self.inner, mode)?.1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{hessian_vector_product, WholeGraph};
    use crate::fixtures::assert_close;
    use crate::meta::test_models::{dense_episode, LinearProbe, TwoLayerProbe};
    use crate::meta::{Fomaml, Maml, MamlMode};
    use crate::models::FewShotModel;
    use crate::tensor::gradcheck::random_tensor;

    const INNER: InnerLoop = InnerLoop::new(2, 0.3);

    fn melora(approximation: HessianApproximation) -> Melora {
        Melora {
            inner: INNER,
            approximation,
            damping: 0.0,
            clamp: None,
            seed: 7,
        }
    }

    fn relative_gap(a: &ParamSet, b: &ParamSet) -> f64 {
        a.sub(b).unwrap().norm().unwrap() / b.norm().unwrap()
    }

    fn random_like(p: &ParamSet, seed: u64) -> ParamSet {
        p.map(|_, t| random_tensor(t.dims(), seed, t.device()))
            .unwrap()
    }

    #[test]
    fn block_diagonal_on_one_tensor_is_exact_maml() {
        let model = LinearProbe { classes: 3, dim: 4 };
        let (params, task) = (model.init_params(1).unwrap(), dense_episode(3, 4, 2, 10));
        let exact = Maml {
            inner: INNER,
            mode: MamlMode::Recompute,
        }
        .meta_gradient(&WholeGraph::new(&model), &params, &task, Mode::Eval)
        .unwrap();
        let block = melora(HessianApproximation::BlockDiagonal)
            .meta_gradient(&WholeGraph::new(&model), &params, &task, Mode::Eval)
            .unwrap();
        assert!(relative_gap(&block.meta_gradient, &exact.meta_gradient) < 1e-12);
        // With two tensors the cross terms are dropped, so it differs.
        let model = TwoLayerProbe {
            classes: 3,
            dim: 4,
            hidden: 5,
        };
        let params = model.init_params(2).unwrap();
        let exact = Maml {
            inner: INNER,
            mode: MamlMode::Recompute,
        }
        .meta_gradient(&WholeGraph::new(&model), &params, &task, Mode::Eval)
        .unwrap();
        let block = melora(HessianApproximation::BlockDiagonal)
            .meta_gradient(&WholeGraph::new(&model), &params, &task, Mode::Eval)
            .unwrap();
        assert!(relative_gap(&block.meta_gradient, &exact.meta_gradient) > 1e-6);
    }

    #[test]
    fn gauss_newton_is_the_hessian_for_a_linear_model_and_psd_otherwise() {
        let model = LinearProbe { classes: 3, dim: 4 };
        let (params, task) = (model.init_params(3).unwrap(), dense_episode(3, 4, 3, 20));
        let v = random_like(&params, 4);
        let ggn = WholeGraph::new(&model)
            .gauss_newton_product(&params, &task.support, &v, Mode::Eval)
            .unwrap();
        let hvp = hessian_vector_product(
            &WholeGraph::new(&model),
            &params,
            &task.support,
            &v,
            Mode::Eval,
        )
        .unwrap();
        assert!(relative_gap(&ggn, &hvp) < 1e-12);
        let model = TwoLayerProbe {
            classes: 3,
            dim: 4,
            hidden: 5,
        };
        let params = model.init_params(5).unwrap();
        for seed in 0..5 {
            let v = random_like(&params, 100 + seed);
            let gv = WholeGraph::new(&model)
                .gauss_newton_product(&params, &task.support, &v, Mode::Eval)
                .unwrap();
            let curvature = v.dot(&gv).unwrap().to_scalar::<f64>().unwrap();
            assert!(curvature >= -1e-14, "vᵀGv = {curvature}");
        }
    }

    /// A regression batch of `n` random points with `dim` inputs and one target, in f64.
    fn regression_batch(n: usize, dim: usize, seed: u64) -> Batch {
        let device = candle_core::Device::Cpu;
        Batch::regression(
            random_tensor(&[n, dim], seed, &device).unwrap(),
            random_tensor(&[n, 1], seed + 1, &device).unwrap(),
        )
        .unwrap()
    }

    /// The mean squared error's own Gauss-Newton matrix, `Jᵀ·(2/N)·J`: the exact
    /// Hessian of a model linear in θ, and symmetric, positive semi-definite and non-zero
    /// on MAML's sinusoid network (a softmax curvature would be 0 for one output).
    #[test]
    fn gauss_newton_of_a_regression_loss_is_its_own_curvature() {
        let linear = LinearProbe { classes: 1, dim: 4 };
        let (params, batch) = (linear.init_params(3).unwrap(), regression_batch(20, 4, 9));
        let v = random_like(&params, 4);
        let ggn = WholeGraph::new(&linear)
            .gauss_newton_product(&params, &batch, &v, Mode::Eval)
            .unwrap();
        let hvp =
            hessian_vector_product(&WholeGraph::new(&linear), &params, &batch, &v, Mode::Eval)
                .unwrap();
        assert!(hvp.norm().unwrap() > 1e-3);
        assert!(
            relative_gap(&ggn, &hvp) < 1e-12,
            "{}",
            relative_gap(&ggn, &hvp)
        );

        let mlp = crate::models::mlp::Mlp::new(
            1,
            &[40, 40],
            1,
            candle_core::DType::F64,
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let (params, batch) = (mlp.init_params(5).unwrap(), regression_batch(10, 1, 11));
        let product = |v: &ParamSet| {
            WholeGraph::new(&mlp)
                .gauss_newton_product(&params, &batch, v, Mode::Eval)
                .unwrap()
        };
        for seed in 0..4 {
            let (u, v) = (
                random_like(&params, 100 + seed),
                random_like(&params, 200 + seed),
            );
            let (gu, gv) = (product(&u), product(&v));
            let (ugv, vgu) = (
                u.dot(&gv).unwrap().to_scalar::<f64>().unwrap(),
                v.dot(&gu).unwrap().to_scalar::<f64>().unwrap(),
            );
            assert!(
                (ugv - vgu).abs() <= 1e-10 * ugv.abs().max(1.0),
                "{ugv} vs {vgu}"
            );
            let vgv = v.dot(&gv).unwrap().to_scalar::<f64>().unwrap();
            assert!(vgv > 1e-6, "vᵀGv = {vgv}");
            assert!(gv.norm().unwrap() > 1e-6);
        }
    }

    /// A direction that does not match θ (other names, shapes or order) is an error,
    /// not a panic.
    #[test]
    fn curvature_products_refuse_a_direction_of_other_parameters() {
        let model = TwoLayerProbe {
            classes: 3,
            dim: 4,
            hidden: 5,
        };
        let (params, task) = (model.init_params(2).unwrap(), dense_episode(3, 4, 3, 20));
        let w1 = params.require("w1").unwrap().clone();
        let w2 = params.require("w2").unwrap().clone();
        for v in [
            ParamSet::from_pairs([("w1", w1.clone()), ("other", w2.clone())]).unwrap(),
            ParamSet::from_pairs([("w2", w2.clone()), ("w1", w1.clone())]).unwrap(),
            ParamSet::from_pairs([("w1", w1.clone())]).unwrap(),
            ParamSet::from_pairs([("w1", w1.clone()), ("w2", w1.clone())]).unwrap(),
        ] {
            for result in [
                block_diagonal_product(
                    &WholeGraph::new(&model),
                    &params,
                    &task.support,
                    &v,
                    Mode::Eval,
                ),
                WholeGraph::new(&model).gauss_newton_product(
                    &params,
                    &task.support,
                    &v,
                    Mode::Eval,
                ),
            ] {
                let err = result.expect_err("a mismatched direction is refused");
                assert!(matches!(err, Error::Params(_)), "{err}");
            }
        }
    }

    /// The exact diagonal against the transformer fixtures' closed-form head
    /// diagonals (`hess_diag.<param>`, for the parameters the fixture gives).
    #[test]
    fn exact_diagonal_matches_fixture_head_diagonal() {
        for name in ["bert_lora_maml", "gpt2_lora_maml"] {
            let Some(case) = crate::models::fixture_tests::fixture_case(name) else {
                return;
            };
            let mut heads: Vec<&str> = case
                .fixture
                .tensors
                .keys()
                .filter_map(|key| key.strip_prefix("hess_diag."))
                .collect();
            heads.sort_unstable();
            assert!(!heads.is_empty(), "{name} has no hess_diag tensors");
            let diagonal = exact_hessian_diagonal(
                &WholeGraph::new(case.model.as_ref()),
                &case.theta0,
                &case.support,
                Some(&heads),
                Mode::Eval,
            )
            .unwrap();
            for head in heads {
                let expected = case.fixture.tensor(&format!("hess_diag.{head}"));
                assert_close(
                    &format!("{name}: diag(H) of {head}"),
                    diagonal.get(head).unwrap(),
                    expected,
                    1e-8,
                );
            }
        }
    }

    #[test]
    fn exact_diagonal_recursion_is_g_minus_alpha_diag_h_g() {
        let model = TwoLayerProbe {
            classes: 3,
            dim: 4,
            hidden: 5,
        };
        let (params, task) = (model.init_params(6).unwrap(), dense_episode(3, 4, 2, 30));
        let diagonal = HessianApproximation::Diagonal {
            probes: 1,
            exact: true,
        };
        let outcome = melora(diagonal)
            .meta_gradient(&WholeGraph::new(&model), &params, &task, Mode::Eval)
            .unwrap();
        // The recursion written out: θ₀, θ₁ from SGD, then g ← g − α·diag(H_k)⊙g.
        let (thetas, adapted, _) = adapt_storing(
            &WholeGraph::new(&model),
            &params,
            &task.support,
            INNER,
            Mode::Eval,
        )
        .unwrap();
        let (mut g, _, _) = query_outcome(
            &WholeGraph::new(&model),
            &adapted,
            &task.query,
            Mode::Eval,
            None,
        )
        .unwrap();
        for theta in thetas.iter().rev() {
            let d = exact_hessian_diagonal(
                &WholeGraph::new(&model),
                theta,
                &task.support,
                None,
                Mode::Eval,
            )
            .unwrap();
            g = g.sub(&d.mul(&g).unwrap().scale(INNER.lr).unwrap()).unwrap();
        }
        assert!(relative_gap(&outcome.meta_gradient, &g) < 1e-12);
    }

    /// Hutchinson's estimate converges to the exact diagonal as probes grow.
    #[test]
    fn hutchinson_converges_to_the_exact_diagonal() {
        let model = TwoLayerProbe {
            classes: 3,
            dim: 4,
            hidden: 5,
        };
        let (params, task) = (model.init_params(8).unwrap(), dense_episode(3, 4, 3, 40));
        let exact = exact_hessian_diagonal(
            &WholeGraph::new(&model),
            &params,
            &task.support,
            None,
            Mode::Eval,
        )
        .unwrap();
        let error = |probes| {
            let estimate = hutchinson_diagonal(
                &WholeGraph::new(&model),
                &params,
                &task.support,
                probes,
                99,
                Mode::Eval,
            )
            .unwrap();
            relative_gap(&estimate, &exact)
        };
        let (few, many) = (error(2), error(2000));
        assert!(
            many < few / 5.0,
            "2 probes: {few:.3}, 2000 probes: {many:.3}"
        );
        assert!(many < 0.1, "2000 probes: relative error {many:.3}");
    }

    #[test]
    fn none_is_fomaml_and_clamping_bounds_the_curvature() {
        let model = TwoLayerProbe {
            classes: 3,
            dim: 4,
            hidden: 5,
        };
        let (params, task) = (model.init_params(9).unwrap(), dense_episode(3, 4, 2, 50));
        let none = melora(HessianApproximation::None)
            .meta_gradient(&WholeGraph::new(&model), &params, &task, Mode::Eval)
            .unwrap();
        let fo = Fomaml { inner: INNER }
            .meta_gradient(&WholeGraph::new(&model), &params, &task, Mode::Eval)
            .unwrap();
        assert_eq!(relative_gap(&none.meta_gradient, &fo.meta_gradient), 0.0);
        // With a tiny clamp the correction nearly vanishes: close to first order.
        for approximation in [
            HessianApproximation::GaussNewton,
            HessianApproximation::BlockDiagonal,
            HessianApproximation::Diagonal {
                probes: 4,
                exact: false,
            },
        ] {
            let clamped = Melora {
                clamp: Some(1e-9),
                ..melora(approximation)
            }
            .meta_gradient(&WholeGraph::new(&model), &params, &task, Mode::Eval)
            .unwrap();
            assert!(
                relative_gap(&clamped.meta_gradient, &fo.meta_gradient) < 1e-8,
                "{approximation:?}"
            );
        }
    }

    #[test]
    fn invalid_settings_are_errors() {
        let model = LinearProbe { classes: 3, dim: 4 };
        let (params, task) = (model.init_params(1).unwrap(), dense_episode(3, 4, 2, 10));
        let bad = [
            Melora {
                damping: -1.0,
                ..melora(HessianApproximation::GaussNewton)
            },
            Melora {
                clamp: Some(0.0),
                ..melora(HessianApproximation::GaussNewton)
            },
            melora(HessianApproximation::Diagonal {
                probes: 0,
                exact: false,
            }),
            Melora {
                inner: InnerLoop::new(0, 0.1),
                ..melora(HessianApproximation::None)
            },
            Melora {
                inner: InnerLoop::new(1, 0.0),
                ..melora(HessianApproximation::None)
            },
        ];
        for learner in bad {
            assert!(
                learner
                    .meta_gradient(&WholeGraph::new(&model), &params, &task, Mode::Eval)
                    .is_err(),
                "{learner:?}"
            );
        }
    }
}
