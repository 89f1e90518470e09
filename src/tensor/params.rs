//! Named parameter sets (filled in below).

/// An ordered set of named trainable tensors.
#[derive(Debug, Clone, Default)]
pub struct ParamSet;
