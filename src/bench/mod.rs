//! Benchmarks behind `melora bench`: what they measure and how they write it.
//!
//! - [`memory`]: peak memory and time of a meta-iteration for every method against the
//!   inner steps K, gradient checkpointing and precision (`melora bench memory`).
//! - [`speed`]: seconds per meta-iteration of melora and of PyTorch + peft on the same
//!   episodes (`melora bench speed`).
//! - [`fsct_memory`]: the FS-CT reference project's memory scenario on ResNets
//!   (`melora bench fsct-memory`).
//! - [`machine`]: what a benchmark records about the machine it ran on, and when.

pub mod fsct_memory;
pub mod machine;
pub mod memory;
pub mod speed;
