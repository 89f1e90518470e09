//! Evaluation: statistics for comparing methods across episodes and seeds.

pub mod stats;
