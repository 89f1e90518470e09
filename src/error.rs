//! The library's error type: every failure names what went wrong and, where a
//! user can act on it, how to fix it.

use std::path::PathBuf;

/// Errors returned by the melora library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed inside candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// A configuration value is invalid.
    #[error("config: `{key}`: {message}")]
    Config {
        /// Dotted path of the offending key, e.g. `lora.rank`.
        key: String,
        /// What is wrong and what is allowed.
        message: String,
    },

    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },

    /// A file was read but its contents are malformed.
    #[error("{}: {message}", path.display())]
    Format {
        /// The file concerned.
        path: PathBuf,
        /// What is malformed.
        message: String,
    },

    /// Tensor shapes or names do not fit together.
    #[error("shape mismatch: {0}")]
    Shape(String),

    /// Two parameter sets (or a parameter set and a file) disagree on names or shapes.
    #[error("parameter set mismatch: {0}")]
    Params(String),

    /// A model cannot be built: unknown architecture, missing or mis-shaped weight, LoRA
    /// target that matches no module.
    #[error("model: {0}")]
    Model(String),

    /// A loss or gradient became NaN or infinite; the message names the task and step.
    #[error("non-finite value: {0}")]
    NonFinite(String),

    /// An argument is outside its allowed range.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// A plot or report could not be drawn (the message names the plot).
    #[error("report: {0}")]
    Report(String),

    /// Nothing fits the memory budget (before a run), or a meta-step went above it
    /// with no smaller micro-batch left (during one).
    #[error("memory budget: {0}")]
    MemoryBudget(String),

    /// A meta-step's heap went above the memory budget; the step was abandoned before
    /// any state changed, to be redone with a smaller micro-batch.
    #[error("the meta-step's heap went above the memory budget of {budget} bytes")]
    OverBudget {
        /// The budget, in bytes.
        budget: u64,
    },

    /// An error with where it happened (an iteration, a test episode): its kind is
    /// the source's, which [`Error::kind`] gives.
    #[error("{context}: {source}")]
    Context {
        /// Where, e.g. `iteration 12`.
        context: String,
        /// What went wrong there.
        #[source]
        source: Box<Error>,
    },
    /// Second-order differentiation is not available on this thread.
    #[error("second-order gradients are disabled: {0}")]
    SecondOrder(String),
}

/// Result with the library's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// This error with where it happened, e.g. `err.context("iteration 3")`; its kind
    /// stays the same ([`Error::kind`]).
    pub fn context(self, context: impl Into<String>) -> Self {
        Error::Context {
            context: context.into(),
            source: Box::new(self),
        }
    }

    /// The error itself, below any [`Error::Context`]: what kind of failure it is.
    pub fn kind(&self) -> &Error {
        match self {
            Error::Context { source, .. } => source.kind(),
            other => other,
        }
    }

    /// Whether this is a GPU running out of memory (CUDA's `CUDA_ERROR_OUT_OF_MEMORY`,
    /// from an allocation inside candle): the step that hit it can be redone with
    /// less memory, as one above the host budget ([`Error::OverBudget`]) is.
    pub fn is_device_out_of_memory(&self) -> bool {
        match self.kind() {
            Error::Candle(e) => e.to_string().contains("CUDA_ERROR_OUT_OF_MEMORY"),
            _ => false,
        }
    }

    /// An [`Error::Io`] for `path`.
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CUDA allocation failure, as cudarc reports it through candle, is recognised
    /// also under context; other errors, and the host budget, are not.
    #[test]
    fn device_out_of_memory_is_recognised_under_context() {
        let oom = Error::Candle(candle_core::Error::Msg(
            "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")".into(),
        ));
        assert!(oom.is_device_out_of_memory());
        assert!(oom
            .context("task 2 of the meta-batch")
            .is_device_out_of_memory());
        let other = Error::Candle(candle_core::Error::Msg("shape mismatch".into()));
        assert!(!other.is_device_out_of_memory());
        assert!(!Error::OverBudget { budget: 1 }.is_device_out_of_memory());
        assert!(!Error::NonFinite("out of memory".into()).is_device_out_of_memory());
    }
}
