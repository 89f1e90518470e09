//! Meta-training machinery: the outer update (average the tasks' meta-gradients,
//! clip by global norm, step an optimiser along a learning-rate schedule).

mod outer;

pub use outer::{average, clip_global_norm, OuterUpdate};
