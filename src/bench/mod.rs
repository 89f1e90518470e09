//! Benchmarks behind `melora bench`: what they measure and how they write it.
//!
//! - [`memory`]: peak memory and time of a meta-iteration for every method against the
//!   inner steps K, gradient checkpointing and precision (`melora bench memory`).
//! - [`machine`]: what a benchmark records about the machine it ran on, and when.

pub mod machine;
pub mod memory;
