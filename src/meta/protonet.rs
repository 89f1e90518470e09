//! Prototypical networks (Snell et al., 2017): a task's classes are the means of
//! their support embeddings, and a query is scored by its distance to each —
//! the negative squared Euclidean distance, or a scaled cosine similarity. Episodic
//! training descends the query cross-entropy through the embedding network; there
//! is no inner loop.
//! Support and query are embedded separately ([`super::metric`]).

use candle_core::Tensor;

use super::metric::{adapt_by_support, class_means, episodic_outcome, unit_rows, Scored};
use super::{Adapter, MetaLearner, TaskOutcome};
use crate::data::{Batch, Episode};
use crate::engine::GradEngine;
use crate::nn::Mode;
use crate::tensor::ParamSet;
use crate::Result;

/// Name under which [`ProtoNet`] keeps a task's prototypes in the adapted ParamSet.
pub const PROTONET_PROTOTYPES: &str = "protonet.prototypes";

/// How a query is compared with the prototypes.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Distance {
    /// `−‖q − p‖²` (Snell et al.).
    #[default]
    SquaredEuclidean,
    /// `scale · cos(q, p)`.
    Cosine {
        /// Multiplies the cosines, so that their softmax can be confident.
        scale: f64,
    },
}

/// Prototypical networks: a query's logits are its distances to the class means of
/// the support embeddings ([`Distance`]); episodic training through the embedding
/// network, no inner loop.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProtoNet {
    /// Query-to-prototype comparison.
    pub distance: Distance,
}

impl Distance {
    /// Logits `[queries, classes]` of `queries` `[q, d]` against `prototypes` `[c, d]`.
    pub(crate) fn logits(self, queries: &Tensor, prototypes: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Distance::SquaredEuclidean => {
                // −(‖q‖² − 2 q·p + ‖p‖²), without a [q, c, d] difference tensor.
                let q2 = queries.sqr()?.sum_keepdim(1)?;
                let p2 = prototypes.sqr()?.sum_keepdim(1)?.t()?;
                let cross = queries.matmul(&prototypes.t()?)?;
                ((cross * 2.0)?.broadcast_sub(&q2)?.broadcast_sub(&p2))?
            }
            Distance::Cosine { scale } => {
                (unit_rows(queries)?.matmul(&unit_rows(prototypes)?.t()?)? * scale)?
            }
        })
    }
}

impl Adapter for ProtoNet {
    /// The task's prototypes, kept beside the (unchanged) parameters.
    fn adapt(
        &self,
        engine: &dyn GradEngine,
        params: &ParamSet,
        support: &Batch,
        mode: Mode,
    ) -> Result<ParamSet> {
        adapt_by_support(
            engine,
            params,
            support,
            mode,
            ("protonet", PROTONET_PROTOTYPES),
            class_means,
        )
    }

    fn predict(
        &self,
        engine: &dyn GradEngine,
        adapted: &ParamSet,
        batch: &Batch,
        mode: Mode,
    ) -> Result<Tensor> {
        let prototypes = adapted.require(PROTONET_PROTOTYPES)?;
        let features = engine.model().features(adapted, batch, mode)?;
        self.distance.logits(&features, prototypes)
    }
}

impl MetaLearner for ProtoNet {
    fn meta_gradient(
        &self,
        engine: &dyn GradEngine,
        params: &ParamSet,
        task: &Episode,
        mode: Mode,
    ) -> Result<TaskOutcome> {
        episodic_outcome(
            engine,
            params,
            task,
            mode,
            ("protonet", 1.0),
            |_, support, query| {
                let prototypes = class_means(support, &task.support.labels)?;
                Ok(Scored {
                    logits: self.distance.logits(query, &prototypes)?,
                    regulariser: None,
                })
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::EpisodeSource;
    use crate::engine::WholeGraph;
    use crate::meta::loss::accuracy;
    use crate::meta::test_models::{dense_episode, TwoLayerProbe};
    use crate::models::FewShotModel;
    use crate::tensor::gradcheck::{
        check_derivatives, random_tensor, FIRST_ORDER_TOLERANCE, SECOND_ORDER_TOLERANCE,
    };
    use crate::tensor::ops;
    use candle_core::{DType, Device};

    const DISTANCES: [Distance; 2] = [Distance::SquaredEuclidean, Distance::Cosine { scale: 3.0 }];

    /// Class means and both scores against their definitions, entry by entry.
    #[test]
    fn prototypes_are_class_means_and_logits_their_distances() {
        let dev = Device::Cpu;
        let features = random_tensor(&[6, 3], 1, &dev).unwrap();
        let labels = Tensor::new(&[1u32, 0, 2, 1, 0, 2], &dev).unwrap();
        let means = class_means(&features, &labels)
            .unwrap()
            .to_vec2::<f64>()
            .unwrap();
        let f = features.to_vec2::<f64>().unwrap();
        for (class, rows) in [(0, [1, 4]), (1, [0, 3]), (2, [2, 5])] {
            for j in 0..3 {
                let mean = (f[rows[0]][j] + f[rows[1]][j]) / 2.0;
                assert!((means[class][j] - mean).abs() < 1e-15);
            }
        }
        let queries = random_tensor(&[2, 3], 2, &dev).unwrap();
        let q = queries.to_vec2::<f64>().unwrap();
        let prototypes = Tensor::new(means.clone(), &dev).unwrap();
        let euclid = Distance::SquaredEuclidean
            .logits(&queries, &prototypes)
            .unwrap()
            .to_vec2::<f64>()
            .unwrap();
        let cosine = Distance::Cosine { scale: 3.0 }
            .logits(&queries, &prototypes)
            .unwrap()
            .to_vec2::<f64>()
            .unwrap();
        let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
        for i in 0..2 {
            for c in 0..3 {
                let d2: f64 = (0..3).map(|j| (q[i][j] - means[c][j]).powi(2)).sum();
                assert!((euclid[i][c] + d2).abs() < 1e-12);
                let dot: f64 = (0..3).map(|j| q[i][j] * means[c][j]).sum();
                let cos = dot / (norm(&q[i]) * norm(&means[c]));
                assert!((cosine[i][c] - 3.0 * cos).abs() < 1e-12);
            }
        }
        let missing = Tensor::new(&[0u32, 2, 0, 2, 0, 2], &dev).unwrap();
        let err = class_means(&features, &missing).unwrap_err().to_string();
        assert!(err.contains("class 1 has no support example"), "{err}");
    }

    /// The prototypes' logits as a function of the embedding weights: first
    /// derivatives and a Hessian-vector product against central differences.
    #[test]
    fn prototype_logits_are_exact_to_second_order() {
        let task = dense_episode(3, 4, 2, 5);
        let (xs, xq) = (
            task.support.dense().unwrap().clone(),
            task.query.dense().unwrap().clone(),
        );
        let labels = task.support.labels.clone();
        for distance in DISTANCES {
            let w = random_tensor(&[5, 4], 9, &Device::Cpu).unwrap();
            let errors = check_derivatives(&[w], |t| {
                let embed = |x: &Tensor| x.matmul(&t[0].t()?)?.tanh();
                let prototypes =
                    class_means(&embed(&xs)?, &labels).map_err(candle_core::Error::wrap)?;
                distance
                    .logits(&embed(&xq)?, &prototypes)
                    .map_err(candle_core::Error::wrap)
            })
            .unwrap();
            assert!(
                errors.first_order < FIRST_ORDER_TOLERANCE,
                "{distance:?} {errors:?}"
            );
            assert!(
                errors.second_order < SECOND_ORDER_TOLERANCE,
                "{distance:?} {errors:?}"
            );
        }
    }

    /// The learner's meta-gradient is the gradient of its own query loss
    /// (central differences on every entry), and adapting then predicting scores the
    /// queries as the meta-gradient's forward pass did.
    #[test]
    fn meta_gradient_is_the_query_loss_gradient() {
        let model = TwoLayerProbe {
            classes: 3,
            dim: 4,
            hidden: 5,
        };
        let engine = WholeGraph::new(&model);
        let params = model.init_params(3).unwrap();
        let task = dense_episode(3, 4, 2, 11);
        for distance in DISTANCES {
            let learner = ProtoNet { distance };
            let outcome = learner
                .meta_gradient(&engine, &params, &task, Mode::Eval)
                .unwrap();
            assert!(outcome.support_losses.is_empty());
            let w1 = params
                .require("w1")
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            let g = outcome.meta_gradient.require("w1").unwrap();
            let g = g.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let loss_at = |moved: Vec<f64>| {
                let mut p = params.clone();
                p.set("w1", Tensor::from_vec(moved, (5, 4), &Device::Cpu).unwrap());
                learner
                    .meta_gradient(&engine, &p, &task, Mode::Eval)
                    .unwrap()
                    .query_loss
            };
            let h = 1e-6;
            for j in 0..w1.len() {
                let (mut up, mut down) = (w1.clone(), w1.clone());
                up[j] += h;
                down[j] -= h;
                let numeric = (loss_at(up) - loss_at(down)) / (2.0 * h);
                assert!(
                    (numeric - g[j]).abs() < 1e-7 * (1.0 + numeric.abs()),
                    "{distance:?} entry {j}: {numeric} vs {}",
                    g[j]
                );
            }
            // The head is not part of the embedding: no gradient reaches it.
            let head = outcome.meta_gradient.require("w2").unwrap();
            assert_eq!(
                head.abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap(),
                0.0
            );

            let adapted = learner
                .adapt(&engine, &params, &task.support, Mode::Eval)
                .unwrap();
            let logits = learner
                .predict(&engine, &adapted, &task.query, Mode::Eval)
                .unwrap();
            let loss = ops::cross_entropy(&logits, &task.query.labels, 0.0).unwrap();
            let loss = loss.to_scalar::<f64>().unwrap();
            assert!((loss - outcome.query_loss).abs() < 1e-12);
            assert!(
                (accuracy(&logits, &task.query.labels).unwrap() - outcome.query_accuracy).abs()
                    < 1e-12
            );
        }
    }

    /// Regression tasks have no classes to make prototypes of.
    #[test]
    fn regression_tasks_are_refused() {
        let model = crate::models::mlp::Mlp::new(1, &[4], 1, DType::F64, &Device::Cpu).unwrap();
        let engine = WholeGraph::new(&model);
        let params = model.init_params(1).unwrap();
        let task = crate::data::SinusoidTasks {
            k_shot: 5,
            n_query: 5,
            seed: 1,
        }
        .episode(0)
        .unwrap();
        let err = ProtoNet::default()
            .meta_gradient(&engine, &params, &task, Mode::Eval)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no answer for regression"), "{err}");
    }
}
