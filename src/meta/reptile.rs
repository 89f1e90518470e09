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

#[cfg(test)]
mod tests {
    use candle_core::DType;

    use super::*;
    use crate::engine::WholeGraph;
    use crate::meta::test_models::{dense_episode, TwoLayerProbe};
    use crate::meta::Maml;
    use crate::meta::MamlMode;
    use crate::models::FewShotModel;

    fn flat(p: &ParamSet) -> Vec<f64> {
        p.iter()
            .flat_map(|(_, t)| {
                let t = t.flatten_all().unwrap().to_dtype(DType::F64).unwrap();
                t.to_vec1::<f64>().unwrap()
            })
            .collect()
    }

    fn unflat(template: &ParamSet, values: &[f64]) -> ParamSet {
        let mut offset = 0;
        template
            .map(|_, t| {
                let n = t.elem_count();
                let part = &values[offset..offset + n];
                offset += n;
                candle_core::Tensor::from_slice(part, t.shape(), t.device())?.to_dtype(t.dtype())
            })
            .unwrap()
    }

    /// Reptile adapting with Adam: θ₀ − θ₂ against two Adam steps written out entry
    /// by entry from the support gradients (bias-corrected moments started at zero),
    /// for Reptile's β₁ = 0 and for a first moment that carries over.
    #[test]
    fn inner_adam_matches_steps_written_out_by_hand() {
        let model = TwoLayerProbe {
            classes: 3,
            dim: 4,
            hidden: 5,
        };
        let (params, task) = (model.init_params(1).unwrap(), dense_episode(3, 4, 2, 3));
        let engine = WholeGraph::new(&model);
        let gradient_at = |theta: &ParamSet| {
            let leaves = theta.to_leaves().unwrap();
            flat(
                &engine
                    .gradient(&leaves, &task.support, Mode::Eval)
                    .unwrap()
                    .grads,
            )
        };
        let (lr, beta2, eps) = (0.05, 0.999, 1e-8);
        for beta1 in [0.0, 0.5] {
            let inner = InnerLoop::new(2, lr).with_adam(beta1, beta2);
            let outcome = Reptile { inner }
                .meta_gradient(&engine, &params, &task, Mode::Eval)
                .unwrap();

            let theta0 = flat(&params);
            let g1 = gradient_at(&params);
            // First step: m̂ = g and v̂ = g², a step of lr·g/(|g| + ε).
            let theta1: Vec<f64> = theta0
                .iter()
                .zip(&g1)
                .map(|(t, g)| t - lr * g / (g.abs() + eps))
                .collect();
            let g2 = gradient_at(&unflat(&params, &theta1));
            let theta2: Vec<f64> = (0..theta0.len())
                .map(|i| {
                    let m = beta1 * (1.0 - beta1) * g1[i] + (1.0 - beta1) * g2[i];
                    let v = beta2 * (1.0 - beta2) * g1[i] * g1[i] + (1.0 - beta2) * g2[i] * g2[i];
                    let (m_hat, v_hat) = (m / (1.0 - beta1 * beta1), v / (1.0 - beta2 * beta2));
                    theta1[i] - lr * m_hat / (v_hat.sqrt() + eps)
                })
                .collect();
            let direction = flat(&outcome.meta_gradient);
            for i in 0..theta0.len() {
                let expected = theta0[i] - theta2[i];
                assert!(
                    (direction[i] - expected).abs() <= 1e-10 * (1.0 + expected.abs()),
                    "β₁ = {beta1}, entry {i}: {} against {expected}",
                    direction[i]
                );
            }
            // Adam's steps differ from SGD's at the same rate.
            let sgd = Reptile {
                inner: InnerLoop::new(2, lr),
            }
            .meta_gradient(&engine, &params, &task, Mode::Eval)
            .unwrap();
            assert!(
                sgd.meta_gradient
                    .sub(&outcome.meta_gradient)
                    .unwrap()
                    .norm()
                    .unwrap()
                    > 1e-3
            );
        }
    }

    /// MAML differentiates through its inner steps, so an Adam rule is refused with
    /// the fix rather than ignored.
    #[test]
    fn second_order_learners_refuse_inner_adam() {
        let model = TwoLayerProbe {
            classes: 3,
            dim: 4,
            hidden: 5,
        };
        let (params, task) = (model.init_params(1).unwrap(), dense_episode(3, 4, 2, 3));
        let maml = Maml {
            inner: InnerLoop::new(1, 0.1).with_adam(0.0, 0.999),
            mode: MamlMode::Recompute,
        };
        let err = maml
            .meta_gradient(&WholeGraph::new(&model), &params, &task, Mode::Eval)
            .unwrap_err()
            .to_string();
        assert!(err.contains("meta_learning.inner.optimizer: sgd"), "{err}");
    }
}
