//! A few-shot task: a support set to adapt on and a query set to evaluate on.

use super::Batch;
use crate::{Error, Result};

/// An N-way K-shot task with Q queries per class.
///
/// In a classification episode the label of an example is the position of its class
/// in [`Episode::class_ids`] (0..n_way). In a regression episode (sinusoids) `n_way`
/// is 1 and the targets are in the batches' `targets` (see [`Batch::regression`]).
#[derive(Debug, Clone)]
pub struct Episode {
    /// The examples a learner adapts on.
    pub support: Batch,
    /// The examples the adapted learner is scored on.
    pub query: Batch,
    /// Number of classes in the task.
    pub n_way: usize,
    /// Support examples per class (`support.len() / n_way` when built with [`Episode::new`]).
    pub k_shot: usize,
    /// Query examples per class (`query.len() / n_way` when built with [`Episode::new`]).
    pub n_query: usize,
    /// The data set's class behind each episode label: label `j` is class `class_ids[j]`.
    /// Empty when the task has no such classes (synthetic tasks, [`Episode::new`]).
    pub class_ids: Vec<usize>,
}

impl Episode {
    /// The same episode with its support and query on `device`.
    pub fn to_device(&self, device: &candle_core::Device) -> Result<Self> {
        Ok(Self {
            support: self.support.to_device(device)?,
            query: self.query.to_device(device)?,
            class_ids: self.class_ids.clone(),
            ..*self
        })
    }

    /// An episode of `n_way` classes; both sets must be non-empty.
    pub fn new(support: Batch, query: Batch, n_way: usize) -> Result<Self> {
        let (k_shot, n_query) = (support.len() / n_way.max(1), query.len() / n_way.max(1));
        Self::with_classes(support, query, n_way, k_shot, n_query, Vec::new())
    }

    /// An episode that records its shape and the data set's classes behind its labels
    /// (`class_ids` empty, or one per class).
    pub fn with_classes(
        support: Batch,
        query: Batch,
        n_way: usize,
        k_shot: usize,
        n_query: usize,
        class_ids: Vec<usize>,
    ) -> Result<Self> {
        if support.is_empty() || query.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "an episode needs examples in both sets; got {} support and {} query examples",
                support.len(),
                query.len()
            )));
        }
        if !class_ids.is_empty() && class_ids.len() != n_way {
            return Err(Error::InvalidArgument(format!(
                "an episode of {n_way} classes was given {} class ids",
                class_ids.len()
            )));
        }
        Ok(Self {
            support,
            query,
            n_way,
            k_shot,
            n_query,
            class_ids,
        })
    }
}

/// The examples of an episode of `n_way` classes with `k_shot + n_query` examples
/// each, computed with checked arithmetic: an [`Error::InvalidArgument`] naming `what`
/// (the sampler, a synthetic family) when the sizes overflow or exceed
/// [`crate::config::MAX_EPISODE_EXAMPLES`].
pub(crate) fn episode_examples(
    what: &str,
    n_way: usize,
    k_shot: usize,
    n_query: usize,
) -> Result<usize> {
    let max = crate::config::MAX_EPISODE_EXAMPLES;
    k_shot
        .checked_add(n_query)
        .and_then(|per_class| per_class.checked_mul(n_way))
        .filter(|&n| n <= max)
        .ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{what}: n_way × (k_shot + n_query) = {n_way} × ({k_shot} + {n_query}) is too \
                 large: an episode holds at most {max} examples"
            ))
        })
}
