//! Planning memory before a run: the planner predicts the peak heap memory of a
//! meta-training configuration ([`plan`]), and [`budget`] fits a configuration to a
//! memory budget with it.
//!
//! The prediction is a measurement: the planner runs the real code of the run — the
//! model, the learner, the engine, the outer update — on small instances of the
//! configuration under the counting allocator, and extrapolates to the configured
//! sizes. Nothing is mirrored, so a new model, op, engine or device is planned as
//! soon as it runs.
//!
//! An instance keeps the configuration's width, sequence length, task size, inner
//! steps K, micro-batches, precision and storage, and cuts two things:
//!
//! - **layers**: a transformer of L > 2 layers is built with 1 and with 2 layers (the
//!   same architecture, random frozen weights of the same dtypes and storage). What
//!   a run holds grows affinely in L — frozen weights, LoRA tensors, their
//!   gradients and optimiser state, and every graph the method keeps, one layer's
//!   worth per layer — so two points give the line. With gradient checkpointing
//!   every n layers the instances are two and three whole segments (2n and 3n
//!   layers: a stack of one segment is also its last, which runs with the head's
//!   graph), and the line is in the number of segments. With checkpointing of
//!   chosen layers, which cut the stack unevenly, a model of more than 4 layers is
//!   measured with 1 layer, 2 in two segments, 2 in one and 4 in two of two, which
//!   separates what every layer costs, what a stored segment boundary costs and
//!   what each layer of the segment being recomputed costs; the configured
//!   segments (count, longest) are then put in;
//! - **tasks**: a meta-batch of B > 2 tasks is measured with 1 and with 2. Its tasks
//!   run one after another, each leaving its meta-gradient, so the peak is affine
//!   in B;
//! - **queries**: image tasks of Q > q₀ + 1 queries per class are measured with
//!   q₀ and q₀ + 1, q₀ the shots k (at least 3; 2k with checkpointing). Once the
//!   query set's passes make the peak, what they hold (a backbone's activations,
//!   kernel buffers, the heads' and the loss's tensors) grows affinely in the
//!   queries, so two points give the line; the line is checked at half as many
//!   queries again (at least two more) and, where it misses (the support set's
//!   passes still made the peak), q₀ moves to that number. This keeps a ResNet-34
//!   at 224×224 with 16 queries per class plannable on a machine that could not
//!   run it.
//!
//! On text an instance's tasks are the heaviest the run reads: melora computes only
//! a batch's real tokens, so a run peaks on its task with the most tokens, not at
//! `model.max_length`. The planner reads the run's episodes (same data, tokenizer,
//! seed and order; [`PlanOptions::tasks`] says how many), keeps the one with the
//! most real tokens in support and query, and measures every instance on copies of
//! it. For every data source it measures what the run's data set holds (decoded
//! images, tokenized texts, the tokenizer). Where the data cannot be read, or with
//! [`PlannedTasks::Longest`], it assumes every sequence at `max_length`, an upper
//! bound on any data, and counts no data set ([`Plan::data_note`] says why).
//!
//! The cuts combine multilinearly (at most 4 instances on text, 8 with chosen
//! checkpointed layers; 4 on images; a model of at most 2 layers, or 3 segments,
//! or 4 layers with chosen ones, at most 2 tasks and, on images, at most q₀ + 1
//! queries per class is measured as configured). The model
//! itself is also built once at its full size (from its folder, for `model.path`),
//! which gives the frozen weights and the loading peak exactly. A warm-up instance
//! first sets up what a process sets up once (thread pools, kernel workspaces), as
//! `melora profile` does before it measures.
//!
//! The breakdown of the peak: frozen weights, trainable parameters, episodes and the
//! optimiser's state are the live bytes each adds, measured. Of the rest, the
//! step's graphs and buffers, what one first-order backward pass adds beyond its
//! forward graph is counted as temporaries; what remains is split between
//! activations (forward graphs) and gradients (the gradient graphs second-order
//! methods keep) in the ratio of one forward graph to its gradient graph, both
//! measured; the gradients also hold the meta-gradients the earlier tasks of the
//! meta-batch leave (θ's size each).
//!
//! Planning needs the counting allocator ([`crate::memory::CountingAllocator`]) as
//! the global allocator (the `melora` program installs it) and takes a fraction of
//! one meta-step of the configuration: seconds for a 6-layer model.
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

pub mod budget;
mod extrapolate;
mod measure;
mod table;
mod tasks;

use serde::Serialize;

use crate::config::{Config, Method, Variant};
use crate::memory::TensorMeter;
use crate::{Error, Result};

use self::extrapolate::{instances_of, Target};
use self::measure::{measure, Inputs, Instance, Measured, PlannedInputs};

pub use self::tasks::{HeaviestTask, PlannedTasks};

pub use self::table::{format_breakdown, format_comparison};
pub use budget::{
    configured_budget, fit_configured, fit_to_budget, search_budget, search_configured,
    BudgetChoice,
};

/// What the planned run includes besides one meta-step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PlanOptions {
    /// Meta-iterations measured; from the second on, the optimiser state exists
    /// throughout, as in a long training run.
    pub iterations: usize,
    /// Meta-batches of episodes in memory at once (the one being trained on and those
    /// the prefetcher holds).
    pub episode_batches: usize,
    /// For text, the tasks whose heaviest the plan is measured on.
    pub tasks: PlannedTasks,
}

impl Default for PlanOptions {
    /// Steady-state training: two iterations; four meta-batches of episodes (the one
    /// trained on, two in the prefetcher's queue, one being made); for text, the
    /// heaviest task of the whole run.
    fn default() -> Self {
        PlanOptions {
            iterations: 2,
            episode_batches: 4,
            tasks: PlannedTasks::Run,
        }
    }
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
    /// The data set the run draws its episodes from, as read (decoded, tokenized),
    /// with the tokenizer; 0 where the plan did not read the data
    /// ([`PlannedTasks::Longest`], or data that could not be read).
    pub dataset: u64,
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
    /// The sum of the parts (the peak).
    pub fn total(&self) -> u64 {
        self.frozen_weights
            + self.trainable
            + self.gradients
            + self.optimizer_state
            + self.activations
            + self.data
            + self.dataset
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
    /// Where the run keeps its tensors (`cpu`, `cuda:0`), and so which memory the
    /// figures are of: the host heap for the CPU, the GPU's memory for a GPU.
    pub device: String,
    /// Peak bytes of training (the larger of loading and the meta-steps).
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
    /// Examples per micro-batch of the second-order products, where the method has
    /// them (recompute-mode MAML and MetaSGD, MELoRA with curvature) and they split
    /// the support set more finely than `micro_batch`.
    pub second_order_micro_batch: Option<usize>,
    /// With gradient checkpointing, the layers whose input the forward pass keeps.
    pub checkpoint_layers: Option<Vec<usize>>,
    /// Tasks per meta-batch.
    pub meta_batch_size: usize,
    /// Support and query examples per task.
    pub support_examples: usize,
    /// Query examples per task.
    pub query_examples: usize,
    /// Tokens per sequence a batch can hold (`model.max_length`), for text models.
    pub sequence_length: Option<usize>,
    /// For text, the task the plan was measured on: the heaviest the run reads.
    /// `None` with text: every sequence was assumed at `sequence_length` (see
    /// [`Plan::data_note`]).
    pub heaviest_task: Option<HeaviestTask>,
    /// Why the plan did not read the run's data (it could not), and what it assumed
    /// instead (text at `sequence_length`, no data set counted), if so.
    pub data_note: Option<String>,
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
    /// What the measured run included.
    pub options: PlanOptions,
    /// Instances of the configuration that were measured (besides a warm-up, the
    /// first time a process plans a model in a dtype).
    pub instances: usize,
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

/// The predicted peak heap bytes ([`Plan::peak_bytes`]) of training with `config`
/// (steady state: see [`PlanOptions::default`]), for every method and mode of the
/// configuration, with or without gradient checkpointing and micro-batches; for
/// the baselines, which are not meta-trained, the peak of adapting to one test
/// task. See the module's documentation for how it is measured.
///
/// Fails with [`crate::Error::Config`] for an invalid configuration,
/// [`crate::Error::Model`] for a model it cannot read (unknown built-in, missing or
/// invalid `config.json`, unsupported family, LoRA target matching no module), with
/// the error training would give for a combination training refuses (running the
/// same code, it meets the same checks), with [`crate::Error::InvalidArgument`] for
/// tasks whose episodes alone exceed the machine's memory, and when the counting
/// allocator is not installed.
pub fn plan(config: &Config) -> Result<Plan> {
    plan_with(config, &PlanOptions::default())
}

/// [`plan`] with explicit options.
pub fn plan_with(config: &Config, options: &PlanOptions) -> Result<Plan> {
    // A configuration built in code has not been through `Config::load`.
    config.validate()?;
    if !crate::memory::is_installed() {
        return Err(Error::InvalidArgument(
            "the memory planner measures with melora's counting allocator, which this \
             program does not use; install it with `#[global_allocator] static ALLOC: \
             melora::memory::CountingAllocator = melora::memory::CountingAllocator;`"
                .into(),
        ));
    }
    crate::init();
    // On a GPU the run's tensors, and so what is measured, are in its memory.
    let device = crate::run::build::device(config)?;
    let on_device = !device.is_cpu();
    let method = crate::config::LearnerSpec::of(config).label();
    let variant = Variant::of(config);
    let meta_trains = variant.meta_trains();
    let inputs = Inputs::of(config)?;
    let tasks = if meta_trains {
        config.meta_learning.meta_batch_size
    } else {
        1
    };
    let episode_batches = if meta_trains {
        options.episode_batches.max(1)
    } else {
        1
    };
    let architecture = crate::models::Architecture::from_config(config)?;
    if let Some(architecture) = &architecture {
        measure::check_positions(config, inputs, architecture)?;
    }
    if let Some(limit) = crate::memory::physical_memory_bytes() {
        measure::check_data_fits(config, inputs, tasks * episode_batches, limit)?;
    }
    let layers = architecture.as_ref().map(|a| a.layers()).transpose()?;
    // After the checks: the data is tokenized at the configured lengths.
    let text = matches!(inputs, Inputs::Tokens { .. });
    let (observed, data_note) = match tasks::observe(config, options.tasks, text) {
        Ok(observed) => (observed, None),
        Err(e) => (
            None,
            Some(if text {
                format!(
                    "the run's episodes could not be read ({e}), so every sequence is \
                     assumed at model.max_length and the data set is not counted"
                )
            } else {
                format!("the run's data could not be read ({e}), so the data set is not counted")
            }),
        ),
    };
    let (dataset_bytes, data_note) = match (observed.as_ref(), on_device) {
        (Some(o), true) => (
            0,
            Some(format!(
                "the data set ({}) stays in host memory, outside the device's peak",
                crate::memory::format_bytes(o.dataset_bytes)
            )),
        ),
        (Some(o), false) => (o.dataset_bytes, data_note),
        (None, _) => (0, data_note),
    };
    let observed = observed.and_then(|o| o.task);
    let planned = PlannedInputs {
        inputs,
        observed,
        device: device.clone(),
    };

    // The model at its full size: frozen weights and the loading peak, exactly; and
    // the checks training makes of it (checkpointed layers it does not have).
    let (weights, load_peak, trainable_parameters, couples_examples, chain_length) = {
        let meter = TensorMeter::start(&device)?;
        let model = crate::run::build::build_model(config)?;
        crate::run::build::build_engine(config, model.as_ref())?;
        let weights = meter.current_above_baseline()?.max(0) as f64;
        let load_peak = meter.peak_above_baseline()? as f64;
        drop(meter);
        let params = if config.meta_learning.method == Method::Finetune {
            model.full_params(config.seed)?
        } else {
            crate::run::build::initial_params(model.as_ref(), config)?
        };
        (
            weights,
            load_peak,
            params.numel() as u64,
            model.couples_examples(),
            model.layer_chain().map(|chain| chain.chain_length()),
        )
    };
    let mut target = Target::of(
        config,
        layers,
        tasks,
        matches!(inputs, Inputs::Images { .. }),
    )?;
    // The warm-up: what a process sets up once (per model and dtype) is not the run's.
    if first_plan_of_its_kind(config) {
        measure(config, &instances_of(&target)[0].1, &planned, 1, 1)?;
        crate::tensor::kernel_workspace::reserve_on_kernel_threads();
    }
    let mut cache: Vec<(Instance, Measured)> = Vec::new();
    let mut run = |instance: &Instance| -> Result<Measured> {
        if let Some((_, m)) = cache.iter().find(|(i, _)| i == instance) {
            return Ok(*m);
        }
        let m = measure(
            config,
            instance,
            &planned,
            options.iterations,
            episode_batches,
        )?;
        cache.push((instance.clone(), m));
        Ok(m)
    };
    // Queries per class are extrapolated along a line only once the query set's
    // passes make the peak. Where a learner's inner loop on the support set makes
    // it (it never sees the query, so it holds the same whatever the queries), the
    // peak stays flat for a few queries and then turns; so for these learners the
    // line through q₀ and q₀ + 1 is checked at a larger number on the smallest
    // instance, and moves on to that number until it holds (within 5%).
    // Recompute MAML on Conv4 with two inner steps, 5-way 1-shot, was flat up to 4
    // queries per class and then grew by 17 MiB a query: the line through 3 and 4
    // predicted 84 MiB at 15, against 255 MiB measured. The metric learners'
    // support phase holds the query's graph and grows with it, and their q₀ was
    // measured past the turn (see `Target::query_points`), so they are not probed
    // further (a probe at more queries costs a larger instance).
    let inner_loop = !matches!(
        crate::config::LearnerSpec::of(config),
        crate::config::LearnerSpec::ProtoNet { .. } | crate::config::LearnerSpec::Fsct { .. }
    );
    while let (true, Some(first), Some(check)) =
        (inner_loop, target.first_query(), target.query_check_point())
    {
        let probe = |queries: usize| Instance {
            n_query: Some(queries),
            ..instances_of(&target)[0].1.clone()
        };
        let (at_first, at_next) = (run(&probe(first))?, run(&probe(first + 1))?);
        let at_check = run(&probe(check))?;
        let line = at_first.peak + (check - first) as f64 * (at_next.peak - at_first.peak);
        if (line - at_check.peak).abs() <= 0.05 * at_check.peak {
            break;
        }
        target.set_first_query(check);
    }
    let measured: Vec<(extrapolate::Corner, Measured)> = instances_of(&target)
        .iter()
        .map(|(corner, instance)| run(instance).map(|m| (*corner, m)))
        .collect::<Result<_>>()?;
    let at = target.extrapolate(&measured);

    // Random frozen weights where the run loads them: the run's own are measured.
    let step_peak = (at.peak - at.weights + weights).max(0.0);
    let optimizer = if options.iterations >= 2 {
        at.optimizer
    } else {
        0.0
    };
    // Each earlier task of the meta-batch leaves its meta-gradient, θ's size.
    let meta_gradients = if meta_trains {
        (tasks.saturating_sub(1)) as f64 * at.trainable
    } else {
        0.0
    };
    let known = weights + at.trainable + at.data + optimizer + meta_gradients;
    let rest = (step_peak - known).max(0.0);
    let temporaries = rest.min(at.backward_extra);
    // What the step's graphs hold: forward graphs and, for second-order methods,
    // the gradient graphs taken through them, alive together in the measured ratio.
    let graphs = rest - temporaries;
    let gradient_share =
        if keeps_gradient_graphs(config) && at.forward_graph + at.gradient_graph > 0.0 {
            at.gradient_graph / (at.forward_graph + at.gradient_graph)
        } else {
            0.0
        };
    let gradients = meta_gradients + graphs * gradient_share;
    let round = |x: f64| x.max(0.0).round() as u64;
    let breakdown = PlanBreakdown {
        frozen_weights: round(weights),
        trainable: round(at.trainable),
        gradients: round(gradients),
        optimizer_state: round(optimizer),
        activations: round(graphs * (1.0 - gradient_share)),
        data: round(at.data),
        dataset: dataset_bytes,
        temporaries: round(temporaries),
    };
    let load_peak_bytes = round(load_peak + at.trainable + at.data).max(round(load_peak));
    let forward_graph_bytes = round(at.forward_graph);
    let precision = crate::run::build::model_precision(config);
    Ok(Plan {
        method,
        variant,
        device: config.device.to_string(),
        model: config
            .model
            .path
            .as_ref()
            .map_or(config.model.name.clone(), |p| p.display().to_string()),
        peak_bytes: breakdown.total().max(load_peak_bytes),
        breakdown,
        load_peak_bytes,
        forward_graph_bytes,
        graphs_kept: if forward_graph_bytes > 0 {
            breakdown.activations as f64 / forward_graph_bytes as f64
        } else {
            0.0
        },
        trainable_parameters,
        inner_steps: if meta_trains {
            config.meta_learning.inner.steps
        } else {
            config.evaluation.finetune_steps
        },
        micro_batch: config.memory_optimization.gradient_accumulation.micro_batch,
        second_order_micro_batch: second_order_micro_batch(config, couples_examples),
        // A transformer's layers, a vision backbone's stages.
        checkpoint_layers: match (
            config.memory_optimization.checkpointing.plan(),
            layers.or(chain_length),
        ) {
            (Some(plan), Some(l)) => Some(plan.boundaries(l)?),
            _ => None,
        },
        meta_batch_size: tasks,
        support_examples: support_examples(config),
        query_examples: query_examples(config),
        sequence_length: inputs.sequence_length(),
        heaviest_task: planned.observed.map(|task| task.heaviest),
        data_note,
        dtype_bytes: precision.frozen.size_in_bytes() as u64,
        dtype: dtype_name(precision.frozen).into(),
        trainable_dtype: dtype_name(precision.trainable).into(),
        int8: config.model.quantization == crate::config::Quantization::Int8,
        loss_scaling: config.memory_optimization.precision == crate::config::Precision::F16,
        options: *options,
        instances: cache.len(),
    })
}

fn dtype_name(dtype: candle_core::DType) -> &'static str {
    match dtype {
        candle_core::DType::F64 => "f64",
        candle_core::DType::BF16 => "bf16",
        candle_core::DType::F16 => "f16",
        _ => "f32",
    }
}

/// Support examples per task (the sinusoid's points, or ways × shots).
fn support_examples(config: &Config) -> usize {
    if crate::run::build::is_sinusoid(config) {
        config.data.k_shot
    } else {
        config.data.n_way * config.data.k_shot
    }
}

/// Query examples per task.
fn query_examples(config: &Config) -> usize {
    if crate::run::build::is_sinusoid(config) {
        config.data.n_query
    } else {
        config.data.n_way * config.data.n_query
    }
}

/// Whether the method differentiates through its gradients (exact second order, or
/// MELoRA's curvature products), so that gradient graphs are alive at its peak.
fn keeps_gradient_graphs(config: &Config) -> bool {
    use crate::config::{HessianKind, LearnerSpec};
    match LearnerSpec::of(config) {
        LearnerSpec::Maml { .. } | LearnerSpec::MetaSgd { .. } => true,
        LearnerSpec::Melora { hessian, .. } => hessian != HessianKind::None,
        _ => false,
    }
}

/// The second-order products' micro-batch where it applies: a method with such
/// products outside a kept full graph, a model that can split its examples (it does
/// not couple them, [`FewShotModel::couples_examples`]), and smaller than both the
/// support set and `micro_batch`.
///
/// [`FewShotModel::couples_examples`]: crate::models::FewShotModel::couples_examples
fn second_order_micro_batch(config: &Config, couples_examples: bool) -> Option<usize> {
    use crate::config::{InnerMode, LearnerSpec};
    let accumulation = &config.memory_optimization.gradient_accumulation;
    let size = accumulation.second_order_micro_batch?;
    let recomputes = match LearnerSpec::of(config) {
        LearnerSpec::Maml { mode } | LearnerSpec::MetaSgd { mode } => mode == InnerMode::Recompute,
        LearnerSpec::Melora { .. } => keeps_gradient_graphs(config),
        _ => false,
    };
    let finer =
        size < support_examples(config) && accumulation.micro_batch.is_none_or(|m| size < m);
    (recomputes && !couples_examples && finer).then_some(size)
}

/// Whether this process has not yet planned a configuration of `config`'s model,
/// dtypes and storage (and so has not yet set up what runs of it set up once).
fn first_plan_of_its_kind(config: &Config) -> bool {
    static WARMED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let key = format!(
        "{} {:?} {} {:?} {:?} {:?}",
        config.device,
        config.model.path,
        config.model.name,
        config.model.dtype,
        config.memory_optimization.precision,
        config.model.quantization
    );
    let mut warmed = WARMED.lock().unwrap_or_else(|e| e.into_inner());
    if warmed.contains(&key) {
        return false;
    }
    warmed.push(key);
    true
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
