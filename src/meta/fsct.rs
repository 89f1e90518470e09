//! The Few-Shot Cosine Transformer as a meta-learner: the backbone embeds a task's
//! support and query examples, the FS-CT head ([`crate::models::fsct`]) scores the
//! queries against the support set, and episodic training descends
//! `λ_I·CE + λ_V·L_V + λ_C·L_C` (VIC on the support embeddings, Bardes et al. as
//! the reference project's fork applies it) through the head and the backbone. There
//! is no inner loop: adapting to a task is embedding its support set.
//!
//! The head's prototype weights are per class and shot, so every task must have
//! exactly the configured `n_way` classes of `k_shot` support examples each.

use candle_core::Tensor;

use super::metric::{adapt_by_support, episodic_outcome, Scored};
use super::{Adapter, MetaLearner, TaskOutcome};
use crate::data::{Batch, Episode};
use crate::engine::GradEngine;
use crate::models::fsct::{Fsct, FsctConfig};
use crate::nn::Mode;
use crate::tensor::{ops, ParamSet};
use crate::{Error, Result};

/// Name under which [`FsctLearner`] keeps a task's support embeddings
/// `[classes, shots, dim]` in the adapted ParamSet.
pub const FSCT_SUPPORT: &str = "fsct.support_embeddings";

/// Prefix of the head's parameters beside the backbone's.
pub const FSCT_PREFIX: &str = "fsct.";

/// Weights of the training loss's terms.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VicWeights {
    /// Of the query cross-entropy (λ_I).
    pub cross_entropy: f64,
    /// Of the variance hinge on the support embeddings (λ_V).
    pub variance: f64,
    /// Of their off-diagonal covariance (λ_C).
    pub covariance: f64,
}

impl Default for VicWeights {
    /// The reference fork's: 1, 1, 0.04.
    fn default() -> Self {
        Self {
            cross_entropy: 1.0,
            variance: 1.0,
            covariance: 0.04,
        }
    }
}

/// VIC's hinge on the spread (σ below it is penalised) and the covariance's guard.
const VARIANCE_THRESHOLD: f64 = 1.0;
const COVARIANCE_EPS: f64 = 1e-4;

/// The Few-Shot Cosine Transformer as a meta-learner: the backbone embeds support
/// and query, the FS-CT head scores the queries, and episodic training descends
/// `λ_I·CE + λ_V·L_V + λ_C·L_C` (VIC on the support embeddings) through head and
/// backbone; no inner loop. Tasks need `k_shot` support examples of each class.
#[derive(Debug, Clone)]
pub struct FsctLearner {
    /// The head's sizes and variant; its width `dim` is the backbone's embedding
    /// width, read from the head's parameters (named with [`FSCT_PREFIX`]).
    pub head: FsctConfig,
    /// The loss's weights.
    pub weights: VicWeights,
}

/// The parameter whose length is the head's width (its feed-forward layer norm's γ).
const WIDTH_PARAMETER: &str = "fsct.FFN.0.weight";

impl FsctLearner {
    /// Adds the head's parameters, as the reference project initialises them, to a
    /// backbone's `params`, whose head (`classifier.weight` `[classes, features]`)
    /// gives the embedding width.
    pub fn init_head(&self, params: &mut ParamSet, seed: u64) -> Result<()> {
        let head = params.require(crate::models::HEAD_WEIGHT).map_err(|_| {
            Error::InvalidArgument(
                "fsct needs a backbone with a classification head to read its embedding \
                 width from (`classifier.weight`)"
                    .into(),
            )
        })?;
        let (dim, dtype, device) = (head.dim(1)?, head.dtype(), head.device().clone());
        Fsct::new(FsctConfig { dim, ..self.head })?
            .with_prefix(FSCT_PREFIX)
            .init_params(seed, dtype, &device, params)
    }

    /// The head at `params`' width.
    fn head_at(&self, params: &ParamSet) -> Result<Fsct> {
        let dim = params.require(WIDTH_PARAMETER)?.dims1()?;
        Ok(Fsct::new(FsctConfig { dim, ..self.head })?.with_prefix(FSCT_PREFIX))
    }

    /// The support embeddings `[n, dim]` arranged class-major `[classes, shots, dim]`
    /// by their labels, in each class's order.
    fn class_major(&self, features: &Tensor, labels: &Tensor) -> Result<Tensor> {
        let (ways, shots) = (self.head.n_way, self.head.k_shot);
        let labels = labels.to_vec1::<u32>()?;
        let mut rows = Vec::with_capacity(labels.len());
        for class in 0..ways as u32 {
            let of_class: Vec<u32> = (0u32..)
                .zip(&labels)
                .filter(|(_, &l)| l == class)
                .map(|(i, _)| i)
                .collect();
            if of_class.len() != shots {
                return Err(Error::InvalidArgument(format!(
                    "fsct weighs each class's shots with its own prototype weights, so a \
                     support set needs {shots} examples (data.k_shot) of each of {ways} \
                     classes (data.n_way); class {class} has {}",
                    of_class.len()
                )));
            }
            rows.extend(of_class);
        }
        if rows.len() != labels.len() {
            return Err(Error::InvalidArgument(format!(
                "the support set has labels outside the {ways} classes of data.n_way"
            )));
        }
        let dim = features.dim(1)?;
        let index = Tensor::from_vec(rows, labels.len(), features.device())?;
        Ok(features
            .index_select(&index, 0)?
            .reshape((ways, shots, dim))?)
    }
}

impl Adapter for FsctLearner {
    /// The task's support embeddings, kept beside the (unchanged) parameters.
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
            ("fsct", FSCT_SUPPORT),
            |features, labels| self.class_major(features, labels),
        )
    }

    fn predict(
        &self,
        engine: &dyn GradEngine,
        adapted: &ParamSet,
        batch: &Batch,
        mode: Mode,
    ) -> Result<Tensor> {
        let support = adapted.require(FSCT_SUPPORT)?;
        let query = engine.model().features(adapted, batch, mode)?;
        self.head_at(adapted)?.logits(adapted, support, &query)
    }
}

impl MetaLearner for FsctLearner {
    fn meta_gradient(
        &self,
        engine: &dyn GradEngine,
        params: &ParamSet,
        task: &Episode,
        mode: Mode,
    ) -> Result<TaskOutcome> {
        let w = self.weights;
        episodic_outcome(
            engine,
            params,
            task,
            mode,
            ("fsct", w.cross_entropy),
            |leaves, support, query| {
                let support = self.class_major(support, &task.support.labels)?;
                Ok(Scored {
                    logits: self.head_at(leaves)?.logits(leaves, &support, query)?,
                    regulariser: Some(ops::vic_regulariser(
                        &support,
                        w.variance,
                        w.covariance,
                        VARIANCE_THRESHOLD,
                        COVARIANCE_EPS,
                    )?),
                })
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::WholeGraph;
    use crate::meta::test_models::{dense_episode, TwoLayerProbe};
    use crate::models::fsct::FsctAttention;
    use crate::models::FewShotModel;
    use crate::tensor::GradGraph;
    use candle_core::{DType, Device};

    fn learner(attention: FsctAttention, weights: VicWeights) -> FsctLearner {
        FsctLearner {
            head: FsctConfig {
                heads: 2,
                dim_head: 3,
                mlp_dim: 4,
                attention,
                ..FsctConfig::new(1, 3, 2)
            },
            weights,
        }
    }

    /// A two-layer backbone (embedding width 5) with the head's parameters beside it.
    fn setup(l: &FsctLearner) -> (TwoLayerProbe, ParamSet) {
        let model = TwoLayerProbe {
            classes: 3,
            dim: 4,
            hidden: 5,
        };
        let mut params = model.init_params(3).unwrap();
        Fsct::new(FsctConfig { dim: 5, ..l.head })
            .unwrap()
            .with_prefix(FSCT_PREFIX)
            .init_params(8, DType::F64, &Device::Cpu, &mut params)
            .unwrap();
        (model, params)
    }

    /// Without VIC the meta-gradient is the gradient of the query cross-entropy
    /// (central differences on every backbone entry, both attentions); VIC adds the
    /// gradient of its terms on the class-major support embeddings; adapting then
    /// predicting scores the queries as training's forward pass did.
    #[test]
    fn meta_gradient_is_the_gradient_of_the_loss() {
        let task = dense_episode(3, 4, 2, 21);
        let plain = VicWeights {
            cross_entropy: 1.0,
            variance: 0.0,
            covariance: 0.0,
        };
        for attention in [FsctAttention::Cosine, FsctAttention::Softmax] {
            let l = learner(attention, plain);
            let (model, params) = setup(&l);
            let engine = WholeGraph::new(&model);
            let outcome = l
                .meta_gradient(&engine, &params, &task, Mode::Eval)
                .unwrap();
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let w1 = flat(params.require("w1").unwrap());
            let g = flat(outcome.meta_gradient.require("w1").unwrap());
            let loss_at = |moved: Vec<f64>| {
                let mut p = params.clone();
                p.set("w1", Tensor::from_vec(moved, (5, 4), &Device::Cpu).unwrap());
                l.meta_gradient(&engine, &p, &task, Mode::Eval)
                    .unwrap()
                    .query_loss
            };
            for j in 0..w1.len() {
                let (mut up, mut down) = (w1.clone(), w1.clone());
                up[j] += 1e-6;
                down[j] -= 1e-6;
                let numeric = (loss_at(up) - loss_at(down)) / 2e-6;
                assert!(
                    (numeric - g[j]).abs() < 1e-7 * (1.0 + numeric.abs()),
                    "{attention:?} entry {j}: {numeric} vs {}",
                    g[j]
                );
            }
            assert!(
                outcome
                    .meta_gradient
                    .require("fsct.proto_weight")
                    .unwrap()
                    .abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
                    > 0.0
            );

            // VIC's part of the meta-gradient is the gradient of its terms.
            let with_vic = learner(attention, VicWeights::default());
            let vic_outcome = with_vic
                .meta_gradient(&engine, &params, &task, Mode::Eval)
                .unwrap();
            let leaves = params.to_leaves().unwrap();
            let support = model.features(&leaves, &task.support, Mode::Eval).unwrap();
            let support = l.class_major(&support, &task.support.labels).unwrap();
            let vic = ops::vic_regulariser(&support, 1.0, 0.04, 1.0, 1e-4).unwrap();
            let vic_grad = leaves.gradients(&vic, GradGraph::Detach).unwrap();
            let difference = vic_outcome
                .meta_gradient
                .sub(&outcome.meta_gradient)
                .unwrap()
                .sub(&vic_grad)
                .unwrap();
            assert!(difference.norm().unwrap() < 1e-12, "{attention:?}");

            let adapted = l
                .adapt(&engine, &params, &task.support, Mode::Eval)
                .unwrap();
            let logits = l
                .predict(&engine, &adapted, &task.query, Mode::Eval)
                .unwrap();
            let ce = ops::cross_entropy(&logits, &task.query.labels, 0.0).unwrap();
            assert!((ce.to_scalar::<f64>().unwrap() - outcome.query_loss).abs() < 1e-12);
        }
    }

    /// Support sets of another shape than the head's prototype weights are refused
    /// with the counts named.
    #[test]
    fn support_sets_need_k_shots_of_every_class() {
        let l = learner(FsctAttention::Cosine, VicWeights::default());
        let (model, params) = setup(&l);
        let engine = WholeGraph::new(&model);
        let task = dense_episode(3, 4, 3, 2);
        let err = l
            .adapt(&engine, &params, &task.support, Mode::Eval)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("needs 2 examples (data.k_shot)") && err.contains("class 0 has 3"),
            "{err}"
        );
        let mut no_head = ParamSet::new();
        no_head
            .insert(
                "w",
                Tensor::zeros((2, 2), DType::F64, &Device::Cpu).unwrap(),
            )
            .unwrap();
        let err = l.init_head(&mut no_head, 1).unwrap_err().to_string();
        assert!(err.contains("classifier.weight"), "{err}");
    }
}
