//! Data: batches of examples (and, in later milestones, episodes, samplers and
//! readers).

mod batch;
mod episode;
mod tokenize;

pub use batch::{Batch, Inputs, TokenInputs};
pub use episode::Episode;
pub use tokenize::TextTokenizer;
