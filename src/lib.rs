//! melora: memory-efficient meta-learning of LoRA adapters and small networks.
//!
//! The crate is laid out by layer (see `DESIGN.md` in the project's shared folder):
//! [`tensor`] (second-order-safe ops and [`tensor::ParamSet`]), [`nn`] (layers such as
//! LoRA-wrapped linears), [`memory`] (exact allocation measurement), [`config`]
//! (typed YAML configuration), [`track`] (what a run writes: metrics, TensorBoard,
//! MLflow) and the command-line front end in `cli`.
//!
//! # Second-order gradients
//!
//! candle detaches gradients from their graph unless the environment variable
//! `CANDLE_GRAD_DO_NOT_DETACH=1` is set before the first backward pass of each
//! thread. A program using this library must call [`init`] at the start of `main`,
//! before it starts any thread; entry points that need second order check it with
//! [`tensor::ensure_second_order`] and fail with a clear error otherwise.

pub mod bench;
pub mod config;
pub mod data;
pub mod engine;
pub mod error;
pub mod eval;
#[cfg(test)]
mod fixtures;
mod io;
pub mod memory;
pub mod meta;
pub mod models;
pub mod nn;
pub mod optim;
pub mod plan;
pub mod report;
pub mod run;
pub mod selfcheck;
pub mod tensor;
pub mod track;
pub mod train;

#[doc(hidden)]
pub mod cli;

/// The library's unit tests run under the counting allocator, so that they can
/// check exact memory figures.
#[cfg(test)]
#[global_allocator]
static TEST_ALLOCATOR: memory::CountingAllocator = memory::CountingAllocator;

pub use error::{Error, Result};
pub use tensor::second_order::init;
