//! Tensors: second-order-safe operations ([`ops`]), named parameter sets
//! ([`ParamSet`]) and the switch that keeps gradients differentiable.

pub(crate) mod freed_buffers;
pub mod loss_scale;
pub mod ops;
pub mod params;
pub mod second_order;
pub mod subnormals;

pub(crate) mod gradcheck;
pub(crate) mod kernel_workspace;
#[cfg(test)]
pub(crate) mod test_support;

pub use params::{GradGraph, ParamSet};
pub use second_order::ensure_second_order;
