//! `melora bench memory`: for one model, each method × inner steps K × gradient
//! checkpointing × precision, the peak memory of a meta-iteration (counting allocator),
//! the process's peak resident set, the planner's prediction and the seconds per
//! meta-iteration.
//!
//! The pieces:
//!
//! - the grid ([`Grid`], [`GridPoint`]) and the configuration of each point
//!   ([`bench_config`], [`row_config`]);
//! - [`measure`]: one point measured in the current process. Heap peaks and the
//!   resident high-water mark are process-wide, so the `melora` command measures every
//!   point in a fresh child process and collects the [`Measurement`]s;
//! - [`predicted_bytes`]: the planner's prediction ([`crate::plan`]), the one
//!   place the planner is asked;
//! - [`MemoryBench`]: the results (`memory.json`), with [`MemoryBench::to_markdown`]
//!   (`memory.md`, including the comparison with full-graph MAML) and
//!   [`MemoryBench::plot`] (peak memory against K per method).
//!
//! # What is measured
//!
//! - `peak_bytes`: the highest number of heap bytes the whole process held during the
//!   timed meta-iterations (after one warm-up iteration), from the counting allocator:
//!   the model's weights, the trainable parameters, the optimiser state, the prefetched
//!   episodes and everything the meta-step allocates. Loading the model and the warm-up
//!   are outside it. This is what the planner predicts, so the two compare directly.
//! - `rss_bytes`: the child process's peak resident set (`VmHWM`) over its whole life,
//!   loading included; it also counts code, thread stacks and memory the allocator
//!   keeps cached.
//! - `seconds_per_iter`: the median of the timed meta-iterations.
//!
//! Tasks are synthetic text episodes ([`crate::data::SyntheticText`]) whose sequences
//! all have exactly `model.max_length` tokens, so every meta-batch has the same shape.

mod measure;
mod report;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::{Config, Method, Precision, Variant};
use crate::{Error, Result};

// Only what the command line uses is re-exported: the module is private to the crate,
// so anything more would be dead code.
#[cfg(test)]
use measure::tasks;
pub use measure::{measure, measure_on, FirstStep, Measurement};
pub use report::Summary;

pub use super::machine::Machine;

/// The default model: all-MiniLM-L6-v2's architecture with random weights.
pub const DEFAULT_MODEL: &str = "minilm-shaped";
/// The model of the reduced grid (`--quick`).
pub const QUICK_MODEL: &str = "tiny-bert";
/// Tokens per sequence.
pub const SEQUENCE_LENGTH: usize = 32;
/// Timed meta-iterations per point (after one warm-up).
pub const DEFAULT_ITERATIONS: usize = 3;

/// The methods of the grid, in table order: full-graph MAML (the reference),
/// recompute MAML, FOMAML, Reptile and MELoRA with each Hessian approximation.
pub const VARIANTS: [Variant; 7] = [
    Variant::MamlFullGraph,
    Variant::Maml,
    Variant::Fomaml,
    Variant::Reptile,
    Variant::MeloraDiagonal,
    Variant::MeloraGaussNewton,
    Variant::MeloraBlockDiagonal,
];

/// The method of a variant as the rows name it: `maml`, `fomaml`, `reptile`, `melora`.
pub fn method_of(variant: Variant) -> Method {
    variant.apply(&Config::default()).meta_learning.method
}

/// What distinguishes a variant within its method: `full_graph` or `recompute` for
/// MAML, the Hessian approximation for MELoRA, `None` otherwise.
pub fn mode_of(variant: Variant) -> Option<String> {
    let c = variant.apply(&Config::default());
    match c.meta_learning.method {
        Method::Maml | Method::Metasgd => Some(c.meta_learning.inner.mode.to_string()),
        Method::Melora => Some(c.memory_optimization.hessian_approximation.kind.to_string()),
        _ => None,
    }
}

/// A variant as tables and plots show it: `maml (full graph)`, `melora (diagonal)`.
pub fn label(variant: Variant) -> String {
    crate::config::LearnerSpec::of(&variant.apply(&Config::default())).label()
}

/// One configuration of the grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GridPoint {
    /// Method (and mode or Hessian approximation).
    pub variant: Variant,
    /// Inner steps K.
    pub k: usize,
    /// Gradient checkpointing (every layer's input kept).
    pub checkpointing: bool,
    /// Precision of the frozen base and the activations.
    pub precision: Precision,
}

impl std::fmt::Display for GridPoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}, K={}, checkpointing {}, {}",
            label(self.variant),
            self.k,
            if self.checkpointing { "on" } else { "off" },
            self.precision
        )
    }
}

/// The axes of the grid; every combination is one point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grid {
    /// Methods.
    pub variants: Vec<Variant>,
    /// Inner steps.
    pub ks: Vec<usize>,
    /// Checkpointing off and/or on.
    pub checkpointing: Vec<bool>,
    /// Precisions.
    pub precisions: Vec<Precision>,
}

impl Grid {
    /// The whole grid: every method, K ∈ {1, 2, 4, 8}, checkpointing off and on,
    /// f32 and bf16.
    pub fn full() -> Self {
        Grid {
            variants: VARIANTS.to_vec(),
            ks: vec![1, 2, 4, 8],
            checkpointing: vec![false, true],
            precisions: vec![Precision::F32, Precision::Bf16],
        }
    }

    /// The reduced grid of `--quick` (on [`quick_config`]): every method, K ∈ {1, 8},
    /// checkpointing off and on, f32.
    pub fn quick() -> Self {
        Grid {
            variants: VARIANTS.to_vec(),
            ks: vec![1, 8],
            checkpointing: vec![false, true],
            precisions: vec![Precision::F32],
        }
    }

    /// Every point, the headline ones first: by precision, then checkpointing, then
    /// method, then K.
    pub fn points(&self) -> Vec<GridPoint> {
        let mut points = Vec::new();
        for &precision in &self.precisions {
            for &checkpointing in &self.checkpointing {
                for &variant in &self.variants {
                    for &k in &self.ks {
                        points.push(GridPoint {
                            variant,
                            k,
                            checkpointing,
                            precision,
                        });
                    }
                }
            }
        }
        points
    }
}

/// Where the model comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BenchModel {
    /// A built-in model by name, with seeded random weights.
    Builtin(String),
    /// A Hugging Face model folder (`config.json`, `model.safetensors`).
    Directory(PathBuf),
}

/// The benchmark's configuration: the defaults with `model`, 5-way 5-shot 5-query
/// tasks of [`SEQUENCE_LENGTH`] tokens, LoRA r=8 on the model's default targets
/// (query and value for BERT) plus the head, meta-batch 4 (the rest as
/// [`Config::default`]). The grid then sets the method, K, checkpointing and precision.
pub fn bench_config(model: &BenchModel) -> Config {
    let mut c = Config::default();
    set_model(&mut c, model);
    c.model.max_length = SEQUENCE_LENGTH;
    c.lora.rank = 8;
    c.data.n_way = 5;
    c.data.k_shot = 5;
    c.data.n_query = 5;
    c.meta_learning.meta_batch_size = 4;
    c
}

/// Tasks per meta-iteration of the reduced grid (`--quick`): each task's meta-step
/// runs after the previous one's is freed, so the peak barely depends on it, while the
/// time is proportional.
pub const QUICK_META_BATCH: usize = 1;

/// The configuration of the reduced grid: [`bench_config`] on [`QUICK_MODEL`] with
/// meta-batches of [`QUICK_META_BATCH`] task.
pub fn quick_config() -> Config {
    let mut c = bench_config(&BenchModel::Builtin(QUICK_MODEL.into()));
    c.meta_learning.meta_batch_size = QUICK_META_BATCH;
    c
}

/// `config` with its model replaced by `model`.
pub fn set_model(config: &mut Config, model: &BenchModel) {
    match model {
        BenchModel::Builtin(name) => {
            config.model.name = name.clone();
            config.model.path = None;
        }
        BenchModel::Directory(dir) => {
            config.model.name = dir
                .file_name()
                .map_or("model".into(), |n| n.to_string_lossy().to_string());
            config.model.path = Some(dir.clone());
        }
    }
}

/// The configuration of one point: `base` with the point's method, K, checkpointing
/// and precision (not validated: a combination the configuration refuses is skipped).
pub fn row_config(base: &Config, point: &GridPoint) -> Config {
    let mut c = point.variant.apply(base);
    c.meta_learning.inner.steps = point.k;
    c.memory_optimization.checkpointing.enabled = point.checkpointing;
    c.memory_optimization.precision = point.precision;
    c
}

/// The planner's prediction of the peak heap bytes of the meta-steps with `config`
/// (`step_peak_bytes` of
/// [`crate::plan::plan_with`]): the one place the benchmark asks the
/// planner. Loading is left out, as the measurement starts after the warm-up; where
/// loading peaks higher (random weights are drawn in f64, a weights file is read
/// whole), the whole run's peak would overstate what is measured. `Err` says why
/// there is none (the planner refused the configuration).
pub fn predicted_bytes(config: &Config) -> std::result::Result<u64, String> {
    // The benchmark's tasks have every sequence at max_length (`measure::tasks`),
    // whatever data the configuration names.
    let options = crate::plan::PlanOptions {
        tasks: crate::plan::PlannedTasks::Longest,
        ..crate::plan::PlanOptions::default()
    };
    crate::plan::plan_with(config, &options)
        .map(|plan| plan.step_peak_bytes())
        .map_err(|e| format!("the planner refused the configuration: {e}"))
}

/// The model of the benchmark, as recorded beside the results.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// Built-in name, or the folder's name.
    pub name: String,
    /// The model folder; `None` for a built-in model (random weights).
    pub path: Option<PathBuf>,
    /// Family (`bert`, `distilbert`, `gpt2`, `t5`), where known.
    pub family: Option<String>,
    /// The architecture: the model's `config.json` (or the built-in's equivalent).
    pub architecture: Option<serde_json::Value>,
    /// LoRA rank.
    pub lora_rank: usize,
    /// LoRA scale numerator.
    pub lora_alpha: f64,
    /// Modules with LoRA adapters: `lora.target_modules`, or the family's defaults
    /// (query and value for BERT); `None` for an unknown family. The classification
    /// head is always trained.
    pub lora_targets: Option<Vec<String>>,
    /// Classes per task.
    pub n_way: usize,
    /// Support examples per class.
    pub k_shot: usize,
    /// Query examples per class.
    pub n_query: usize,
    /// Tokens per sequence.
    pub sequence_length: usize,
    /// Tasks per meta-iteration.
    pub meta_batch_size: usize,
    /// Inner learning rate.
    pub inner_lr: f64,
    /// Outer optimiser.
    pub outer_optimizer: String,
    /// Seed of weights, adapters and tasks.
    pub seed: u64,
}

impl ModelInfo {
    /// The model of `config`, its architecture read from the built-in table or the
    /// folder's `config.json`.
    pub fn of(config: &Config) -> Result<Self> {
        let (family, architecture) = match &config.model.path {
            None => match crate::models::load::builtin_config(&config.model.name) {
                Some((family, value)) => (Some(family.to_string()), Some(value)),
                None => (None, None),
            },
            Some(dir) => {
                let file = crate::models::load::ConfigJson::in_dir(dir)?;
                let family = Some(file.model_type().to_owned()).filter(|f| !f.is_empty());
                (family, Some(file.into_value()))
            }
        };
        let lora_targets = config.lora.target_modules.clone().or_else(|| {
            default_targets(family.as_deref()?).map(|t| t.iter().map(|s| s.to_string()).collect())
        });
        Ok(ModelInfo {
            name: config.model.name.clone(),
            path: config.model.path.clone(),
            family,
            architecture,
            lora_rank: config.lora.rank,
            lora_alpha: config.lora.alpha,
            lora_targets,
            n_way: config.data.n_way,
            k_shot: config.data.k_shot,
            n_query: config.data.n_query,
            sequence_length: config.model.max_length,
            meta_batch_size: config.meta_learning.meta_batch_size,
            inner_lr: config.meta_learning.inner.lr,
            outer_optimizer: config.meta_learning.outer.optimizer.to_string(),
            seed: config.seed,
        })
    }

    /// One line for people: `minilm-shaped (bert: 6 layers, width 384, …)`.
    pub fn describe(&self) -> String {
        let arch = self.architecture.as_ref().map(architecture_summary);
        let weights = if self.path.is_some() {
            format!(
                "from {}",
                self.path.as_deref().unwrap_or(Path::new("")).display()
            )
        } else {
            "random weights".to_string()
        };
        let family = self.family.as_deref().unwrap_or("unknown family");
        let targets = self
            .lora_targets
            .as_ref()
            .map_or("the family's default modules".to_string(), |t| t.join(", "));
        format!(
            "{} ({family}{}, {weights}); LoRA r={} on {targets} + head; {}-way {}-shot, {} \
             queries, {} tokens; meta-batch {}",
            self.name,
            arch.map_or(String::new(), |a| format!(": {a}")),
            self.lora_rank,
            self.n_way,
            self.k_shot,
            self.n_query,
            self.sequence_length,
            self.meta_batch_size
        )
    }
}

/// The modules a family adapts when `lora.target_modules` is not set.
fn default_targets(family: &str) -> Option<&'static [&'static str]> {
    use crate::models::{bert, distilbert, gpt2, t5};
    Some(match family {
        "bert" => bert::DEFAULT_TARGETS,
        "distilbert" => distilbert::DEFAULT_TARGETS,
        "gpt2" => gpt2::DEFAULT_TARGETS,
        "t5" => t5::DEFAULT_TARGETS,
        _ => return None,
    })
}

/// `6 layers, width 384, 12 heads, FFN 1536, vocab 30522` from a `config.json` of
/// any supported family.
fn architecture_summary(value: &serde_json::Value) -> String {
    let get = |keys: &[&str]| {
        keys.iter()
            .find_map(|k| value.get(*k).and_then(serde_json::Value::as_u64))
    };
    let parts = [
        (
            get(&["num_hidden_layers", "n_layers", "n_layer", "num_layers"]),
            "layers",
        ),
        (get(&["hidden_size", "dim", "n_embd", "d_model"]), "width"),
        (
            get(&["num_attention_heads", "n_heads", "n_head", "num_heads"]),
            "heads",
        ),
        (get(&["intermediate_size", "hidden_dim", "d_ff"]), "FFN"),
        (get(&["vocab_size"]), "vocab"),
    ];
    parts
        .iter()
        .filter_map(|(v, name)| {
            v.map(|v| match *name {
                "layers" | "heads" => format!("{v} {name}"),
                _ => format!("{name} {v}"),
            })
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// One measured (or failed) point.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemoryRow {
    /// `maml`, `fomaml`, `reptile` or `melora`.
    pub method: Method,
    /// `full_graph` or `recompute` for MAML, the Hessian approximation for MELoRA,
    /// `None` otherwise.
    pub mode: Option<String>,
    /// The method as `comparison.baselines` names it (`maml-full_graph`, ...).
    pub variant: Variant,
    /// Inner steps K.
    pub k: usize,
    /// Gradient checkpointing.
    pub checkpointing: bool,
    /// Precision of the frozen base and the activations.
    pub precision: Precision,
    /// Peak heap bytes of the whole process during the timed meta-iterations.
    pub peak_bytes: Option<u64>,
    /// Peak resident set of the child process (`VmHWM`).
    pub rss_bytes: Option<u64>,
    /// The planner's prediction of `peak_bytes`.
    pub predicted_bytes: Option<u64>,
    /// Why there is no prediction.
    pub prediction_note: Option<String>,
    /// Median seconds of the timed meta-iterations.
    pub seconds_per_iter: Option<f64>,
    /// Every timed meta-iteration, seconds.
    pub seconds: Vec<f64>,
    /// Heap bytes held when the timed iterations started (model, parameters, optimiser
    /// state, prefetched episodes, the runtime's thread pools): `peak_bytes` minus this
    /// is what a meta-iteration adds.
    pub baseline_bytes: Option<u64>,
    /// Heap bytes of the built model and its trainable parameters.
    pub model_bytes: Option<u64>,
    /// Threads candle's kernels ran on.
    pub kernel_threads: Option<usize>,
    /// When the point finished (UTC, ISO 8601): points of a resumed benchmark were
    /// measured in different sessions.
    #[serde(default)]
    pub measured_at: Option<String>,
    /// The machine's 1-, 5- and 15-minute load averages when the point finished
    /// (`/proc/loadavg`): other work slows the timings down.
    #[serde(default)]
    pub load_average: Option<[f64; 3]>,
    /// Why the measurement failed (`None` when it succeeded).
    pub error: Option<String>,
}

impl MemoryRow {
    /// The row of `point`, with the measurement or the error that stopped it.
    pub fn new(
        point: &GridPoint,
        predicted: std::result::Result<u64, String>,
        measured: std::result::Result<Measurement, String>,
    ) -> Self {
        let (predicted_bytes, prediction_note) = match predicted {
            Ok(b) => (Some(b), None),
            Err(note) => (None, Some(note)),
        };
        let mut row = MemoryRow {
            method: method_of(point.variant),
            mode: mode_of(point.variant),
            variant: point.variant,
            k: point.k,
            checkpointing: point.checkpointing,
            precision: point.precision,
            peak_bytes: None,
            rss_bytes: None,
            predicted_bytes,
            prediction_note,
            seconds_per_iter: None,
            seconds: Vec::new(),
            baseline_bytes: None,
            model_bytes: None,
            kernel_threads: None,
            measured_at: Some(super::machine::utc_now()),
            load_average: super::machine::load_average(),
            error: None,
        };
        match measured {
            Ok(m) => {
                row.peak_bytes = m.peak_bytes;
                row.rss_bytes = m.rss_bytes;
                row.seconds_per_iter = Some(m.seconds_per_iter);
                row.seconds = m.seconds;
                row.baseline_bytes = m.baseline_bytes;
                row.model_bytes = m.model_bytes;
                row.kernel_threads = Some(m.kernel_threads);
            }
            Err(e) => row.error = Some(e),
        }
        row
    }

    /// The grid point of this row.
    pub fn point(&self) -> GridPoint {
        GridPoint {
            variant: self.variant,
            k: self.k,
            checkpointing: self.checkpointing,
            precision: self.precision,
        }
    }
}

/// Where a point sorts in tables: by precision, then checkpointing, then method (in
/// [`VARIANTS`] order), then K, as [`Grid::points`] lists them.
fn order_key(point: &GridPoint) -> (usize, bool, usize, usize) {
    let precision = Precision::ALL.iter().position(|&p| p == point.precision);
    let variant = VARIANTS.iter().position(|&v| v == point.variant);
    (
        precision.unwrap_or(usize::MAX),
        point.checkpointing,
        variant.unwrap_or(usize::MAX),
        point.k,
    )
}

/// A point the configuration refuses (e.g. f16 with checkpointing): not run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SkippedRow {
    /// `maml`, `fomaml`, `reptile` or `melora`.
    pub method: Method,
    /// As in [`MemoryRow::mode`].
    pub mode: Option<String>,
    /// Inner steps K.
    pub k: usize,
    /// Gradient checkpointing.
    pub checkpointing: bool,
    /// Precision.
    pub precision: Precision,
    /// The configuration's error.
    pub reason: String,
}

impl SkippedRow {
    /// `point`, refused for `reason`.
    pub fn new(point: &GridPoint, reason: String) -> Self {
        SkippedRow {
            method: method_of(point.variant),
            mode: mode_of(point.variant),
            k: point.k,
            checkpointing: point.checkpointing,
            precision: point.precision,
            reason,
        }
    }

    /// The grid point, where the method and mode name a variant.
    pub fn point(&self) -> Option<GridPoint> {
        let variant = *VARIANTS
            .iter()
            .find(|&&v| method_of(v) == self.method && mode_of(v) == self.mode)?;
        Some(GridPoint {
            variant,
            k: self.k,
            checkpointing: self.checkpointing,
            precision: self.precision,
        })
    }

    fn is_point(&self, other: &SkippedRow) -> bool {
        (
            self.method,
            &self.mode,
            self.k,
            self.checkpointing,
            self.precision,
        ) == (
            other.method,
            &other.mode,
            other.k,
            other.checkpointing,
            other.precision,
        )
    }
}

/// Everything `melora bench memory` writes to `memory.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemoryBench {
    /// The model and the task shape.
    pub model: ModelInfo,
    /// The machine.
    pub machine: Machine,
    /// When the benchmark started (UTC, ISO 8601).
    pub date: String,
    /// Whether this is the reduced grid of `--quick`.
    pub quick: bool,
    /// Timed meta-iterations per point, after one warm-up.
    pub iterations: usize,
    /// Where the points ran (`cpu`, `cuda:0`), and so whose memory the peaks are:
    /// the heap's on the CPU, the GPU's otherwise.
    #[serde(default = "cpu_name")]
    pub device: String,
    /// Points of the grid (measured, failed or skipped).
    pub points: usize,
    /// What the figures mean.
    pub notes: Vec<String>,
    /// One per measured point, in grid order (a failed point has `error` set).
    pub rows: Vec<MemoryRow>,
    /// Points the configuration refuses.
    pub skipped: Vec<SkippedRow>,
    /// Each method against full-graph MAML, and the acceptance check of recompute
    /// MAML at the largest K (recomputed from `rows`).
    pub summary: Summary,
}

fn cpu_name() -> String {
    "cpu".into()
}

/// What the figures mean, written into the results.
pub const NOTES: [&str; 4] = [
    "peak_bytes: highest heap bytes held by the whole process (counting allocator) during \
     the timed meta-iterations after one warm-up: model weights, trainable parameters, \
     optimiser state, prefetched episodes and the meta-step; loading and the warm-up are \
     outside it (with --device cuda: the GPU's memory, from its memory pool, instead of \
     the heap)",
    "rss_bytes: peak resident set (VmHWM) of the child process that measured the row, \
     loading included; also counts code, thread stacks and cached allocator memory",
    "predicted_bytes: the memory planner's prediction of peak_bytes (null where no \
     prediction was available: see prediction_note)",
    "seconds_per_iter: median of the timed meta-iterations; each row runs in its own \
     process, one after another",
];

impl MemoryBench {
    /// An empty benchmark of `model` with `points` points, started now.
    pub fn new(model: ModelInfo, quick: bool, iterations: usize, points: usize) -> Self {
        MemoryBench {
            model,
            machine: Machine::current(),
            date: super::machine::utc_now(),
            quick,
            iterations,
            device: cpu_name(),
            points,
            notes: NOTES.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
            skipped: Vec::new(),
            summary: Summary::default(),
        }
    }

    /// Adds a measured (or failed) row, replacing an earlier row of the same point,
    /// keeps the rows in grid order and refreshes the summary.
    pub fn push(&mut self, row: MemoryRow) {
        let point = row.point();
        self.rows.retain(|r| r.point() != point);
        self.rows.push(row);
        self.rows.sort_by_key(|r| order_key(&r.point()));
        self.refresh();
    }

    /// Adds a skipped point (replacing an earlier entry of the same point).
    pub fn skip(&mut self, row: SkippedRow) {
        self.skipped.retain(|r| !r.is_point(&row));
        self.skipped.push(row);
        self.refresh();
    }

    /// Whether `point` already has a successful measurement.
    pub fn has_measured(&self, point: &GridPoint) -> bool {
        self.rows
            .iter()
            .any(|r| r.error.is_none() && r.point() == *point)
    }

    /// Reads a `memory.json` written by [`write`](Self::write).
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        serde_json::from_str(&text).map_err(|e| Error::Format {
            path: path.to_path_buf(),
            message: format!("{e} (not the memory.json of `melora bench memory`?)"),
        })
    }

    /// Continues `previous`, an earlier run's results: keeps its rows, skipped points
    /// and start date, so that only points it lacks (or that failed) are measured and
    /// everything lands in one table. `grid` is this run's points; the total counts
    /// both runs' points once. Refuses results of another model, task shape, grid
    /// kind, iteration count or machine, whose figures would not compare.
    pub fn resume(
        &mut self,
        previous: MemoryBench,
        grid: &[GridPoint],
    ) -> std::result::Result<(), String> {
        let mismatch = |what: &str, before: String, now: String| {
            let what = if what.is_empty() {
                String::new()
            } else {
                format!("{what} ")
            };
            Err(format!(
                "they were measured with {what}{before}, this run would use {now}"
            ))
        };
        if previous.model != self.model {
            return mismatch(
                "the model",
                previous.model.describe(),
                self.model.describe(),
            );
        }
        if previous.quick != self.quick {
            let kind = |quick: bool| if quick { "--quick" } else { "no --quick" };
            return mismatch("", kind(previous.quick).into(), kind(self.quick).into());
        }
        if previous.iterations != self.iterations {
            return mismatch(
                "--iterations",
                previous.iterations.to_string(),
                self.iterations.to_string(),
            );
        }
        let (a, b) = (&previous.machine, &self.machine);
        if (&a.cpu, a.logical_cpus, a.kernel_threads) != (&b.cpu, b.logical_cpus, b.kernel_threads)
        {
            return mismatch("the machine", a.describe(), b.describe());
        }
        let mut points: Vec<GridPoint> = grid.to_vec();
        for p in previous
            .rows
            .iter()
            .map(MemoryRow::point)
            .chain(previous.skipped.iter().filter_map(SkippedRow::point))
        {
            if !points.contains(&p) {
                points.push(p);
            }
        }
        self.points = points.len();
        self.date = previous.date;
        self.machine.load_average_start = previous.machine.load_average_start;
        self.rows = previous.rows;
        self.skipped = previous.skipped;
        self.rows.sort_by_key(|r| order_key(&r.point()));
        self.refresh();
        Ok(())
    }

    fn refresh(&mut self) {
        self.summary = Summary::of(&self.rows);
        self.machine.load_average_end = super::machine::load_average();
    }

    /// Writes `memory.json`, `memory.md` and the plots (`memory.png`/`.svg`, and one
    /// per other precision/checkpointing combination) into `dir`, each atomically.
    /// Returns the paths of the JSON, the Markdown and the main PNG.
    pub fn write(&self, dir: &Path) -> Result<(PathBuf, PathBuf, PathBuf)> {
        let json_path = dir.join("memory.json");
        let json = serde_json::to_string_pretty(self).map_err(|e| Error::Format {
            path: json_path.clone(),
            message: e.to_string(),
        })?;
        crate::io::write_atomic(&json_path, format!("{json}\n").as_bytes())?;
        let png = self.plot(dir)?;
        let md_path = dir.join("memory.md");
        crate::io::write_atomic(&md_path, self.to_markdown().as_bytes())?;
        Ok((json_path, md_path, png))
    }
}

#[cfg(test)]
mod tests;
