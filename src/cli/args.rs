//! The command line's grammar: global flags and subcommands.

use std::path::PathBuf;

use clap::builder::PossibleValue;
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::{BatchNormEvaluation, ConfigOverrides, Method, Precision, Variant};

/// Memory-efficient meta-learning (MAML, FOMAML, Reptile, MELoRA) of LoRA
/// adapters, with measured memory.
#[derive(Debug, Parser)]
#[command(
    name = "melora",
    version,
    subcommand_required = true,
    arg_required_else_help = true
)]
pub(crate) struct Cli {
    #[command(flatten)]
    pub(crate) global: GlobalArgs,

    #[command(subcommand)]
    pub(crate) command: Command,
}

/// Flags accepted before or after any subcommand. All but `--config` replace
/// one value of the configuration (see [`ConfigOverrides`]).
#[derive(Debug, Args)]
#[command(next_help_heading = "Configuration")]
pub(crate) struct GlobalArgs {
    /// YAML configuration file; without it, the built-in defaults
    #[arg(long, global = true, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,

    /// Model: a built-in tiny model or a Hugging Face family [model.name]
    #[arg(long, global = true, value_name = "NAME")]
    pub(crate) model: Option<String>,

    /// LoRA rank [lora.rank]
    #[arg(long, global = true, value_name = "R", allow_negative_numbers = true)]
    pub(crate) lora_rank: Option<usize>,

    /// LoRA scale numerator [lora.alpha]
    #[arg(
        long,
        global = true,
        value_name = "ALPHA",
        allow_negative_numbers = true
    )]
    pub(crate) lora_alpha: Option<f64>,

    /// Learning method [meta_learning.method]
    #[arg(long, global = true, value_name = "METHOD")]
    pub(crate) method: Option<Method>,

    /// Tasks per outer step [meta_learning.meta_batch_size]
    #[arg(long, global = true, value_name = "N", allow_negative_numbers = true)]
    pub(crate) meta_batch_size: Option<usize>,

    /// Inner gradient steps per task [meta_learning.inner.steps]
    #[arg(long, global = true, value_name = "K", allow_negative_numbers = true)]
    pub(crate) inner_steps: Option<usize>,

    /// Inner learning rate [meta_learning.inner.lr]
    #[arg(long, global = true, value_name = "LR", allow_negative_numbers = true)]
    pub(crate) inner_lr: Option<f64>,

    /// Outer learning rate [meta_learning.outer.lr]
    #[arg(long, global = true, value_name = "LR", allow_negative_numbers = true)]
    pub(crate) outer_lr: Option<f64>,

    /// Outer steps of meta-training [meta_learning.num_iterations]
    #[arg(long, global = true, value_name = "N", allow_negative_numbers = true)]
    pub(crate) num_iterations: Option<usize>,

    /// Classes per episode [data.n_way]
    #[arg(long, global = true, value_name = "N", allow_negative_numbers = true)]
    pub(crate) n_way: Option<usize>,

    /// Support examples per class [data.k_shot]
    #[arg(long, global = true, value_name = "K", allow_negative_numbers = true)]
    pub(crate) k_shot: Option<usize>,

    /// Query examples per class [data.n_query]
    #[arg(long, global = true, value_name = "N", allow_negative_numbers = true)]
    pub(crate) n_query: Option<usize>,

    /// Seed of every random choice [seed]
    #[arg(
        long,
        global = true,
        value_name = "SEED",
        allow_negative_numbers = true
    )]
    pub(crate) seed: Option<u64>,

    /// Where tensors live and ops run: cpu, cuda or cuda:N (CUDA needs the `cuda`
    /// build) [device]
    #[arg(long, global = true, value_name = "DEVICE")]
    pub(crate) device: Option<crate::config::ComputeDevice>,

    /// Use synthetic tasks whatever the data source [data.synthetic_only]
    #[arg(long, global = true)]
    pub(crate) synthetic_only: bool,

    /// Name of the run's output folder [tracking.experiment_name]
    #[arg(long, global = true, value_name = "NAME")]
    pub(crate) experiment_name: Option<String>,

    /// Folder of all runs' outputs [tracking.output_dir]
    #[arg(long, global = true, value_name = "DIR")]
    pub(crate) output: Option<PathBuf>,

    /// Peak-heap limit such as 4GiB: pick a configuration that fits, hold the run
    /// to it [memory_optimization.budget.limit]
    #[arg(long, global = true, value_name = "SIZE")]
    pub(crate) memory_budget: Option<String>,
}

impl GlobalArgs {
    /// The configuration values given as flags.
    pub(crate) fn overrides(&self) -> ConfigOverrides {
        ConfigOverrides {
            model: self.model.clone(),
            lora_rank: self.lora_rank,
            lora_alpha: self.lora_alpha,
            meta_batch_size: self.meta_batch_size,
            inner_steps: self.inner_steps,
            inner_lr: self.inner_lr,
            outer_lr: self.outer_lr,
            num_iterations: self.num_iterations,
            n_way: self.n_way,
            k_shot: self.k_shot,
            n_query: self.n_query,
            method: self.method,
            seed: self.seed,
            device: self.device,
            // A flag can only turn it on; absent, the file decides.
            synthetic_only: self.synthetic_only.then_some(true),
            experiment_name: self.experiment_name.clone(),
            output_dir: self.output.clone(),
            memory_budget: self.memory_budget.clone(),
        }
    }
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Print the resolved configuration (file or defaults, then flags) as YAML
    Config(ConfigArgs),
    /// Check this installation: every op's first and second derivatives against
    /// finite differences, and memory measurement
    Check(CheckArgs),
    /// Measure parts of the system (results written to --output, default bench-results/)
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Meta-train the configured method, with validation and best/last checkpoints
    /// in OUTPUT/EXPERIMENT/RUN/; Ctrl-C saves a checkpoint and stops
    Train(TrainArgs),
    /// Adapt a checkpoint (or the untrained model) on the fixed meta-test episodes and
    /// report accuracy ± confidence interval, macro-F1, loss, adaptation time, memory
    Evaluate(EvaluateArgs),
    /// Train and evaluate the configured method and every baseline on the same tasks,
    /// compare them with paired statistics, and write the report
    Full(FullArgs),
    /// Redraw the plots and report of an experiment folder written by `full`
    Report(ReportArgs),
    /// Put the results of several `full` experiments on the same test tasks together:
    /// the comparison table, the first experiment's method against every other, and
    /// every method with meta-learning against the best baseline, paired by episode
    Compare(CompareArgs),
    /// Adapt a checkpoint to your own labelled examples (--support) and predict new
    /// ones (--query): one JSON line per query item with the predicted label and the
    /// probability of each label
    Adapt(AdaptArgs),
    /// Write a checkpoint's adapter (LoRA and head) as a PEFT adapter folder
    Export(ExportArgs),
    /// Predict the peak memory of the configuration before running it, broken down,
    /// and compared across methods
    Plan(PlanArgs),
    /// Run a few meta-iterations of the configuration: measured peak memory (heap and
    /// RSS) and time per iteration beside the planner's prediction
    Profile(ProfileArgs),
}

#[derive(Debug, Args)]
pub(crate) struct TrainArgs {
    /// Continue from this checkpoint folder (e.g. runs/default/maml-seed42/last)
    #[arg(long, value_name = "DIR")]
    pub(crate) resume: Option<PathBuf>,

    /// Name of the run's folder [tracking.run_name]
    #[arg(long, value_name = "NAME")]
    pub(crate) run_name: Option<String>,
}

#[derive(Debug, Args)]
pub(crate) struct EvaluateArgs {
    /// Checkpoint folder to evaluate (its configuration is used unless --config is
    /// given); without it, the untrained model of the configuration
    #[arg(long, value_name = "DIR")]
    pub(crate) checkpoint: Option<PathBuf>,

    /// Test episodes [evaluation.episodes]
    #[arg(long, value_name = "N")]
    pub(crate) episodes: Option<usize>,

    /// BatchNorm statistics of a vision backbone: batch (each set's own) or running
    /// (estimated over training episodes) [evaluation.batch_norm]
    #[arg(long, value_name = "STATS")]
    pub(crate) batch_norm: Option<BatchNormEvaluation>,

    /// Print the per-episode results as JSON instead of the summary
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct FullArgs {
    /// Run only the configured method (and the ablation, if configured)
    #[arg(long)]
    pub(crate) skip_baselines: bool,

    /// Training seeds per method [comparison.seeds]
    #[arg(long, value_name = "N")]
    pub(crate) seeds: Option<usize>,

    /// Keep the runs an earlier `full` of this experiment finished with the same
    /// configuration (its results.json is copied to results.before-resume.json first),
    /// continue a meta-training it left unfinished from its last checkpoint, and run
    /// only the rest. For a comparison of many hours, run in pieces
    #[arg(long)]
    pub(crate) resume: bool,
}

#[derive(Debug, Args)]
pub(crate) struct AdaptArgs {
    /// Checkpoint folder (e.g. runs/quickstart/maml-seed42/best); its configuration
    /// says how items are read and adapted
    #[arg(long, value_name = "DIR")]
    pub(crate) checkpoint: PathBuf,

    /// Labelled examples: a JSONL or CSV file of texts with a label column, or a folder
    /// with one subfolder of PNG images per class
    #[arg(long, value_name = "FILE_OR_DIR")]
    pub(crate) support: PathBuf,

    /// Items to predict: a JSONL or CSV file of texts (a label column is optional, and
    /// scores the predictions), or a folder of PNG images (or of class subfolders)
    #[arg(long, value_name = "FILE_OR_DIR")]
    pub(crate) query: PathBuf,

    /// Write the predictions (JSON lines) here instead of standard output
    #[arg(long, value_name = "FILE")]
    pub(crate) output: Option<PathBuf>,

    /// Also write the adapted adapter as a PEFT folder
    #[arg(long, value_name = "DIR")]
    pub(crate) save_adapter: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub(crate) struct ExportArgs {
    /// Checkpoint folder whose parameters are written
    #[arg(long, value_name = "DIR")]
    pub(crate) checkpoint: PathBuf,

    /// The adapter folder to write (adapter_config.json, adapter_model.safetensors)
    #[arg(long, value_name = "DIR")]
    pub(crate) output: PathBuf,
}

#[derive(Debug, Args)]
pub(crate) struct ReportArgs {
    /// The experiment folder (OUTPUT/EXPERIMENT) holding results.json
    #[arg(value_name = "DIR")]
    pub(crate) dir: PathBuf,
}

#[derive(Debug, Args)]
pub(crate) struct CompareArgs {
    /// Experiment folders (OUTPUT/EXPERIMENT) holding results.json, scored on the same
    /// test tasks; the first one's configured method is compared with every other
    #[arg(value_name = "DIR", required = true, num_args = 1..)]
    pub(crate) dirs: Vec<PathBuf>,

    /// Also write the merged results.json and its report into this folder
    #[arg(long, value_name = "DIR")]
    pub(crate) output: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub(crate) struct PlanArgs {
    /// Methods of the comparison table, by their names in comparison.baselines
    /// (maml-full_graph, maml, fomaml, reptile, melora-diagonal, finetune, ...), or
    /// melora for MELoRA with the configured Hessian approximation [default:
    /// maml-full_graph,fomaml,reptile,melora]
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    pub(crate) methods: Vec<String>,

    /// Print the plans as JSON
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct ProfileArgs {
    /// Meta-iterations measured, after one warm-up iteration
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub(crate) iterations: usize,

    /// Print the results as JSON
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Debug, Subcommand)]
pub(crate) enum BenchCommand {
    /// Decoding and batching speed of real data: 1,000 Omniglot episodes (20-way
    /// 1-shot, 5 queries) and 1,000 WordNet episodes (5-way 5-shot, 5 queries)
    Data(BenchDataArgs),
    /// Peak memory (counting allocator and RSS), the planner's prediction and seconds
    /// per meta-iteration for each method × inner steps K × checkpointing × precision
    /// on a MiniLM-shaped model; writes memory.json, memory.md and memory.png
    Memory(BenchMemoryArgs),
    /// One point of `bench memory`, measured in this process: reads the configuration
    /// (YAML) from standard input and prints the measurement as JSON
    #[command(hide = true)]
    MemoryRow(BenchMemoryRowArgs),
    /// The FS-CT reference project's memory scenario: FS-CT + VIC on ResNet-34 and
    /// ResNet-18, 5-way 5-shot 16-query RGB images at 84 and 224 px, under each
    /// memory setting: the planner's prediction, the measured peak where it fits,
    /// the reference's figures; writes fsct-memory.json and fsct-memory.md
    FsctMemory(BenchFsctMemoryArgs),
    /// The planner's prediction for one configuration, in this process: the
    /// configuration (YAML) on standard input, the plan as JSON
    #[command(hide = true)]
    PlanRow,
    /// Seconds per meta-iteration and peak memory of melora and of PyTorch + peft
    /// (bench/pytorch/meta_bench.py) on the same real episodes, for each method × K,
    /// one fresh process per point, alternating; writes speed.json and speed.md
    Speed(BenchSpeedArgs),
    /// One melora point of `bench speed`, measured in this process: the configuration
    /// (YAML) on standard input, the measurement as JSON
    #[command(hide = true)]
    SpeedRow(BenchSpeedRowArgs),
}

#[derive(Debug, Args)]
pub(crate) struct BenchSpeedArgs {
    /// The Hugging Face model folder both programs load (all-MiniLM-L6-v2:
    /// scripts/fetch-minilm.sh)
    #[arg(long, value_name = "DIR")]
    pub(crate) model_dir: PathBuf,

    /// The episodes both programs read; sampled from WordNet (5-way 5-shot 5-query,
    /// 32 tokens at most, meta-batches of 4) and written there if the file does not
    /// exist (default: episodes.json in the output folder)
    #[arg(long, value_name = "FILE")]
    pub(crate) episodes: Option<PathBuf>,

    /// Methods: maml-full_graph, maml (recompute), fomaml, reptile, melora-diagonal,
    /// melora-gauss_newton (both MAML modes are compared with PyTorch's MAML)
    #[arg(
        long,
        value_name = "LIST",
        value_delimiter = ',',
        default_value = "fomaml,reptile,maml-full_graph,maml,melora-diagonal,melora-gauss_newton"
    )]
    pub(crate) methods: Vec<Variant>,

    /// Inner-step counts K
    #[arg(
        long = "k",
        value_name = "LIST",
        value_delimiter = ',',
        default_value = "1,2,4,8"
    )]
    pub(crate) ks: Vec<usize>,

    /// Timed meta-iterations per point, after one warm-up (the median is reported)
    #[arg(long, value_name = "N", default_value_t = 5)]
    pub(crate) iterations: usize,

    /// Threads of each program's kernels (default: every processor)
    #[arg(long, value_name = "N")]
    pub(crate) threads: Option<usize>,

    /// The Python interpreter with torch, transformers and peft
    /// (pip install -r bench/pytorch/requirements.txt)
    #[arg(long, value_name = "PYTHON", default_value = "python3")]
    pub(crate) python: PathBuf,

    /// The PyTorch script
    #[arg(
        long,
        value_name = "FILE",
        default_value = "bench/pytorch/meta_bench.py"
    )]
    pub(crate) script: PathBuf,

    /// Measure melora only (no PyTorch column)
    #[arg(long)]
    pub(crate) melora_only: bool,
}

#[derive(Debug, Args)]
pub(crate) struct BenchSpeedRowArgs {
    /// The episodes file
    #[arg(long, value_name = "FILE")]
    pub(crate) episodes: PathBuf,

    /// Timed meta-iterations, after one warm-up
    #[arg(long, value_name = "N")]
    pub(crate) iterations: usize,
}

#[derive(Debug, Args)]
pub(crate) struct BenchMemoryArgs {
    /// The reduced grid: the built-in tiny-bert, meta-batches of 1 task, K in {1, 8},
    /// f32, kernels on 1 thread (same schema; about a minute on 2 cores)
    #[arg(long)]
    pub(crate) quick: bool,

    /// A Hugging Face model folder (config.json, model.safetensors) to measure instead
    /// of the random-weight MiniLM-shaped model
    #[arg(long, value_name = "DIR")]
    pub(crate) model_dir: Option<PathBuf>,

    /// Timed meta-iterations per point, after one warm-up (the median is reported)
    #[arg(long, value_name = "N", default_value_t = crate::bench::memory::DEFAULT_ITERATIONS)]
    pub(crate) iterations: usize,

    /// Threads of candle's kernels in each measuring process (RAYON_NUM_THREADS);
    /// default: every processor, or 1 with --quick (the tiny model's kernels are too
    /// small to split, and spinning threads slow a busy machine down)
    #[arg(long, value_name = "N")]
    pub(crate) threads: Option<usize>,

    /// Only these methods: maml-full_graph, maml (recompute), fomaml, reptile,
    /// melora-diagonal, melora-gauss_newton, melora-block_diagonal, metasgd, or a
    /// baseline (no-adaptation, prototype, lora-finetune, finetune,
    /// pretrain-finetune), whose point is one test task's adaptation
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    pub(crate) methods: Vec<Variant>,

    /// Only these inner-step counts K (default 1,2,4,8; with --quick 1,8)
    #[arg(long = "k", value_name = "LIST", value_delimiter = ',')]
    pub(crate) ks: Vec<usize>,

    /// Only these checkpointing settings: off, on (default both)
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    pub(crate) checkpointing: Vec<OnOff>,

    /// Only these precisions: f32, bf16, f16 (default f32,bf16; with --quick f32)
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    pub(crate) precision: Vec<Precision>,

    /// Add to the memory.json already in the output folder instead of replacing it:
    /// points it measured are kept (not run again), failed ones are run again, and
    /// the table covers both runs. For measuring a long grid in pieces
    #[arg(long)]
    pub(crate) resume: bool,
}

/// A switch given by name on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum OnOff {
    Off,
    On,
}

#[derive(Debug, Args)]
pub(crate) struct BenchFsctMemoryArgs {
    /// Backbones, in table order
    #[arg(long, value_name = "LIST", value_delimiter = ',', default_values_t = ["resnet34".to_string(), "resnet18".to_string()])]
    pub(crate) backbones: Vec<String>,

    /// Image sides
    #[arg(long, value_name = "LIST", value_delimiter = ',', default_values_t = [84, 224])]
    pub(crate) sizes: Vec<usize>,

    /// Memory settings: plain, checkpointing, bf16, bf16-checkpointing, micro-batches
    /// (default all)
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    pub(crate) settings: Vec<crate::bench::fsct_memory::Setting>,

    /// Measure the rows predicted at most this peak, e.g. 8GiB (default: half this
    /// machine's memory)
    #[arg(long, value_name = "SIZE")]
    pub(crate) measure_up_to: Option<String>,

    /// Timed meta-iterations per measured row, after one warm-up
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub(crate) iterations: usize,
}

#[derive(Debug, Args)]
pub(crate) struct BenchMemoryRowArgs {
    /// Timed meta-iterations, after one warm-up
    #[arg(long, value_name = "N", default_value_t = crate::bench::memory::DEFAULT_ITERATIONS)]
    pub(crate) iterations: usize,
}

#[derive(Debug, Args)]
pub(crate) struct BenchDataArgs {
    /// Omniglot zip archive, folder of zips, or extracted folder
    #[arg(long, value_name = "PATH", default_value = "../shared/data/omniglot")]
    pub(crate) omniglot: PathBuf,

    /// Folder of WordNet's data.noun and data.verb
    #[arg(long, value_name = "DIR", default_value = "/usr/share/wordnet")]
    pub(crate) wordnet: PathBuf,

    /// tokenizer.json for the WordNet texts; without it, the built-in word-hash
    /// tokenisation into the tiny models' vocabulary (1000 ids)
    #[arg(long, value_name = "FILE")]
    pub(crate) tokenizer: Option<PathBuf>,

    /// Episodes per data set
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub(crate) episodes: usize,
}

#[derive(Debug, Args)]
pub(crate) struct CheckArgs {
    /// Print the results as JSON
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct ConfigArgs {
    /// Only validate: print `config OK`, or the error
    #[arg(long)]
    pub(crate) check: bool,
}

impl ValueEnum for Method {
    fn value_variants<'a>() -> &'a [Self] {
        Method::ALL
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        Some(PossibleValue::new(self.as_str()))
    }
}

impl ValueEnum for BatchNormEvaluation {
    fn value_variants<'a>() -> &'a [Self] {
        BatchNormEvaluation::ALL
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        Some(PossibleValue::new(self.as_str()))
    }
}
