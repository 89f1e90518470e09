//! What the metric learners share (ProtoNets, FS-CT, the prototype baseline): they
//! adapt by summarising the support set's embeddings (class means, the class-major
//! embeddings) into the adapted ParamSet, and train by descending a query loss
//! computed from the embeddings of support and query at θ, with no inner loop.
//!
//! Support and query are embedded in separate forward passes, as the MAML learners
//! do (and as evaluation must, which sees the support set before the queries): a
//! model that normalises with batch statistics (Conv4) takes them per set.

use candle_core::Tensor;

use super::loss::{accuracy, check_finite, finite_value};
use super::TaskOutcome;
use crate::data::{Batch, Episode};
use crate::engine::GradEngine;
use crate::nn::Mode;
use crate::tensor::{ops, GradGraph, ParamSet};
use crate::{Error, Result};

/// Means of the rows of `features` `[n, d]` of each class of `labels` (`0..classes`,
/// every class present): `[classes, d]`, differentiable (a product with the labels'
/// one-hot matrix, so exact at every order).
pub(crate) fn class_means(features: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let values = labels.to_vec1::<u32>()?;
    let classes = values.iter().max().map_or(0, |&m| m as usize + 1);
    let mut counts = vec![0f64; classes];
    for &label in &values {
        counts[label as usize] += 1.0;
    }
    if let Some(class) = counts.iter().position(|&c| c == 0.0) {
        return Err(Error::InvalidArgument(format!(
            "class {class} has no support example; a prototype needs at least one"
        )));
    }
    let one_hot = ops::one_hot(labels, classes, features.dtype())?; // [n, classes]
    let sums = one_hot.t()?.matmul(features)?;
    let counts =
        Tensor::from_vec(counts, (classes, 1), features.device())?.to_dtype(features.dtype())?;
    Ok(sums.broadcast_div(&counts)?)
}

/// Rows of `x` scaled to unit length (zero rows stay zero).
pub(crate) fn unit_rows(x: &Tensor) -> Result<Tensor> {
    let norms = x.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
    Ok(x.broadcast_div(&norms)?)
}

/// Refuses a regression batch for `method`, which classifies by class means.
fn classification_only(batch: &Batch, method: &str) -> Result<()> {
    if batch.is_regression() {
        return Err(Error::InvalidArgument(format!(
            "{method} classifies by class means; it has no answer for regression tasks"
        )));
    }
    Ok(())
}

/// `params` adapted to `support` by `method`: unchanged, with `summarise` of the
/// support set's embeddings (detached) and labels kept under `name`.
pub(crate) fn adapt_by_support(
    engine: &dyn GradEngine,
    params: &ParamSet,
    support: &Batch,
    mode: Mode,
    (method, name): (&str, &str),
    summarise: impl FnOnce(&Tensor, &Tensor) -> Result<Tensor>,
) -> Result<ParamSet> {
    classification_only(support, method)?;
    let features = engine.model().features(params, support, mode)?.detach();
    let summary = summarise(&features, &support.labels)?;
    let mut adapted = params.detach();
    adapted.set(name, summary);
    Ok(adapted)
}

/// What a metric learner's scoring gives for one task at θ.
pub(crate) struct Scored {
    /// The query's logits `[queries, classes]`.
    pub(crate) logits: Tensor,
    /// A term added to the weighted cross-entropy (a regulariser), if any.
    pub(crate) regulariser: Option<Tensor>,
}

/// One task's outcome for `method`: support and query embedded at θ, `score(θ,
/// support embeddings, query embeddings)`, and the gradient of
/// `cross_entropy_weight · CE + regulariser`; the reported query loss is the
/// cross-entropy, comparable with the other learners'.
///
/// The objective is differentiated in the embeddings and in θ's direct uses (a
/// head's parameters), and the embeddings' adjoints are pulled back through the
/// network by the engine ([`GradEngine::feature_pullback`]): the chain rule, so the
/// same gradient as one backward pass through everything, with a checkpointed
/// engine one segment graph alive at a time.
pub(crate) fn episodic_outcome(
    engine: &dyn GradEngine,
    params: &ParamSet,
    task: &Episode,
    mode: Mode,
    (method, cross_entropy_weight): (&str, f64),
    score: impl FnOnce(&ParamSet, &Tensor, &Tensor) -> Result<Scored>,
) -> Result<TaskOutcome> {
    classification_only(&task.support, method)?;
    let (support, support_pullback) = engine.feature_pullback(params, &task.support, mode)?;
    let (query, query_pullback) = engine.feature_pullback(params, &task.query, mode)?;
    // θ and both embeddings as leaves of the objective's own graph.
    let mut inputs = params.detach();
    inputs.insert(SUPPORT_EMBEDDINGS, support)?;
    inputs.insert(QUERY_EMBEDDINGS, query)?;
    let leaves = inputs.to_leaves()?;
    let theta = leaves.restricted_to(params.names())?;
    let Scored {
        logits,
        regulariser,
    } = score(
        &theta,
        leaves.require(SUPPORT_EMBEDDINGS)?,
        leaves.require(QUERY_EMBEDDINGS)?,
    )?;
    let cross_entropy = ops::cross_entropy(&logits, &task.query.labels, 0.0)?;
    let context = || format!("the {method} query loss");
    let query_loss = finite_value(&cross_entropy, &context)?;
    let objective = match regulariser {
        Some(r) => {
            ((&cross_entropy * cross_entropy_weight)? + r.to_dtype(cross_entropy.dtype())?)?
        }
        None if cross_entropy_weight == 1.0 => cross_entropy,
        None => (cross_entropy * cross_entropy_weight)?,
    };
    finite_value(&objective, &context)?;
    let correct = accuracy(&logits, &task.query.labels)?;
    let gradients = leaves.gradients(&objective, GradGraph::Detach)?;
    drop((objective, logits, theta, leaves));
    let direct = gradients.restricted_to(params.names())?;
    let support_adjoint = gradients.require(SUPPORT_EMBEDDINGS)?.clone();
    let query_adjoint = gradients.require(QUERY_EMBEDDINGS)?.clone();
    drop(gradients);
    let through_support = support_pullback(&support_adjoint)?;
    let through_query = query_pullback(&query_adjoint)?;
    let meta_gradient = direct.add(&through_support)?.add(&through_query)?;
    check_finite(&meta_gradient, &context)?;
    Ok(TaskOutcome {
        meta_gradient,
        support_losses: Vec::new(),
        query_loss,
        query_accuracy: correct,
    })
}

/// The names the embeddings take beside θ while the objective is differentiated.
const SUPPORT_EMBEDDINGS: &str = "metric.support_embeddings";
const QUERY_EMBEDDINGS: &str = "metric.query_embeddings";
