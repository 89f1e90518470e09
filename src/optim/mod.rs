//! Optimisers and learning-rate schedules on ParamSets, shared by the outer loop of
//! meta-training and the fine-tuning baselines.

mod optimizer;
mod schedule;

pub use optimizer::{Optimizer, OptimizerKind};
pub use schedule::Schedule;
