//! Activation memory of gradient checkpointing, measured by the counting allocator on
//! a 6-layer BERT-shaped encoder (width 128, 4 heads, FFN 512, LoRA r=8 on q/v) with
//! sequences of 64 tokens: the peak heap above the baseline (weights and parameters
//! already allocated) of a first-order gradient (FOMAML, K = 1: one support and one
//! query gradient) and of a Hessian-vector product, without checkpointing and with
//! each plan; plus the time of each. One test in its own process, so no other test
//! allocates while it measures.
//!
//! `cargo test --release --test checkpoint_memory -- --nocapture` prints the whole
//! table with wall-clock and CPU times (fastest of 5 interleaved rounds); on a
//! machine shared with other work, `RAYON_NUM_THREADS=1` makes the CPU time the
//! steadiest measure of the compute overhead. A debug build (plain `cargo test`) measures
//! only what the assertion needs — the gradient without checkpointing and with every
//! layer checkpointed — since unoptimised code makes the rest take minutes; its times
//! are not meaningful.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use melora::data::{Batch, Episode};
use melora::engine::{
    hessian_vector_product, CheckpointPlan, Checkpointed, GradEngine, WholeGraph,
};
use melora::memory::{format_bytes, CountingAllocator, MemoryMeter};
use melora::meta::{Fomaml, InnerLoop, MetaLearner};
use melora::models::bert::{Bert, BertConfig};
use melora::models::{FewShotModel, LoraSettings, Weights};
use melora::nn::{LoraInit, LoraSpec, Mode};

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

const LAYERS: usize = 6;
const TOKENS: usize = 64;
const EXAMPLES: usize = 10;
const CLASSES: usize = 5;

fn encoder() -> Box<dyn FewShotModel> {
    let config: BertConfig = serde_json::from_value(serde_json::json!({
        "vocab_size": 1000, "hidden_size": 128, "num_hidden_layers": LAYERS,
        "num_attention_heads": 4, "intermediate_size": 512, "max_position_embeddings": 128,
    }))
    .unwrap();
    let lora = LoraSettings {
        spec: LoraSpec {
            rank: 8,
            alpha: 16.0,
            dropout: 0.0,
        },
        target_modules: None,
        init: LoraInit::Normal { seed: 0, std: 0.02 },
    };
    Box::new(
        Bert::new(
            config,
            Weights::random(1, DType::F32, &Device::Cpu),
            Some(lora),
            CLASSES,
        )
        .unwrap(),
    )
}

fn batch(seed: u32) -> Batch {
    let ids: Vec<u32> = (0..EXAMPLES * TOKENS)
        .map(|i| (i as u32 * 7919 + seed * 104_729) % 997 + 1)
        .collect();
    Batch::from_tokens(
        Tensor::from_vec(ids, (EXAMPLES, TOKENS), &Device::Cpu).unwrap(),
        Tensor::ones((EXAMPLES, TOKENS), DType::U32, &Device::Cpu).unwrap(),
        None,
        Tensor::from_vec(
            (0..EXAMPLES as u32).map(|i| i % CLASSES as u32).collect(),
            EXAMPLES,
            &Device::Cpu,
        )
        .unwrap(),
    )
    .unwrap()
}

/// Peak heap above the baseline during `f`.
fn peak(f: impl FnOnce()) -> usize {
    let meter = MemoryMeter::start();
    f();
    meter.peak_above_baseline()
}

/// CPU seconds (user + system, every thread) this process has used, from
/// `/proc/self/stat` in clock ticks of 10 ms; `None` where it cannot be read.
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces) start at `state`.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// Wall-clock and CPU seconds `f` takes. CPU time is steadier than wall time on a
/// machine shared with other work; it includes the thread pool's spinning.
fn seconds(f: impl FnOnce()) -> (f64, f64) {
    let (start, cpu) = (Instant::now(), cpu_seconds());
    f();
    let wall = start.elapsed().as_secs_f64();
    let cpu = match (cpu, cpu_seconds()) {
        (Some(a), Some(b)) => b - a,
        _ => f64::NAN,
    };
    (wall, cpu)
}

/// A figure and its share of the reference, or "-" where not measured.
fn cells(value: f64, reference: f64, show: impl Fn(f64) -> String) -> (String, String) {
    if reference > 0.0 && value.is_finite() {
        (show(value), format!("{:.0}%", 100.0 * value / reference))
    } else {
        ("-".into(), "-".into())
    }
}

#[test]
fn checkpointing_halves_activation_memory_of_a_six_layer_encoder() {
    melora::init();
    let plain = encoder();
    let params = plain.init_params(2).unwrap();
    let task = Episode::new(batch(1), batch(2), CLASSES).unwrap();
    let v = params.scale(0.5).unwrap();
    let fomaml = Fomaml {
        inner: InnerLoop::new(1, 0.01),
    };
    // Debug builds measure the gradient's memory only: their times mean nothing and
    // the products take minutes.
    let release = !cfg!(debug_assertions);
    let mut plans: Vec<(&str, Option<CheckpointPlan>)> =
        vec![("none", None), ("every: 1", Some(CheckpointPlan::Every(1)))];
    if release {
        plans.push(("every: 2", Some(CheckpointPlan::Every(2))));
        plans.push(("layers: [0, 3]", Some(CheckpointPlan::Layers(vec![0, 3]))));
    }
    type Case<'a> = (&'a str, Box<dyn FewShotModel>, Option<CheckpointPlan>);
    let mut models: Vec<Case> = plans
        .into_iter()
        .map(|(name, plan)| (name, encoder(), plan))
        .collect();
    // Selective recomputation: attention cores and feed-forward blocks rebuilt in the
    // backward pass, alone and inside one-layer segments.
    let selective = || {
        let mut model = encoder();
        model.set_selective_recompute(true).unwrap();
        model
    };
    models.push(("selective", selective(), None));
    models.push((
        "selective+ev. 1",
        selective(),
        Some(CheckpointPlan::Every(1)),
    ));
    let selective_at = models.len() - 2;
    let engines: Vec<Box<dyn GradEngine>> = models
        .iter()
        .map(|(_, model, plan)| -> Box<dyn GradEngine> {
            match plan {
                Some(plan) => Box::new(Checkpointed::new(model.as_ref(), plan).unwrap()),
                None => Box::new(WholeGraph::new(model.as_ref())),
            }
        })
        .collect();
    let gradient = |engine: &dyn GradEngine| {
        drop(
            fomaml
                .meta_gradient(engine, &params, &task, Mode::Eval)
                .unwrap(),
        )
    };
    let hvp = |engine: &dyn GradEngine| {
        drop(hessian_vector_product(engine, &params, &task.support, &v, Mode::Eval).unwrap())
    };
    // Warm-up: thread pools and one-off buffers are not what is measured.
    gradient(&WholeGraph::new(plain.as_ref()));

    let gradient_peaks: Vec<usize> = engines
        .iter()
        .map(|e| peak(|| gradient(e.as_ref())))
        .collect();
    let hvp_peaks: Vec<usize> = engines
        .iter()
        .map(|e| if release { peak(|| hvp(e.as_ref())) } else { 0 })
        .collect();
    // Times: the fastest of 3 rounds, each round timing every model in turn, so that
    // load from other processes hits all of them alike.
    let mut gradient_times = vec![(f64::INFINITY, f64::INFINITY); models.len()];
    let mut hvp_times = vec![(f64::INFINITY, f64::INFINITY); models.len()];
    let fastest = |best: &mut (f64, f64), (wall, cpu): (f64, f64)| {
        *best = (best.0.min(wall), best.1.min(cpu));
    };
    for _ in 0..if release { 5 } else { 0 } {
        for (i, e) in engines.iter().enumerate() {
            fastest(&mut gradient_times[i], seconds(|| gradient(e.as_ref())));
            fastest(&mut hvp_times[i], seconds(|| hvp(e.as_ref())));
        }
    }

    println!(
        "BERT-shaped encoder: {LAYERS} layers, width 128, FFN 512, LoRA r=8 on q/v; \
         {EXAMPLES} + {EXAMPLES} sequences x {TOKENS} tokens, f32 ({} build, {} threads)",
        if release { "release" } else { "debug" },
        candle_core::utils::get_num_threads()
    );
    println!(
        "{:<15} {:>10} {:>5} {:>7} {:>5} {:>7} {:>5} {:>10} {:>5} {:>7} {:>5} {:>7} {:>5}",
        "checkpointing",
        "grad peak",
        "",
        "wall",
        "",
        "cpu",
        "",
        "H·v peak",
        "",
        "wall",
        "",
        "cpu",
        ""
    );
    let bytes = |b: f64| format_bytes(b as u64);
    let secs = |t: f64| format!("{t:.2}s");
    for (i, (name, _, _)) in models.iter().enumerate() {
        let (gp, gpr) = cells(gradient_peaks[i] as f64, gradient_peaks[0] as f64, bytes);
        let (gw, gwr) = cells(gradient_times[i].0, gradient_times[0].0, secs);
        let (gc, gcr) = cells(gradient_times[i].1, gradient_times[0].1, secs);
        let (hp, hpr) = cells(hvp_peaks[i] as f64, hvp_peaks[0] as f64, bytes);
        let (hw, hwr) = cells(hvp_times[i].0, hvp_times[0].0, secs);
        let (hc, hcr) = cells(hvp_times[i].1, hvp_times[0].1, secs);
        println!(
            "{name:<15} {gp:>10} {gpr:>5} {gw:>7} {gwr:>5} {gc:>7} {gcr:>5} \
             {hp:>10} {hpr:>5} {hw:>7} {hwr:>5} {hc:>7} {hcr:>5}"
        );
    }
    for (i, (name, _, _)) in models.iter().enumerate() {
        println!(
            "{name}: gradient peak {} B, H·v peak {} B",
            gradient_peaks[i], hvp_peaks[i]
        );
    }
    assert!(
        gradient_peaks[1] * 2 <= gradient_peaks[0],
        "checkpointing every layer: gradient peak {} B is more than half of {} B",
        gradient_peaks[1],
        gradient_peaks[0]
    );
    assert!(
        gradient_peaks[selective_at] * 4 <= gradient_peaks[0] * 3,
        "selective recomputation: gradient peak {} B is more than 3/4 of {} B",
        gradient_peaks[selective_at],
        gradient_peaks[0]
    );
    assert!(
        !release || hvp_peaks[selective_at + 1] < hvp_peaks[1],
        "selective recomputation in segments: H·v peak {} B is not below \
         checkpointing's {} B",
        hvp_peaks[selective_at + 1],
        hvp_peaks[1]
    );
    assert!(
        !release || hvp_peaks[1] < hvp_peaks[0],
        "checkpointing every layer: H·v peak {} B is not below {} B",
        hvp_peaks[1],
        hvp_peaks[0]
    );
}
