//! Optimisers and learning-rate schedules on ParamSets, shared by the outer loop of
//! meta-training and the fine-tuning baselines.

mod loss_scale;
mod optimizer;
mod schedule;

pub use loss_scale::{LossScaler, MAX_LOSS_SCALE, MIN_LOSS_SCALE};
pub use optimizer::{Optimizer, OptimizerKind};
pub use schedule::Schedule;
