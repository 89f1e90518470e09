//! Second-order-safe tensor operations.
//!
//! Every function here is built only from candle primitives whose backward pass is
//! exact and itself differentiable (matmul, element-wise arithmetic, `exp`, `log`,
//! `erf`, `tanh`, sums, `where_cond`, `index_select`, reshapes), so a gradient taken
//! with the graph kept can be differentiated again (MAML, Hessian-vector products).
//!
//! Several candle and candle-nn operations are deliberately *not* used (see
//! `DESIGN.md`): `softmax_last_dim` and the fused layer/RMS norms return no gradient,
//! `gather` (and so candle-nn's `cross_entropy`/`nll`) fails at second order,
//! `max_pool2d`'s gradient is scaled wrongly, and the built-in `gelu`/`gelu_erf`
//! back-propagate with rounded constants that are not exact in f64. A test
//! (`tests/banned_ops.rs`) keeps them out of the source tree.
//!
//! Each op has a test of its first derivative and Hessian-vector product against
//! central finite differences in f64 (`tensor::gradcheck`).

mod activation;
mod composite;
mod conv;
mod dropout;
mod embedding;
mod fast_math;
mod frozen_linear;
mod fused_norm;
mod fused_softmax;
mod heads;
mod linear;
mod loss;
pub mod norm;
mod pointwise;
mod pooling;
mod quantized;
mod recompute;
mod rows;
mod softmax;
mod vic;

pub use activation::{gelu_erf, gelu_tanh, leaky_relu, relu, sigmoid, silu};
pub use conv::{conv2d, conv2d_strided, global_avg_pool, max_pool, max_pool_strided};
pub(crate) use dropout::mix_seed;
pub use dropout::{dropout, Mode};
pub use embedding::embedding;
pub(crate) use frozen_linear::{
    frozen_linear_matrix, frozen_linear_matrix_transposed, FrozenMatrix, Stored,
};
pub(crate) use fused_softmax::scaled_softmax_backward;
pub(crate) use heads::HeadLayout;
pub use linear::{frozen_linear, frozen_linear_in_out, linear, linear_in_out, matmul};
pub use loss::{cross_entropy, cross_entropy_one_hot, mse, one_hot};
pub(crate) use pointwise::{pointwise_derivative, Pointwise};
pub use pooling::{last_token, masked_mean_pool};
pub(crate) use quantized::{int8_embedding, Int8Matrix};
pub(crate) use recompute::Recomputed;
pub(crate) use softmax::scaled_masked_softmax;
pub use softmax::{log_softmax, masked_softmax, softmax};
pub use vic::{vic_covariance, vic_covariance_matrix, vic_regulariser, vic_std, vic_variance};
