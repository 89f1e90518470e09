//! Meta-training machinery: the outer update (average the tasks' meta-gradients,
//! clip by global norm, step an optimiser along a learning-rate schedule) and the
//! meta-step that feeds it.

mod outer;
mod step;

pub use outer::{average, clip_global_norm, OuterUpdate};
pub use step::{meta_step, StepStats};
