//! Activation memory of gradient checkpointing, measured by the counting allocator on
//! a 6-layer BERT-shaped encoder (width 128, 4 heads, FFN 512, LoRA r=8 on q/v) with
//! sequences of 64 tokens: the peak heap above the baseline (weights and parameters
//! already allocated) of a first-order gradient (FOMAML, K = 1: one support and one
//! query gradient) and of a Hessian-vector product, without checkpointing and with
//! each plan; plus the time of each. One test in its own process, so no other test
//! allocates while it measures.
//!
//! `cargo test --release --test checkpoint_memory -- --nocapture` prints the whole
//! table with times (fastest of 3 runs). A debug build (plain `cargo test`) measures
//! only what the assertion needs — the gradient without checkpointing and with every
//! layer checkpointed — since unoptimised code makes the rest take minutes; its times
//! are not meaningful.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use melora::data::{Batch, Episode};
use melora::memory::{format_bytes, CheckpointPlan, Checkpointed, CountingAllocator, MemoryMeter};
use melora::meta::{hessian_vector_product, Fomaml, InnerLoop, MetaLearner};
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

/// Peak heap above the baseline and seconds of `f` (the peak of the first call, the
/// fastest of `reps` further calls; infinite when `reps` is 0).
fn measure(reps: usize, mut f: impl FnMut()) -> (usize, f64) {
    let meter = MemoryMeter::start();
    f();
    let peak = meter.peak_above_baseline();
    drop(meter);
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let start = Instant::now();
        f();
        best = best.min(start.elapsed().as_secs_f64());
    }
    (peak, best)
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
    let release = !cfg!(debug_assertions);
    // Debug builds measure memory only: their times mean nothing.
    let reps = if release { 3 } else { 0 };
    // Warm-up: thread pools and one-off buffers are not what is measured.
    fomaml
        .meta_gradient(plain.as_ref(), &params, &task, Mode::Eval)
        .unwrap();

    let mut plans: Vec<(&str, Option<CheckpointPlan>)> =
        vec![("none", None), ("every: 1", Some(CheckpointPlan::Every(1)))];
    if release {
        plans.push(("every: 2", Some(CheckpointPlan::Every(2))));
        plans.push(("layers: [0, 3]", Some(CheckpointPlan::Layers(vec![0, 3]))));
    }
    println!(
        "BERT-shaped encoder: {LAYERS} layers, width 128, FFN 512, LoRA r=8 on q/v; \
         {EXAMPLES} + {EXAMPLES} sequences x {TOKENS} tokens, f32 ({} build)",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    println!(
        "{:<16} {:>14} {:>10} {:>10} {:>14} {:>10} {:>10}",
        "checkpointing", "gradient peak", "ratio", "time", "H·v peak", "ratio", "time"
    );
    let mut rows = Vec::new();
    for (name, plan) in plans {
        let model: Box<dyn FewShotModel> = match plan {
            Some(plan) => Box::new(Checkpointed::new(encoder(), plan).unwrap()),
            None => encoder(),
        };
        let gradient = measure(reps, || {
            let outcome = fomaml
                .meta_gradient(model.as_ref(), &params, &task, Mode::Eval)
                .unwrap();
            drop(outcome);
        });
        let hvp = if release {
            measure(reps, || {
                let hv =
                    hessian_vector_product(model.as_ref(), &params, &task.support, &v, Mode::Eval)
                        .unwrap();
                drop(hv);
            })
        } else {
            (0, 0.0)
        };
        rows.push((name, gradient, hvp));
    }
    let (_, base_gradient, base_hvp) = rows[0];
    // "-" where a figure was not measured (debug builds skip the products).
    let cells = |(peak, time): (usize, f64), base: (usize, f64)| {
        if base.0 == 0 {
            return ("-".to_string(), "-".to_string(), "-".to_string());
        }
        (
            format_bytes(peak as u64),
            format!("{:.0}%", 100.0 * peak as f64 / base.0 as f64),
            if time.is_finite() {
                format!("{time:.3}s")
            } else {
                "-".to_string()
            },
        )
    };
    for (name, gradient, hvp) in &rows {
        let (g_peak, g_ratio, g_time) = cells(*gradient, base_gradient);
        let (h_peak, h_ratio, h_time) = cells(*hvp, base_hvp);
        println!(
            "{name:<16} {g_peak:>14} {g_ratio:>10} {g_time:>10} {h_peak:>14} {h_ratio:>10} {h_time:>10}"
        );
    }
    for (name, (g_peak, g_time), (h_peak, h_time)) in &rows[1..] {
        println!("{name}: gradient {g_peak} B vs {} B", base_gradient.0);
        if release {
            println!(
                "{name}: gradient time x{:.2}; H·v {h_peak} B vs {} B, time x{:.2}",
                g_time / base_gradient.1,
                base_hvp.0,
                h_time / base_hvp.1,
            );
        }
    }
    let (_, (every_layer, _), (every_layer_hvp, _)) = rows[1];
    assert!(
        every_layer * 2 <= base_gradient.0,
        "checkpointing every layer: gradient peak {every_layer} B is more than half of {} B",
        base_gradient.0
    );
    assert!(
        !release || every_layer_hvp < base_hvp.0,
        "checkpointing every layer: H·v peak {every_layer_hvp} B is not below {} B",
        base_hvp.0
    );
}
