//! A few-shot task: a support set to adapt on and a query set to evaluate on.

use super::Batch;
use crate::{Error, Result};

/// An N-way K-shot task with Q queries per class.
#[derive(Debug, Clone)]
pub struct Episode {
    /// The examples a learner adapts on.
    pub support: Batch,
    /// The examples the adapted learner is scored on.
    pub query: Batch,
    /// Number of classes in the task.
    pub n_way: usize,
}

impl Episode {
    /// An episode of `n_way` classes; both sets must be non-empty.
    pub fn new(support: Batch, query: Batch, n_way: usize) -> Result<Self> {
        if support.is_empty() || query.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "an episode needs examples in both sets; got {} support and {} query examples",
                support.len(),
                query.len()
            )));
        }
        Ok(Self {
            support,
            query,
            n_way,
        })
    }
}
