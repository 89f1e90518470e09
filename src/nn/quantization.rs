//! How frozen matrices are stored.

/// Storage of the frozen base's matrices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Quantization {
    /// Dense, in the frozen dtype.
    #[default]
    None,
    /// Linear weights and token-embedding tables in int8 with one f32 scale per output
    /// channel (per row for tables), dequantized one layer at a time; biases, norms,
    /// position tables stay dense in the frozen dtype.
    Int8,
}
