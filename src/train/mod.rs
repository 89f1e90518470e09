//! Meta-training machinery: the outer update (average the tasks' meta-gradients,
//! clip by global norm, step an optimiser along a learning-rate schedule).

mod optimizer;
mod outer;
mod schedule;

pub use optimizer::{Optimizer, OptimizerKind};
pub use outer::{average, clip_global_norm, OuterUpdate};
pub use schedule::Schedule;
