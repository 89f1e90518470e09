//! A configured run's objects and its unit of work: the builder from a [`Config`]
//! to model, gradient engine, learner or baseline, text encoder and outer update
//! ([`build`]), and one meta-step ([`meta_step`]: every task of a meta-batch through
//! the learner, then the outer update). Training, evaluation, profiling, benchmarks
//! and the planner all build their runs here, so a configuration means the same
//! objects everywhere.
//!
//! [`Config`]: crate::config::Config

pub mod build;
mod outer;
mod step;

pub use build::Run;
pub use outer::{average, clip_global_norm, OuterUpdate};
pub use step::{meta_step, training_mode, StepStats};
