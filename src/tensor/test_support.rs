//! Helpers shared by the unit tests.

use candle_core::{DType, Tensor};

/// Largest |a − b| over two tensors of one shape, compared in f64 (any dtype).
pub(crate) fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (
        a.to_dtype(DType::F64).unwrap(),
        b.to_dtype(DType::F64).unwrap(),
    );
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}
