//! Evaluation: scoring on fixed test episodes, and statistics for comparing methods
//! across episodes and seeds.

mod episodes;
pub mod stats;

pub use episodes::{evaluate_episodes, EpisodeScore, Evaluation, IntervalRecord};
