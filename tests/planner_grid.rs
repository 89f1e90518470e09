//! The memory planner against the counting allocator: for a grid of tiny models ×
//! methods × inner steps K × micro-batches × dtypes, one meta-step (model built,
//! parameters initialised, episodes created, every task's meta-gradient, the outer
//! update) runs under a `MemoryMeter`, and the planner's prediction for the same
//! configuration must be within 15% of the measured peak on every row.
//!
//! One test in its own process, so that no other test allocates while it measures.
//! `MELORA_PLAN_GRID=<substring>` runs only the rows whose label contains it.
//!
//! To extend the grid (mixed precision, say), add a dimension to [`grid`]: each row
//! is only a [`Config`].

use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};

mod common;
use melora::config::{
    Config, DataSource, HessianKind, InnerMode, Method, Precision, Quantization, SyntheticTask,
    Variant,
};
use melora::data::{Batch, Episode, EpisodeSource, SinusoidTasks};
use melora::memory::{format_bytes, CountingAllocator, MemoryMeter};
use melora::nn::Mode;
use melora::optim::{Optimizer, OptimizerKind};
use melora::plan::{plan_with, PlanOptions, PlannedTasks};
use melora::run::build::{build_adapter, build_engine, build_model, initial_params};
use melora::run::{meta_step, Run};
use melora::tensor::GradGraph;

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// Largest accepted |predicted − measured| / measured.
const TOLERANCE: f64 = 0.15;

/// Tokens per sequence in the text rows (the planner assumes `model.max_length`
/// for data read from files).
const TOKENS: usize = 8;

fn base_config(model: &str) -> Config {
    let mut c = Config::default();
    c.model.name = model.into();
    c.model.max_length = TOKENS;
    c.data.n_way = 3;
    c.data.k_shot = 2;
    c.data.n_query = 1;
    c.meta_learning.meta_batch_size = 2;
    if melora::models::Backbone::from_name(model).is_some() {
        c.data.source = DataSource::Synthetic;
        c.data.synthetic_task = SyntheticTask::Images;
        c.data.n_way = 2;
        c.data.k_shot = 1;
        c.data.n_query = 1;
    } else if model == "mlp" {
        // Sinusoid regression: k_shot support points, n_query query points.
        c.data.source = DataSource::Synthetic;
        c.data.synthetic_task = SyntheticTask::Sinusoid;
        c.data.k_shot = 10;
        c.data.n_query = 10;
    } else {
        // Sequences of exactly max_length tokens, as from a file.
        c.data.source = DataSource::Jsonl;
        c.data.path = Some("unused.jsonl".into());
    }
    c
}

/// (label, method, mode, Hessian approximation).
fn methods() -> Vec<(&'static str, Method, InnerMode, HessianKind)> {
    vec![
        (
            "maml-full",
            Method::Maml,
            InnerMode::FullGraph,
            HessianKind::None,
        ),
        (
            "maml-recompute",
            Method::Maml,
            InnerMode::Recompute,
            HessianKind::None,
        ),
        (
            "fomaml",
            Method::Fomaml,
            InnerMode::Recompute,
            HessianKind::None,
        ),
        (
            "reptile",
            Method::Reptile,
            InnerMode::Recompute,
            HessianKind::None,
        ),
        (
            "melora-none",
            Method::Melora,
            InnerMode::Recompute,
            HessianKind::None,
        ),
        (
            "melora-diagonal",
            Method::Melora,
            InnerMode::Recompute,
            HessianKind::Diagonal,
        ),
        (
            "melora-gn",
            Method::Melora,
            InnerMode::Recompute,
            HessianKind::GaussNewton,
        ),
        (
            "melora-block",
            Method::Melora,
            InnerMode::Recompute,
            HessianKind::BlockDiagonal,
        ),
        (
            "metasgd-full",
            Method::Metasgd,
            InnerMode::FullGraph,
            HessianKind::None,
        ),
        (
            "metasgd-recompute",
            Method::Metasgd,
            InnerMode::Recompute,
            HessianKind::None,
        ),
    ]
}

/// The baselines, which are not meta-trained: the planner predicts one test task's
/// adaptation (and, for pretrain-finetune, its pre-training steps), on every model
/// they apply to.
fn baseline_rows() -> Vec<(String, Config)> {
    let mut rows = Vec::new();
    for model in TEXT_MODELS.iter().chain(&["conv4", "mlp"]) {
        for method in [
            Method::NoAdaptation,
            Method::Prototype,
            Method::LoraFinetune,
            Method::Finetune,
            Method::PretrainFinetune,
        ] {
            let mut c = base_config(model);
            c.meta_learning.method = method;
            c.evaluation.finetune_steps = 2;
            c.comparison.pretrain.batch_size = Some(6);
            if *model == "mlp" {
                // Tasks of 100 points: a baseline's work on 10 is a few KiB, less than
                // the bookkeeping (names, maps) the planner leaves out.
                c.data.k_shot = 100;
                c.data.n_query = 100;
                c.comparison.pretrain.batch_size = Some(200);
            }
            if melora::config::Config::validate(&c).is_err() {
                continue;
            }
            rows.push((format!("{model} {method}"), c));
        }
    }
    rows
}

/// One row of the grid.
fn row(
    model: &str,
    method: (&str, Method, InnerMode, HessianKind),
    k: usize,
    micro: Option<usize>,
) -> (String, Config) {
    let (name, method, mode, kind) = method;
    let mut c = base_config(model);
    c.meta_learning.method = method;
    c.meta_learning.inner.mode = mode;
    c.meta_learning.inner.steps = k;
    c.memory_optimization.hessian_approximation.kind = kind;
    c.memory_optimization.gradient_accumulation.micro_batch = micro;
    let label = format!(
        "{model} {name} K={k} µb={}",
        micro.map_or("-".into(), |m| m.to_string())
    );
    (label, c)
}

const TEXT_MODELS: [&str; 4] = ["tiny-bert", "tiny-distilbert", "tiny-gpt2", "tiny-t5"];

/// A deeper model (all-MiniLM-L6-v2's 6 layers of width 384), where the planner
/// measures 1- and 2-layer instances and extrapolates: second- and first-order
/// methods at K = 1 and 2, with micro-batches, checkpointing (every layer, every
/// other, chosen layers), meta-batches of 5 tasks, bf16 and an int8 base.
fn deep_rows() -> Vec<(String, Config)> {
    let model = "minilm-shaped";
    let all = methods();
    let named = |n: &str| *all.iter().find(|m| m.0 == n).expect("known method");
    let mut rows = Vec::new();
    for name in [
        "maml-full",
        "maml-recompute",
        "fomaml",
        "reptile",
        "melora-gn",
    ] {
        for k in [1, 2] {
            rows.push(row(model, named(name), k, None));
        }
        rows.push(row(model, named(name), 2, Some(3)));
    }
    for name in ["maml-full", "maml-recompute", "melora-gn", "fomaml"] {
        rows.push(checkpointed(model, named(name), 2, None, Ckpt::Every(1)));
        rows.push(checkpointed(model, named(name), 2, None, Ckpt::Every(2)));
        rows.push(checkpointed(
            model,
            named(name),
            2,
            None,
            Ckpt::Layers(vec![1, 3]),
        ));
    }
    for name in ["maml-full", "fomaml"] {
        let (label, mut c) = row(model, named(name), 2, None);
        c.meta_learning.meta_batch_size = 5;
        rows.push((format!("{label} tasks=5"), c));
        let (label, mut c) = checkpointed(model, named(name), 2, None, Ckpt::Every(1));
        c.meta_learning.meta_batch_size = 5;
        rows.push((format!("{label} tasks=5"), c));
    }
    for name in ["maml-recompute", "fomaml"] {
        rows.push(precise(
            model,
            named(name),
            2,
            None,
            Precision::Bf16,
            Quantization::None,
        ));
        rows.push(precise(
            model,
            named(name),
            1,
            None,
            Precision::F32,
            Quantization::Int8,
        ));
    }
    // Sequences of 48 tokens and 12 support examples, where the steps' graphs rather
    // than loading make the peak.
    let longer = |(label, mut c): (String, Config)| {
        c.model.max_length = 48;
        c.data.k_shot = 4;
        (format!("{label} t=48"), c)
    };
    for name in ["maml-full", "maml-recompute", "fomaml", "melora-gn"] {
        rows.push(longer(row(model, named(name), 2, None)));
        rows.push(longer(checkpointed(
            model,
            named(name),
            2,
            None,
            Ckpt::Every(1),
        )));
        rows.push(longer(checkpointed(
            model,
            named(name),
            2,
            None,
            Ckpt::Every(2),
        )));
        rows.push(longer(checkpointed(
            model,
            named(name),
            2,
            None,
            Ckpt::Layers(vec![1, 3]),
        )));
    }
    rows.push(longer(row(model, named("maml-recompute"), 2, Some(4))));
    rows
}

/// f64 rows: one per model for a second- and a first-order method.
fn f64_rows() -> Vec<(String, Config)> {
    let mut rows = Vec::new();
    for model in TEXT_MODELS.iter().chain(&["conv4"]) {
        for (name, method, mode) in [
            ("maml-full", Method::Maml, InnerMode::FullGraph),
            ("fomaml", Method::Fomaml, InnerMode::Recompute),
        ] {
            let mut c = base_config(model);
            c.model.dtype = melora::config::DType::F64;
            c.meta_learning.method = method;
            c.meta_learning.inner.mode = mode;
            c.meta_learning.inner.steps = 2;
            rows.push((format!("{model} {name} K=2 f64"), c));
        }
    }
    rows
}

/// Gradient checkpointing on: `Every(n)` or the chosen layers.
#[derive(Debug, Clone)]
enum Ckpt {
    Every(usize),
    Layers(Vec<usize>),
}

/// `row` with gradient checkpointing.
fn checkpointed(
    model: &str,
    method: (&str, Method, InnerMode, HessianKind),
    k: usize,
    micro: Option<usize>,
    ckpt: Ckpt,
) -> (String, Config) {
    let (label, mut c) = row(model, method, k, micro);
    let section = &mut c.memory_optimization.checkpointing;
    section.enabled = true;
    let what = match ckpt {
        Ckpt::Every(n) => {
            section.every = n;
            format!("every {n}")
        }
        Ckpt::Layers(layers) => {
            let what = format!("layers {layers:?}");
            section.layers = Some(layers);
            what
        }
    };
    (format!("{label} ckpt {what}"), c)
}

/// Checkpointing rows: every method on every text model at K = 2 with one layer per
/// segment, with and without micro-batches; both MAML modes at K = 1 and 4; the
/// chosen-layer plan on every model for the second-order methods.
fn checkpoint_rows() -> Vec<(String, Config)> {
    let mut rows = Vec::new();
    let all = methods();
    for model in TEXT_MODELS {
        for &method in &all {
            for micro in [None, Some(3)] {
                rows.push(checkpointed(model, method, 2, micro, Ckpt::Every(1)));
            }
            if method.1 == Method::Maml {
                for k in [1, 4] {
                    rows.push(checkpointed(model, method, k, None, Ckpt::Every(1)));
                }
            }
            if matches!(method.0, "maml-full" | "maml-recompute" | "melora-gn") {
                rows.push(checkpointed(model, method, 2, None, Ckpt::Layers(vec![1])));
            }
        }
    }
    rows
}

/// Vision backbones with more than two queries per class, which the planner
/// measures with one and two and extrapolates: ProtoNets, FS-CT + VIC and
/// recompute-mode MAML on Conv4 and ResNet-12 (3-way 2-shot 6-query), ResNet-12
/// also with every residual stage checkpointed.
fn vision_rows() -> Vec<(String, Config)> {
    let mut rows = Vec::new();
    let all = methods();
    let maml = *all.iter().find(|m| m.0 == "maml-recompute").unwrap();
    for model in ["conv4", "resnet12"] {
        for method in ["protonet", "fsct_cosine", "maml-recompute"] {
            let (label, mut c) = if method == "maml-recompute" {
                row(model, maml, 1, None)
            } else {
                let (label, mut c) = row(model, maml, 1, None);
                c.meta_learning.method = method.parse().unwrap();
                (label.replace("maml-recompute", method), c)
            };
            c.data.n_way = 3;
            c.data.k_shot = 2;
            c.data.n_query = 6;
            let label = format!("{label} q=6");
            if model == "resnet12" {
                let mut ckpt = c.clone();
                ckpt.memory_optimization.checkpointing.enabled = true;
                rows.push((format!("{label} ckpt every 1"), ckpt));
            }
            rows.push((label, c));
        }
    }
    // A peak flat in the queries until they turn it: MAML's inner loop (two steps,
    // recompute) holds more than the query's passes up to 4 queries per class.
    let (label, mut c) = row("conv4", maml, 2, None);
    c.data.n_way = 5;
    c.data.k_shot = 1;
    c.data.n_query = 15;
    rows.push((format!("{label} 5-way 1-shot q=15"), c));
    rows
}

/// Meta-batches of 5 tasks (the planner replays the first and the last and lets the
/// ones between leave the first's meta-gradient), without and with checkpointing.
fn meta_batch_rows() -> Vec<(String, Config)> {
    let all = methods();
    let mut rows = Vec::new();
    for &method in all
        .iter()
        .filter(|m| matches!(m.0, "maml-full" | "fomaml" | "melora-diagonal"))
    {
        let with = checkpointed("tiny-bert", method, 2, None, Ckpt::Every(1));
        for (label, mut c) in [row("tiny-bert", method, 2, None), with] {
            c.meta_learning.meta_batch_size = 5;
            rows.push((format!("{label} tasks=5"), c));
        }
    }
    let (label, mut c) = row("mlp", all[2], 2, None);
    c.meta_learning.meta_batch_size = 5;
    rows.push((format!("{label} tasks=5"), c));
    rows
}

/// The sinusoid regression's MLP (every parameter trainable, mean squared error):
/// every method at K = 1 and 2, with and without micro-batches.
fn mlp_rows() -> Vec<(String, Config)> {
    let mut rows = Vec::new();
    for method in methods() {
        for k in [1, 2] {
            for micro in [None, Some(3)] {
                rows.push(row("mlp", method, k, micro));
            }
        }
    }
    rows
}

/// Longer sequences (64 tokens), where activations rather than kept gradients make
/// the peak: with and without checkpointing, for first-order, recompute-MAML and
/// Gauss-Newton MELoRA on BERT and GPT-2 (GPT-2's attention mask is `t × t`).
fn long_rows() -> Vec<(String, Config)> {
    let mut rows = Vec::new();
    let all = methods();
    for model in ["tiny-bert", "tiny-gpt2"] {
        for &method in all
            .iter()
            .filter(|m| matches!(m.0, "fomaml" | "maml-recompute" | "melora-gn"))
        {
            let with = checkpointed(model, method, 1, None, Ckpt::Every(1));
            for (label, mut c) in [row(model, method, 1, None), with] {
                c.model.max_length = 64;
                rows.push((format!("{label} t=64"), c));
            }
        }
    }
    rows
}

/// `row` in mixed precision (`precision` bf16/f16: frozen base and activations in
/// two bytes, trainable tensors in f32; f16 under loss scaling) and/or with an int8
/// frozen base.
fn precise(
    model: &str,
    method: (&str, Method, InnerMode, HessianKind),
    k: usize,
    micro: Option<usize>,
    precision: Precision,
    quantization: Quantization,
) -> (String, Config) {
    let (label, mut c) = row(model, method, k, micro);
    c.memory_optimization.precision = precision;
    c.model.quantization = quantization;
    // f16: a scale under which no pass of these tiny models overflows (at the default
    // 65536 some second-order passes do, and the step is skipped before it peaks).
    c.memory_optimization.loss_scaling.initial_scale = 1024.0;
    let mut what = format!("{precision}");
    if quantization == Quantization::Int8 {
        what.push_str(" int8");
    }
    (format!("{label} {what}"), c)
}

/// Mixed precision and int8 on every text model: in bf16 every method but the
/// MELoRA variants that only repeat others' passes (block-diagonal on BERT only, no
/// curvature-free one) at K = 2 with and without micro-batches, and both MAML modes at
/// K = 1 and 4 on BERT; in f16 (loss scaling) both MAML modes, FOMAML and diagonal
/// MELoRA at K = 2 with and without micro-batches; an int8 base under f32 and bf16
/// for recompute-MAML, FOMAML and Gauss-Newton MELoRA at K = 1 and at K = 2 with
/// micro-batches; bf16 with checkpointing (f16 refuses it) for recompute-MAML, FOMAML
/// and Gauss-Newton MELoRA with and without micro-batches, and recompute-MAML over an
/// int8 base; longer sequences for FOMAML and recompute-MAML on BERT and GPT-2.
fn precision_rows() -> Vec<(String, Config)> {
    let mut rows = Vec::new();
    let all = methods();
    let named = |names: &[&str]| -> Vec<(&'static str, Method, InnerMode, HessianKind)> {
        all.iter()
            .filter(|m| names.contains(&m.0))
            .copied()
            .collect()
    };
    let none = Quantization::None;
    let int8 = Quantization::Int8;
    for model in TEXT_MODELS {
        let mut bf16 = named(&[
            "maml-full",
            "maml-recompute",
            "fomaml",
            "reptile",
            "melora-diagonal",
            "melora-gn",
        ]);
        if model == "tiny-bert" {
            bf16.extend(named(&["melora-block"]));
        }
        for &method in &bf16 {
            for micro in [None, Some(3)] {
                rows.push(precise(model, method, 2, micro, Precision::Bf16, none));
            }
            if method.1 == Method::Maml && model == "tiny-bert" {
                for k in [1, 4] {
                    rows.push(precise(model, method, k, None, Precision::Bf16, none));
                }
            }
        }
        for method in named(&["maml-full", "maml-recompute", "fomaml", "melora-diagonal"]) {
            for micro in [None, Some(3)] {
                rows.push(precise(model, method, 2, micro, Precision::F16, none));
            }
        }
        for method in named(&["maml-recompute", "fomaml", "melora-gn"]) {
            for precision in [Precision::F32, Precision::Bf16] {
                for (k, micro) in [(1, None), (2, Some(3))] {
                    rows.push(precise(model, method, k, micro, precision, int8));
                }
            }
        }
        let mut checkpointed = Vec::new();
        for method in named(&["maml-recompute", "fomaml", "melora-gn"]) {
            for micro in [None, Some(3)] {
                checkpointed.push(precise(model, method, 2, micro, Precision::Bf16, none));
            }
        }
        for method in named(&["maml-recompute"]) {
            checkpointed.push(precise(model, method, 2, None, Precision::Bf16, int8));
        }
        for (label, mut c) in checkpointed {
            let section = &mut c.memory_optimization.checkpointing;
            section.enabled = true;
            section.every = 1;
            rows.push((format!("{label} ckpt every 1"), c));
        }
    }
    // Longer sequences, where activations make the peak.
    for model in ["tiny-bert", "tiny-gpt2"] {
        for method in named(&["fomaml", "maml-recompute"]) {
            for (precision, quantization) in [
                (Precision::Bf16, none),
                (Precision::F16, none),
                (Precision::Bf16, int8),
            ] {
                let (label, mut c) = precise(model, method, 1, None, precision, quantization);
                c.model.max_length = 64;
                rows.push((format!("{label} t=64"), c));
            }
        }
    }
    rows
}

/// Selective recomputation (attention cores and adapter-free feed-forward blocks
/// rebuilt in the backward pass): every text model with every method at K = 2, alone
/// and inside checkpointed segments, with and without micro-batches; full-graph and
/// recompute MAML at K = 4; bf16; longer sequences; FFN adapters (block not fused).
fn selective_rows() -> Vec<(String, Config)> {
    let mut rows = Vec::new();
    let all = methods();
    let selective = |(label, mut c): (String, Config), segments: bool| {
        c.memory_optimization.checkpointing.selective = true;
        c.memory_optimization.checkpointing.enabled = segments;
        let what = if segments {
            "selective+ckpt"
        } else {
            "selective"
        };
        (format!("{label} {what}"), c)
    };
    for model in TEXT_MODELS {
        for &method in &all {
            for micro in [None, Some(3)] {
                rows.push(selective(row(model, method, 2, micro), false));
            }
            rows.push(selective(row(model, method, 2, None), true));
        }
        for &method in all.iter().filter(|m| m.1 == Method::Maml) {
            rows.push(selective(row(model, method, 4, None), false));
        }
        let named = |n: &str| *all.iter().find(|m| m.0 == n).expect("known method");
        for name in ["maml-recompute", "fomaml", "melora-gn"] {
            rows.push(selective(
                precise(
                    model,
                    named(name),
                    2,
                    None,
                    Precision::Bf16,
                    Quantization::None,
                ),
                false,
            ));
        }
    }
    for model in ["tiny-bert", "tiny-gpt2"] {
        for &method in all
            .iter()
            .filter(|m| matches!(m.0, "fomaml" | "maml-recompute" | "maml-full"))
        {
            let (label, mut c) = selective(row(model, method, 1, None), false);
            c.model.max_length = 64;
            rows.push((format!("{label} t=64"), c));
        }
    }
    for &method in all
        .iter()
        .filter(|m| matches!(m.0, "fomaml" | "maml-recompute"))
    {
        let (label, mut c) = selective(row("tiny-bert", method, 2, None), false);
        c.lora.target_modules = Some(vec!["query".into(), "intermediate.dense".into()]);
        rows.push((format!("{label} ffn-lora"), c));
    }
    rows
}

/// Where [`bert_folder`] writes (removed when the grid is done).
fn folder_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("planner-grid-bert-{}", std::process::id()))
}

/// A BERT folder with tiny-bert's sizes (see [`common::write_tiny_bert_folder`]),
/// written if missing.
fn bert_folder() -> std::path::PathBuf {
    let dir = folder_dir();
    if !dir.join("model.safetensors").exists() {
        common::write_tiny_bert_folder(&dir);
    }
    dir
}

/// A model read from a folder (the file read whole, converted, the tensors the model
/// does not keep freed once it is built): first- and second-order at K = 1 in f32,
/// bf16 and over an int8 base.
fn folder_rows() -> Vec<(String, Config)> {
    let mut rows = Vec::new();
    let all = methods();
    for &method in all
        .iter()
        .filter(|m| matches!(m.0, "fomaml" | "maml-recompute"))
    {
        for (precision, quantization) in [
            (Precision::F32, Quantization::None),
            (Precision::Bf16, Quantization::None),
            (Precision::F32, Quantization::Int8),
            (Precision::Bf16, Quantization::Int8),
        ] {
            let (label, mut c) = precise("tiny-bert", method, 1, None, precision, quantization);
            c.model.path = Some(bert_folder());
            rows.push((label.replacen("tiny-bert", "bert folder", 1), c));
        }
    }
    rows
}

/// The grid run by default (a few minutes): every tenth row of [`full_grid`] (every
/// kind of row appears: each model, method, K, micro-batch, dtype, precision,
/// checkpointing plan, folder, baseline) and the deep model's full-graph MAML rows
/// at 8 tokens, where the planner extrapolates from 1-, 2- and 4-layer instances
/// (its rows at 48 tokens, gigabytes each, are in the full grid only), and Conv4's
/// rows with 6 queries per class, extrapolated from 1 and 2.
fn grid() -> Vec<(String, Config)> {
    let mut rows: Vec<_> = full_grid()
        .into_iter()
        .filter(|(label, _)| !label.contains("t=48") && !label.contains("q=6"))
        .step_by(10)
        .collect();
    rows.extend(
        deep_rows()
            .into_iter()
            .filter(|(label, _)| label.contains("maml-full") && !label.contains("t=48")),
    );
    // ResNet-12's rows take minutes in a debug build: the full grid has them.
    rows.extend(
        vision_rows()
            .into_iter()
            .filter(|(label, _)| label.starts_with("conv4")),
    );
    rows
}

/// The whole grid: models × methods × K ∈ {1, 2, 4} × micro-batches (none, 3;
/// Conv4 none), and the f64, checkpointing, vision (6 queries per class), long-sequence, MLP, meta-batch,
/// precision, folder, selective-recomputation, baseline and deep-model rows. About
/// half an hour: run with `--ignored`.
fn full_grid() -> Vec<(String, Config)> {
    let mut rows = Vec::new();
    for model in TEXT_MODELS.iter().chain(&["conv4"]) {
        for method in methods() {
            for k in [1, 2, 4] {
                let micros: &[Option<usize>] = if *model == "conv4" {
                    &[None]
                } else {
                    &[None, Some(3)]
                };
                for &micro in micros {
                    rows.push(row(model, method, k, micro));
                }
            }
        }
    }
    rows.extend(f64_rows());
    rows.extend(checkpoint_rows());
    rows.extend(long_rows());
    rows.extend(mlp_rows());
    rows.extend(meta_batch_rows());
    rows.extend(precision_rows());
    rows.extend(folder_rows());
    rows.extend(selective_rows());
    rows.extend(baseline_rows());
    rows.extend(deep_rows());
    rows.extend(vision_rows());
    rows
}

fn candle_dtype(c: &Config) -> DType {
    match c.model.dtype {
        melora::config::DType::F64 => DType::F64,
        _ => DType::F32,
    }
}

fn text_batch(n: usize, t: usize, seed: u32) -> Batch {
    let ids: Vec<u32> = (0..n * t)
        .map(|i| (i as u32 * 7919 + seed * 104_729) % 997 + 1)
        .collect();
    Batch::from_tokens(
        Tensor::from_vec(ids, (n, t), &Device::Cpu).unwrap(),
        Tensor::ones((n, t), DType::U32, &Device::Cpu).unwrap(),
        None,
        Tensor::from_vec((0..n as u32).map(|i| i % 3).collect(), n, &Device::Cpu).unwrap(),
    )
    .unwrap()
}

fn image_batch(n: usize, side: usize, dtype: DType, seed: u64) -> Batch {
    let pixels: Vec<f64> = (0..n * side * side)
        .map(|i| ((i as u64 * 2_654_435_761 + seed) % 1000) as f64 / 1000.0)
        .collect();
    Batch::from_dense(
        Tensor::from_vec(pixels, (n, 1, side, side), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap(),
        Tensor::from_vec((0..n as u32).map(|i| i % 3).collect(), n, &Device::Cpu).unwrap(),
    )
    .unwrap()
}

fn episode(c: &Config, seed: u32) -> Episode {
    let d = &c.data;
    let (ns, nq) = (d.n_way * d.k_shot, d.n_way * d.n_query);
    if c.model.name == "mlp" {
        let tasks = SinusoidTasks {
            k_shot: d.k_shot,
            n_query: d.n_query,
            seed: 7,
        };
        tasks.episode(seed as u64).unwrap()
    } else if melora::models::Backbone::from_name(&c.model.name).is_some() {
        let dt = candle_dtype(c);
        Episode::new(
            image_batch(ns, d.image_size, dt, seed as u64),
            image_batch(nq, d.image_size, dt, seed as u64 + 1),
            d.n_way,
        )
        .unwrap()
    } else {
        Episode::new(
            text_batch(ns, c.model.max_length, 2 * seed),
            text_batch(nq, c.model.max_length, 2 * seed + 1),
            d.n_way,
        )
        .unwrap()
    }
}

/// A baseline's work on one test task, as evaluation does it: adapting to the
/// support set and predicting the query; for pretrain-finetune, its pre-training's
/// two first steps before (as the planner sees it: a batch of
/// `comparison.pretrain.batch_size` examples of the tasks' inputs).
fn one_adaptation(c: &Config) {
    let model = build_model(c).unwrap();
    let mut params = initial_params(model.as_ref(), c).unwrap();
    let task = episode(c, 0);
    if c.meta_learning.method == Method::PretrainFinetune {
        let n = c.comparison.pretrain.batch_size.unwrap();
        let batch = if c.model.name == "mlp" {
            SinusoidTasks {
                k_shot: n,
                n_query: 1,
                seed: 3,
            }
            .episode(0)
            .unwrap()
            .support
        } else {
            text_batch(n, c.model.max_length, 11)
        };
        let mut optimizer = Optimizer::new(OptimizerKind::adamw(0.0));
        for _ in 0..2 {
            let leaves = params.to_leaves().unwrap();
            let logits = model.logits(&leaves, &batch, Mode::Eval).unwrap();
            let loss = if batch.is_regression() {
                melora::data::regression_loss(&logits, &batch).unwrap()
            } else {
                melora::tensor::ops::cross_entropy(&logits, &batch.labels, 0.0).unwrap()
            };
            let grads = leaves.gradients(&loss, GradGraph::Detach).unwrap();
            params = optimizer.step(&params, &grads, 1e-3).unwrap();
        }
    }
    let adapter = build_adapter(c).unwrap();
    let engine = build_engine(c, model.as_ref()).unwrap();
    let adapted = adapter
        .adapt(engine.as_ref(), &params, &task.support, Mode::Eval)
        .unwrap();
    let _ = adapter
        .predict(engine.as_ref(), &adapted, &task.query, Mode::Eval)
        .unwrap();
}

/// Everything of one meta-step, allocated and freed inside the caller's meter (for a
/// baseline, one test task's adaptation).
fn one_meta_step(c: &Config) {
    if Variant::of(c).is_baseline() {
        return one_adaptation(c);
    }
    let mut run = Run::build(c).unwrap();
    let tasks: Vec<Episode> = (0..c.meta_learning.meta_batch_size)
        .map(|i| episode(c, i as u32))
        .collect();
    let engine = build_engine(c, run.model.as_ref()).unwrap();
    let (next, stats) = meta_step(
        run.learner.as_deref().expect("a meta-trained method"),
        engine.as_ref(),
        &run.params,
        &tasks,
        &mut run.outer,
        |i| Mode::Train { seed: i as u64 },
    )
    .unwrap();
    // An overflow under f16 loss scaling would end the step early: not what is measured.
    assert!(!stats.skipped, "the step was skipped (loss-scale overflow)");
    drop(next);
}

/// Measurements must not overlap: the counters are process-wide.
static SERIAL: Mutex<()> = Mutex::new(());

/// Runs `rows`, prints predicted against measured peaks and fails on any row off by
/// more than [`TOLERANCE`].
fn check(rows: fn() -> Vec<(String, Config)>) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    melora::init();
    // Made under the lock: the rows write a model folder, whose allocations would
    // disturb another test's measurement.
    let rows = rows();
    let filter = std::env::var("MELORA_PLAN_GRID").unwrap_or_default();
    let rows: Vec<_> = rows
        .into_iter()
        .filter(|(label, _)| label.contains(&filter))
        .collect();
    let options = PlanOptions {
        iterations: 1,
        episode_batches: 1,
        tasks: PlannedTasks::Longest,
    };
    // Warm-up per model and dtype: thread pools, the first-order worker and the
    // kernels' per-thread buffers are set up once per process, not per step.
    let mut warmed = Vec::new();
    println!(
        "{:<56} {:>10} {:>10} {:>8} {:>7}",
        "configuration", "predicted", "measured", "error", "time"
    );
    let mut failures = Vec::new();
    let mut worst = 0f64;
    for (label, config) in &rows {
        let key = (
            config.model.name.clone(),
            config.model.dtype,
            config.memory_optimization.precision,
            config.model.quantization,
        );
        if !warmed.contains(&key) {
            let mut warm = config.clone();
            warm.meta_learning.method = Method::Maml;
            warm.meta_learning.inner.mode = InnerMode::FullGraph;
            warm.memory_optimization.gradient_accumulation.micro_batch = None;
            one_meta_step(&warm);
            warmed.push(key);
        }
        let predicted = plan_with(config, &options).unwrap().peak_bytes as f64;
        let started = std::time::Instant::now();
        let meter = MemoryMeter::start();
        one_meta_step(config);
        let measured = meter.peak_above_baseline() as f64;
        drop(meter);
        let seconds = started.elapsed().as_secs_f64();
        let error = (predicted - measured) / measured;
        worst = worst.max(error.abs());
        println!(
            "{label:<56} {:>10} {:>10} {:>+7.1}% {seconds:>6.2}s",
            format_bytes(predicted as u64),
            format_bytes(measured as u64),
            100.0 * error
        );
        if error.abs() > TOLERANCE {
            failures.push(format!("{label}: {:+.1}%", 100.0 * error));
        }
    }
    println!("{} rows, largest error {:.1}%", rows.len(), 100.0 * worst);
    let _ = std::fs::remove_dir_all(folder_dir());
    assert!(
        failures.is_empty(),
        "predictions off by more than {:.0}%: {failures:?}",
        100.0 * TOLERANCE
    );
}

#[test]
fn planner_predicts_measured_peaks_within_tolerance() {
    check(grid);
}

#[test]
#[ignore = "the whole cartesian grid takes several minutes"]
fn planner_full_grid_within_tolerance() {
    check(full_grid);
}
