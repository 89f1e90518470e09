//! Planning memory before a run: the planner predicts the peak heap memory of a
//! meta-training configuration ([`plan`]), and [`budget`] fits a configuration to a
//! memory budget with it.
//!
//! The prediction is analytical — no tensor is computed — but not a closed formula
//! fitted to measurements: the planner replays, at the level of shapes, exactly what
//! a meta-training step allocates and frees.
//!
//! - `models` replays each model's forward pass op by op (frozen
//!   projections, LoRA branches, head-split copies, attention scores and
//!   probabilities, layer norms, FFN and activation, pooling, loss);
//! - `autograd` replays candle's backward pass rule by rule, so a gradient taken with
//!   its graph (second order) holds what candle's does, and a detached one frees what
//!   candle's frees;
//! - `checkpoint` replays gradient checkpointing (`engine::Checkpointed`): the forward
//!   sweep keeps only segment outputs (and, for Hessian-vector and Gauss-Newton
//!   products, their tangents), and every backward sweep has one segment's graph
//!   alive at a time;
//! - `learners` replays the learners and the meta-step: what each keeps alive (every
//!   inner step's graphs for full-graph MAML, one step's for recompute-MAML and
//!   MELoRA, one forward graph for FOMAML and Reptile, a micro-batch's with gradient
//!   accumulation, one segment's with checkpointing), the meta-batch's tasks one
//!   after another, the outer update; for the fine-tuning baselines, which are not
//!   meta-trained, the adaptation to one test task;
//! - `sim` counts every buffer like candle's reference-counted tensors, with candle's
//!   per-tensor bookkeeping, and records the peak and what it was made of.
//!
//! Mixed precision (`memory_optimization.precision` bf16/f16) is replayed as the models
//! run it: frozen weights and activations in two bytes; LoRA `A`/`B` and the head in
//! f32, with the adapter's bf16/f16 copies cast in the graph of every forward; the
//! hidden states copied to f32 for pooling, head and loss; the frozen linear maps
//! accumulating in f32 buffers for the duration of each call; the half-precision
//! backward of layer norm and softmax as fused ops whose second derivatives run in
//! f32 (detached at once in first-order passes); candle's bf16 products on f32
//! copies of both operands; and under f16, the loss scale's copies of every
//! gradient. An int8 base (`model.quantization`) keeps one byte per entry of the
//! linear weights and token tables plus an f32 scale per output channel, dequantizes
//! a layer's weight into an f32 buffer for each product forward and backward, looks
//! tokens up without a dense table, and is quantized from dense copies when loaded.
//!
//! Sizes come from the configuration: the model's architecture (built-in or the
//! `config.json` and safetensors header of a model folder), LoRA rank and targets,
//! the task shape (ways, shots, queries, sequence length, image size, or sinusoid
//! points), the meta-batch, the method and its inner steps, micro-batches, gradient
//! checkpointing, the dtypes and the storage of the frozen base.
//!
//! ```no_run
//! use melora::config::Config;
//! use melora::memory::format_bytes;
//! use melora::plan as planner;
//!
//! let config = Config::from_yaml_str(
//!     "meta_learning:\n  inner:\n    steps: 5\n\
//!      memory_optimization:\n  checkpointing:\n    enabled: true\n",
//! )?;
//! let plan = planner::plan(&config)?;
//! println!("{}: {}", plan.method, format_bytes(plan.peak_bytes));
//! # Ok::<(), melora::Error>(())
//! ```

mod autograd;
pub mod budget;
mod checkpoint;
mod learners;
mod models;
mod sim;
mod spec;
mod table;

use serde::Serialize;

use crate::config::{Config, HessianKind, InnerMode, Method, Variant};
use crate::Result;

use self::learners::{outer_update, Approximation, Ctx, InnerSpec, Learner, OptimizerSpec, Params};
use self::models::{SimBatch, SimModel};
use self::sim::{Category, Sim, SimDType};

pub use self::sim::{Overheads, CANDLE_OVERHEADS};
pub(crate) use self::table::{format_breakdown, format_comparison};
pub use budget::{fit_configured, fit_to_budget, search_budget, search_configured, BudgetChoice};

/// What the simulated run includes besides one meta-step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PlanOptions {
    /// Meta-iterations replayed; from the second on, the optimiser state exists
    /// throughout, as in a long training run.
    pub iterations: usize,
    /// Meta-batches of episodes in memory at once (the one being trained on and those
    /// the prefetcher holds).
    pub episode_batches: usize,
    /// Threads that run candle's kernels (their scratch buffers are per thread).
    pub threads: usize,
}

impl Default for PlanOptions {
    /// Steady-state training: two iterations; four meta-batches of episodes (the one
    /// trained on, two in the prefetcher's queue, one being made); the machine's
    /// threads (or `RAYON_NUM_THREADS`).
    fn default() -> Self {
        PlanOptions {
            iterations: 2,
            episode_batches: 4,
            threads: kernel_threads(),
        }
    }
}

/// Threads of rayon's global pool, as candle's kernels will use them.
pub(crate) fn kernel_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Bytes of each kind at the moment of the peak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct PlanBreakdown {
    /// The frozen base model as it stores it (int8 values and scales with
    /// `model.quantization: int8`).
    pub frozen_weights: u64,
    /// Trainable parameters and the per-step copies a learner keeps (θ₀…θ_K, leaves).
    pub trainable: u64,
    /// Gradients, including the gradient graphs second-order methods keep.
    pub gradients: u64,
    /// The outer optimiser's state (AdamW moments).
    pub optimizer_state: u64,
    /// Forward activations and what they keep for backward, times the graphs the
    /// method holds at once.
    pub activations: u64,
    /// The tasks' examples.
    pub data: u64,
    /// Kernel scratch, copies and other short-lived buffers.
    pub temporaries: u64,
}

impl Plan {
    /// Peak heap bytes of the meta-steps alone, model and optimiser state included
    /// (the breakdown's total): what a measurement that starts after loading
    /// (`bench memory`, after its warm-up) sees. Below [`Self::peak_bytes`] when
    /// loading peaks higher.
    pub fn step_peak_bytes(&self) -> u64 {
        self.breakdown.total()
    }
}

impl PlanBreakdown {
    fn from_array(b: &sim::Breakdown) -> Self {
        let get = |c: Category| b[Category::ALL.iter().position(|x| *x == c).expect("listed")];
        PlanBreakdown {
            frozen_weights: get(Category::Weights),
            trainable: get(Category::Trainable),
            gradients: get(Category::Gradients),
            optimizer_state: get(Category::Optimizer),
            activations: get(Category::Activations),
            data: get(Category::Data),
            temporaries: get(Category::Temporaries),
        }
    }

    /// The sum of the parts (the peak).
    pub fn total(&self) -> u64 {
        self.frozen_weights
            + self.trainable
            + self.gradients
            + self.optimizer_state
            + self.activations
            + self.data
            + self.temporaries
    }
}

/// The predicted peak of one configuration.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Plan {
    /// The method as shown in tables, e.g. `maml (full graph)`.
    pub method: String,
    /// The method by its configuration name (`comparison.baselines`), e.g.
    /// `maml-full_graph`.
    pub variant: Variant,
    /// The model as configured (built-in name or folder).
    pub model: String,
    /// Peak heap bytes of training (the larger of loading and the meta-steps).
    pub peak_bytes: u64,
    /// What the peak of the meta-steps is made of.
    pub breakdown: PlanBreakdown,
    /// Peak while the model is loaded (a weights file is read whole, then
    /// converted), before training starts.
    pub load_peak_bytes: u64,
    /// Activations one forward graph of the support set keeps for backward (one
    /// micro-batch's with gradient accumulation).
    pub forward_graph_bytes: u64,
    /// Activations at the peak in units of one forward graph: about K for
    /// full-graph MAML, 1 for the others.
    pub graphs_kept: f64,
    /// Trainable parameters (elements).
    pub trainable_parameters: u64,
    /// Inner steps K (for the baselines, their fine-tuning steps).
    pub inner_steps: usize,
    /// Examples per micro-batch, if any.
    pub micro_batch: Option<usize>,
    /// With gradient checkpointing, the layers whose input the forward pass keeps.
    pub checkpoint_layers: Option<Vec<usize>>,
    /// Tasks per meta-batch.
    pub meta_batch_size: usize,
    /// Support and query examples per task.
    pub support_examples: usize,
    /// Query examples per task.
    pub query_examples: usize,
    /// Tokens per sequence assumed (the longest a batch can be), for text models.
    pub sequence_length: Option<usize>,
    /// Element size of the frozen weights and the activations, in bytes (2 with
    /// `memory_optimization.precision` bf16 or f16).
    pub dtype_bytes: u64,
    /// Type of the frozen weights and the activations (`f32`, `f64`, `bf16`, `f16`).
    pub dtype: String,
    /// Type of the trainable tensors, their gradients and optimiser state, and of
    /// pooling, head and loss (`f32` in mixed precision).
    pub trainable_dtype: String,
    /// Whether the frozen linear weights and token tables are stored in int8
    /// (`model.quantization: int8`), dequantized one layer at a time.
    pub int8: bool,
    /// Whether backward passes run under a loss scale (`precision: f16`).
    pub loss_scaling: bool,
    /// What the simulated run included.
    pub options: PlanOptions,
}

/// The comparison `melora plan` shows by default: full-graph MAML, FOMAML, Reptile
/// and MELoRA with the configured Hessian approximation.
pub fn default_comparison(config: &Config) -> Vec<Variant> {
    let mut melora = config.clone();
    melora.meta_learning.method = Method::Melora;
    vec![
        Variant::MamlFullGraph,
        Variant::Fomaml,
        Variant::Reptile,
        Variant::of(&melora),
    ]
}

/// The method of `config` as the simulation runs it (`None` for the baselines,
/// which only adapt), and its table label.
fn learner_of(config: &Config) -> (Option<Learner>, String) {
    let hessian = &config.memory_optimization.hessian_approximation;
    match config.meta_learning.method {
        Method::Maml => match config.meta_learning.inner.mode {
            InnerMode::FullGraph => (Some(Learner::MamlFullGraph), "maml (full graph)".into()),
            InnerMode::Recompute => (Some(Learner::MamlRecompute), "maml (recompute)".into()),
        },
        Method::Fomaml => (Some(Learner::Fomaml), "fomaml".into()),
        Method::Reptile => (Some(Learner::Reptile), "reptile".into()),
        Method::Melora => {
            let approximation = match hessian.kind {
                HessianKind::None => Approximation::None,
                HessianKind::Diagonal => Approximation::Diagonal {
                    probes: hessian.probes,
                },
                HessianKind::GaussNewton => Approximation::GaussNewton,
                HessianKind::BlockDiagonal => Approximation::BlockDiagonal,
            };
            (
                Some(Learner::Melora {
                    approximation,
                    damped: hessian.damping > 0.0,
                }),
                format!("melora ({})", hessian.kind),
            )
        }
        Method::Metasgd => (
            Some(Learner::MetaSgd {
                full_graph: config.meta_learning.inner.mode == InnerMode::FullGraph,
            }),
            format!("metasgd ({})", config.meta_learning.inner.mode),
        ),
        method @ (Method::Finetune
        | Method::LoraFinetune
        | Method::NoAdaptation
        | Method::Prototype
        | Method::PretrainFinetune) => (None, method.to_string()),
    }
}

/// The predicted peak heap bytes ([`Plan::peak_bytes`]) of training with `config`
/// (steady state: see [`PlanOptions::default`]), for every method and mode of the
/// configuration — MAML in full-graph and recompute modes, FOMAML, Reptile, MELoRA
/// with each Hessian approximation — with or without gradient checkpointing and
/// micro-batches; for the `finetune` and `lora-finetune` baselines, which are not
/// meta-trained, the peak of adapting to one test task.
///
/// Fails with [`crate::Error::Config`] for an invalid configuration,
/// [`crate::Error::Model`] for a model it cannot read (unknown built-in, missing or
/// invalid `config.json`, unsupported family, LoRA target matching no module), and
/// [`crate::Error::InvalidArgument`] for a combination training refuses too
/// (micro-batches with Conv4's batch statistics, a data source the model does not
/// read, checkpointing a model that is not a transformer stack or layers it does not
/// have, sequences longer than the model's positions) or sizes no machine holds.
pub fn plan(config: &Config) -> Result<Plan> {
    plan_with(config, &PlanOptions::default())
}

/// [`plan`] with explicit options.
pub fn plan_with(config: &Config, options: &PlanOptions) -> Result<Plan> {
    // A configuration built in code has not been through `Config::load`.
    config.validate()?;
    let spec = spec::model_spec(config)?;
    let (learner, method) = learner_of(config);
    let micro = config.memory_optimization.gradient_accumulation.micro_batch;
    if micro.is_some_and(|m| m < spec.support.len())
        && matches!(spec.model.family, models::Family::Conv4(_))
    {
        return Err(crate::Error::InvalidArgument(
            "this model normalises with the statistics of the whole batch, so splitting \
             it into micro-batches would change the result; unset \
             memory_optimization.gradient_accumulation.micro_batch"
                .into(),
        ));
    }
    let inner = InnerSpec {
        steps: config.meta_learning.inner.steps,
        micro,
    };
    // The baselines are not meta-trained: their peak is evaluation's, one test task
    // at a time.
    let meta_batch = match learner {
        Some(_) => config.meta_learning.meta_batch_size,
        None => 1,
    };
    let outer = &config.meta_learning.outer;
    let optimizer = OptimizerSpec {
        adamw: outer.optimizer == crate::config::OuterOptimizer::Adamw,
        weight_decay: outer.weight_decay > 0.0,
    };
    let clip = outer.grad_clip.is_some();
    // Dropout draws masks only in training (evaluation runs the baselines).
    let train = config.lora.dropout > 0.0 && learner.is_some();

    let sim = Sim::new(options.threads);
    // Loading: the weights file read whole, then its tensors; the file is dropped
    // before the model is assembled.
    sim.set_category(Category::Temporaries);
    let file = sim.hold_bytes(spec.load.file_bytes);
    sim.set_category(Category::Weights);
    let in_file = sim.hold_bytes(spec.load.tensor_bytes);
    sim.free_bytes(file, spec.load.file_bytes);
    sim.spike(spec.load.conversion_scratch);
    sim.free_bytes(in_file, spec.load.tensor_bytes);
    let model = SimModel::build(&sim, &spec.model);

    sim.set_category(Category::Trainable);
    let precision = model.precision();
    // Trainable tensors (LoRA, head; Conv4's and the MLP's every tensor) in the
    // trainable type, the master weights of mixed precision.
    let dtype = precision.trainable;
    let init_params = || -> Params {
        model
            .param_shapes()
            .iter()
            .map(|s| {
                // Initial values are drawn in f64, then converted.
                if dtype.bytes() != 8 {
                    sim.spike(8 * s.iter().product::<usize>() as u64);
                }
                sim.tensor(s, dtype)
            })
            .collect()
    };
    let mut params = init_params();
    if matches!(learner, Some(Learner::MetaSgd { .. })) {
        // MetaSGD's step sizes: one tensor like each of θ's.
        let alpha = init_params();
        params.extend(alpha);
    }
    let mut trainable_parameters: u64 = params.iter().map(|t| t.elem_count() as u64).sum();
    if config.meta_learning.method == Method::Finetune {
        trainable_parameters += model.base_numel();
    }

    sim.set_category(Category::Data);
    let episode_batches = match learner {
        Some(_) => options.episode_batches.max(1),
        None => 1,
    };
    let batches: Vec<Vec<(SimBatch, SimBatch)>> = (0..episode_batches)
        .map(|_| {
            (0..meta_batch)
                .map(|_| {
                    (
                        SimBatch::new(&sim, spec.support, precision.frozen),
                        SimBatch::new(&sim, spec.query, precision.frozen),
                    )
                })
                .collect()
        })
        .collect();
    sim.set_category(Category::Temporaries);
    // Loading, drawing the initial values (in f64) and making the first episodes:
    // what precedes the first step, which a small model's step may not exceed.
    let load_peak = sim.peak().0;
    sim.reset_peak();
    // f16 activations: every backward pass runs under the loss scale.
    let loss_scaled = config.memory_optimization.precision == crate::config::Precision::F16;
    sim.set_loss_scaled(loss_scaled);

    let ctx = Ctx {
        sim: &sim,
        model: &model,
        train,
        inner,
        checkpoint: spec.checkpoint.as_deref(),
    };
    let mut state = None;
    for _ in 0..options.iterations.max(1) {
        let Some(learner) = learner else {
            let (support, query) = &batches[0][0];
            let steps = config.evaluation.finetune_steps;
            let classes = spec.model.classes;
            match config.meta_learning.method {
                // LoRA fine-tuning starts every task from fresh adapters.
                Method::LoraFinetune => {
                    let fresh = within_category(&sim, Category::Trainable, init_params);
                    ctx.finetune(&fresh, support, query, steps);
                }
                // Full fine-tuning: a fresh initialisation and every base weight.
                Method::Finetune => {
                    let mut full = within_category(&sim, Category::Trainable, init_params);
                    full.extend(model.base_params());
                    ctx.finetune(&full, support, query, steps);
                }
                Method::NoAdaptation => ctx.no_adaptation(&params, query),
                Method::Prototype => ctx.prototype(&params, support, query, classes),
                Method::PretrainFinetune => {
                    // Pre-training's steps on batches of `batch_size` examples, then
                    // the per-task fine-tuning, whichever peaks higher.
                    let batch = within_category(&sim, Category::Data, || {
                        SimBatch::new(
                            &sim,
                            spec.support
                                .with_len(config.comparison.pretrain.resolved(config).1),
                            precision.frozen,
                        )
                    });
                    let mut pretrain_state = None;
                    for _ in 0..2 {
                        params = ctx.pretrain_step(&params, &batch, &mut pretrain_state);
                    }
                    drop((batch, pretrain_state));
                    match config.comparison.pretrain.tune {
                        crate::config::PretrainTune::Head => {
                            ctx.head_finetune(&params, support, query, classes, steps)
                        }
                        crate::config::PretrainTune::All => {
                            ctx.finetune(&params, support, query, steps)
                        }
                    }
                }
                _ => ctx.finetune(&params, support, query, steps),
            }
            continue;
        };
        // The tasks of a meta-batch have the same shapes and run one after another,
        // each leaving only its meta-gradient: a later task peaks higher than an
        // earlier one by exactly the meta-gradients in between. So the first task
        // (for what it leaves) and the last (for the peak) are replayed, and the
        // ones between leave a copy of the first's meta-gradient.
        let tasks = &batches[0];
        let mut gradients: Vec<Params> = Vec::with_capacity(tasks.len());
        for (i, (support, query)) in tasks.iter().enumerate() {
            let replayed = i == 0 || i + 1 == tasks.len();
            let g = if replayed {
                ctx.meta_gradient(learner, &params, support, query)
            } else {
                within_category(&sim, Category::Gradients, || {
                    gradients[0]
                        .iter()
                        .map(|t| sim.tensor(&t.dims(), t.dtype()))
                        .collect()
                })
            };
            gradients.push(g);
        }
        params = outer_update(&sim, &params, &gradients, optimizer, clip, &mut state);
    }
    let (peak, parts) = sim.peak();
    drop((params, state, batches, model));

    let forward_graph_bytes = spec::forward_graph_bytes(&spec, inner.micro, options.threads);
    let breakdown = PlanBreakdown::from_array(&parts);
    Ok(Plan {
        method,
        variant: Variant::of(config),
        model: spec.name.clone(),
        peak_bytes: peak.max(load_peak),
        breakdown,
        load_peak_bytes: load_peak,
        forward_graph_bytes,
        graphs_kept: if forward_graph_bytes > 0 {
            breakdown.activations as f64 / forward_graph_bytes as f64
        } else {
            0.0
        },
        trainable_parameters,
        inner_steps: match learner {
            Some(_) => inner.steps,
            None => config.evaluation.finetune_steps,
        },
        micro_batch: micro,
        checkpoint_layers: spec.checkpoint.clone(),
        meta_batch_size: meta_batch,
        support_examples: spec.support.len(),
        query_examples: spec.query.len(),
        sequence_length: spec.sequence_length(),
        dtype_bytes: precision.frozen.bytes(),
        dtype: precision.frozen.name().into(),
        trainable_dtype: precision.trainable.name().into(),
        int8: precision.int8,
        loss_scaling: loss_scaled,
        options: *options,
    })
}

/// Runs `f` with new buffers counted in `category`.
fn within_category<R>(sim: &Sim, category: Category, f: impl FnOnce() -> R) -> R {
    let previous = sim.set_category(category);
    let out = f();
    sim.set_category(previous);
    out
}

/// Plans of `config` run with each of `variants` (the comparison table), everything
/// else unchanged.
pub fn compare(config: &Config, variants: &[Variant]) -> Result<Vec<Plan>> {
    compare_with(config, variants, &PlanOptions::default())
}

/// [`compare`] with explicit options.
pub fn compare_with(
    config: &Config,
    variants: &[Variant],
    options: &PlanOptions,
) -> Result<Vec<Plan>> {
    variants
        .iter()
        .map(|v| plan_with(&v.apply(config), options))
        .collect()
}

#[cfg(test)]
mod tests;
