//! Data: batches of examples (and, in later milestones, episodes, samplers and
//! readers).

mod batch;
mod tokenize;

pub use batch::{Batch, TokenInputs};
pub use tokenize::TextTokenizer;
