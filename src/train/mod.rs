//! Meta-training machinery: the outer update (average the tasks' meta-gradients,
//! clip by global norm, step an optimiser along a learning-rate schedule) and the
//! meta-step that feeds it.

pub mod build;
pub mod checkpoint;
mod outer;
mod run;
mod step;

pub use outer::{average, clip_global_norm, OuterUpdate};
pub use run::{params_from, run_dir, train, TrainOptions, TrainSummary};
pub use step::{meta_step, StepStats};
