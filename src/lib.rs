//! melora: memory-efficient meta-learning of LoRA adapters and small networks.
//!
//! Meta-learning evaluates one model at many parameter values (the shared
//! initialisation θ₀ and its adaptations θ₁ … θ_K), so models here are *functional*:
//! a [`FewShotModel`](models::FewShotModel) holds its frozen base and computes outputs
//! at whatever [`ParamSet`](tensor::ParamSet) it is given. A
//! [`MetaLearner`](meta::MetaLearner) turns one task into a meta-gradient through a
//! [`GradEngine`](engine::GradEngine), which is the one place derivatives are taken.
//! Most programs need only the [`prelude`].
//!
//! # A first program
//!
//! Second-order MAML of a small MLP on sinusoid regression tasks, a few meta-steps:
//!
//! ```
//! use melora::prelude::*;
//!
//! melora::init(); // first thing: second-order gradients depend on it
//! let model = Mlp::new(1, &[16, 16], 1, DType::F32, &Device::Cpu)?;
//! let engine = WholeGraph::new(&model);
//! let maml = Maml { inner: InnerLoop::new(1, 0.01), mode: MamlMode::Recompute };
//! let tasks = SinusoidTasks { k_shot: 10, n_query: 10, seed: 0 };
//! let mut params = model.init_params(0)?;
//! let mut outer = Optimizer::new(OptimizerKind::adamw(0.0));
//! for step in 0..3 {
//!     let task = tasks.episode(step)?;
//!     let outcome = maml.meta_gradient(&engine, &params, &task, Mode::Eval)?;
//!     assert!(outcome.query_loss.is_finite());
//!     params = outer.step(&params, &outcome.meta_gradient, 1e-3)?;
//! }
//! // Adapt the meta-trained initialisation to a new task's support set.
//! let task = tasks.episode(1_000)?;
//! let adapted = maml.adapt(&engine, &params, &task.support, Mode::Eval)?;
//! assert_eq!(adapted.len(), params.len());
//! # Ok::<(), melora::Error>(())
//! ```
//!
//! `examples/` holds longer programs: `maml_sinusoid.rs`, `lora_bert_maml.rs` (LoRA
//! adapters of a BERT encoder) and `custom_loss.rs` (meta-learning a loss of one's
//! own).
//!
//! # The layers
//!
//! The crate is laid out by layer, from the bottom up; a layer imports only the
//! layers below it (a test checks it, and `DESIGN.md` in the project's shared folder
//! explains why):
//!
//! 1. [`tensor`]: operations whose backward passes are themselves differentiable
//!    (so second derivatives are exact), and [`ParamSet`](tensor::ParamSet), the
//!    ordered named tensors a learner moves around, with their vector-space
//!    arithmetic and safetensors files.
//! 2. [`memory`]: exact heap measurement through a counting allocator
//!    ([`MemoryMeter`](memory::MemoryMeter)), process memory and budgets; it only
//!    measures.
//! 3. [`track`]: what a run writes (JSONL metrics, TensorBoard, MLflow).
//! 4. [`nn`] and [`optim`]: LoRA-wrapped linear layers and PEFT adapter files; SGD
//!    and AdamW on ParamSets, schedules, loss scaling.
//! 5. [`config`]: the typed YAML [`Config`](config::Config), every key defaulted and
//!    validated with an error naming the key.
//! 6. [`data`]: [`Batch`](data::Batch)es and [`Episode`](data::Episode)s (support
//!    and query sets), samplers, synthetic task families, readers of real data sets.
//! 7. [`models`]: [`FewShotModel`](models::FewShotModel)s (BERT/MiniLM, DistilBERT,
//!    GPT-2, the T5 encoder, Conv4, an MLP) with their heads and Hugging Face
//!    loading; built-in tiny models need no download
//!    ([`models::load::builtin`]).
//! 8. [`engine`]: gradients, Hessian-vector, block and Gauss-Newton products of a
//!    [`Loss`](engine::Loss) of a model's outputs, on one graph
//!    ([`WholeGraph`](engine::WholeGraph)), by checkpointed segments
//!    ([`Checkpointed`](engine::Checkpointed)) or over micro-batches
//!    ([`MicroBatched`](engine::MicroBatched)); the loss is the engine's parameter.
//! 9. [`meta`]: the learners, written against the engine: [`Maml`](meta::Maml)
//!    (full graph or recompute, the same numbers), [`MetaSgd`](meta::MetaSgd),
//!    [`Fomaml`](meta::Fomaml), [`Reptile`](meta::Reptile),
//!    [`Melora`](meta::Melora) (an approximate Hessian), and fine-tuning baselines.
//! 10. [`eval`]: adapting and scoring on fixed test episodes, with confidence
//!     intervals and paired statistics.
//! 11. [`run`]: one place from a `Config` to a run's objects, and one meta-step.
//! 12. [`plan`]: the memory planner (what fits a budget, before running).
//! 13. [`train`]: the training loop, checkpoints and resume, evaluation, `full`
//!     comparisons, adaptation of a saved checkpoint.
//! 14. [`report`]: plots and the Markdown/HTML report.
//!
//! Above them sit the `melora` program's benchmarks, derivative self-checks and
//! command line, which are not part of the library's interface.
//!
//! # Second-order gradients
//!
//! candle detaches gradients from their graph unless the environment variable
//! `CANDLE_GRAD_DO_NOT_DETACH=1` is set before the first backward pass of each
//! thread. A program using this library must call [`init`] at the start of `main`,
//! before it starts any thread; entry points that need second order check it with
//! [`tensor::ensure_second_order`] and fail with a clear error otherwise.

mod bench;
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
mod selfcheck;
pub mod tensor;
pub mod track;
pub mod train;

mod cli;

/// The library's unit tests run under the counting allocator, so that they can
/// check exact memory figures.
#[cfg(test)]
#[global_allocator]
static TEST_ALLOCATOR: memory::CountingAllocator = memory::CountingAllocator;

pub use error::{Error, Result};
pub use tensor::second_order::init;

pub mod prelude {
    //! What a program that meta-learns with melora needs, in one import:
    //! `use melora::prelude::*;`.
    //!
    //! Parameters and models ([`ParamSet`], [`FewShotModel`], the built-in [`Mlp`]
    //! and [`builtin`] tiny transformers with [`LoraSettings`]), data ([`Batch`],
    //! [`Episode`], [`EpisodeSource`] and the synthetic task families), the gradient
    //! engines and losses, the learners with their settings, the outer optimiser and
    //! [`average`] of a meta-batch's gradients, evaluation, the configuration,
    //! candle's [`Tensor`], [`DType`] and [`Device`] (re-exported so that their
    //! version is the one melora was built with), and the crate's [`Error`],
    //! [`Result`] and [`init`].

    pub use crate::config::Config;
    pub use crate::data::{
        Batch, Episode, EpisodeSource, SinusoidTasks, SyntheticDomains, SyntheticImages,
        SyntheticText,
    };
    pub use crate::engine::{
        Checkpointed, GradEngine, Gradient, Loss, MicroBatched, TaskLoss, WholeGraph,
    };
    pub use crate::eval::{evaluate_episodes, Evaluation};
    pub use crate::memory::MemoryMeter;
    pub use crate::meta::{
        Adapter, Fomaml, HessianApproximation, InnerLoop, InnerStepRule, Maml, MamlMode, Melora,
        MetaLearner, MetaSgd, Reptile, TaskOutcome,
    };
    pub use crate::models::load::builtin;
    pub use crate::models::mlp::Mlp;
    pub use crate::models::{FewShotModel, LoraSettings};
    pub use crate::nn::{LoraInit, LoraSpec, Mode};
    pub use crate::optim::{Optimizer, OptimizerKind};
    pub use crate::run::average;
    pub use crate::tensor::ParamSet;
    pub use crate::{init, Error, Result};
    pub use candle_core::{DType, Device, Tensor};
}

/// The `melora` program's `main` after process set-up (the counting allocator and
/// [`init`], which only the binary can do): runs the command line, prints an error
/// as one `error: …` line on stderr, and returns the exit status (2 for bad
/// arguments or configuration, 1 for other failures). Not part of the library's
/// interface; it exists so that the command line itself can stay private.
#[doc(hidden)]
pub fn main_entry() -> std::process::ExitCode {
    cli::main()
}
