//! Data: batches of examples (and, in later milestones, episodes, samplers and
//! readers).

mod batch;

pub use batch::{Batch, TokenInputs};
