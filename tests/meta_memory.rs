//! Peak memory of one meta-gradient against the number of inner steps K, measured by
//! the counting allocator on a tiny BERT with LoRA: full-graph MAML keeps every
//! step's graph (grows with K); recompute-MAML, FOMAML and MELoRA keep one step's
//! graph at a time (flat in K). One test in its own process, so no other test
//! allocates while it measures.

use candle_core::{DType, Device, Tensor};
use melora::data::{Batch, Episode};
use melora::engine::WholeGraph;
use melora::memory::{format_bytes, CountingAllocator, MemoryMeter};
use melora::meta::{Fomaml, HessianApproximation, InnerLoop, Maml, MamlMode, Melora, MetaLearner};
use melora::models::load::builtin;
use melora::models::LoraSettings;
use melora::nn::{LoraInit, LoraSpec, Mode};

/// Builds a learner for a given number of inner steps K.
type LearnerForK = Box<dyn Fn(usize) -> Box<dyn MetaLearner>>;

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

fn batch(n: usize, t: usize, seed: u32) -> Batch {
    let ids: Vec<u32> = (0..n * t)
        .map(|i| (i as u32 * 7919 + seed * 104_729) % 997 + 1)
        .collect();
    Batch::from_tokens(
        Tensor::from_vec(ids, (n, t), &Device::Cpu).unwrap(),
        Tensor::ones((n, t), DType::U32, &Device::Cpu).unwrap(),
        None,
        Tensor::from_vec((0..n as u32).map(|i| i % 5).collect(), n, &Device::Cpu).unwrap(),
    )
    .unwrap()
}

#[test]
fn peak_memory_grows_with_k_only_for_full_graph_maml() {
    melora::init();
    let lora = LoraSettings {
        spec: LoraSpec {
            rank: 8,
            alpha: 16.0,
            dropout: 0.0,
        },
        target_modules: None,
        init: LoraInit::Normal { seed: 0, std: 0.02 },
    };
    let model = builtin("tiny-bert", 1, DType::F32, Some(lora), 5).unwrap();
    let params = model.init_params(2).unwrap();
    let task = Episode::new(batch(25, 32, 1), batch(25, 32, 2), 5).unwrap();
    let learners: Vec<(&str, LearnerForK)> = vec![
        (
            "maml full-graph",
            Box::new(|k| {
                Box::new(Maml {
                    inner: InnerLoop::new(k, 0.01),
                    mode: MamlMode::FullGraph,
                })
            }),
        ),
        (
            "maml recompute",
            Box::new(|k| {
                Box::new(Maml {
                    inner: InnerLoop::new(k, 0.01),
                    mode: MamlMode::Recompute,
                })
            }),
        ),
        (
            "maml recompute µb=5",
            Box::new(|k| {
                Box::new(Maml {
                    inner: InnerLoop::new(k, 0.01).with_micro_batch(5),
                    mode: MamlMode::Recompute,
                })
            }),
        ),
        (
            "fomaml",
            Box::new(|k| {
                Box::new(Fomaml {
                    inner: InnerLoop::new(k, 0.01),
                })
            }),
        ),
        (
            "melora gauss-newton",
            Box::new(|k| {
                Box::new(Melora {
                    inner: InnerLoop::new(k, 0.01),
                    approximation: HessianApproximation::GaussNewton,
                    damping: 0.0,
                    clamp: None,
                    seed: 0,
                })
            }),
        ),
    ];
    // Warm-up: thread pools and one-off buffers are not what is measured.
    learners[0].1(1)
        .meta_gradient(&WholeGraph::new(model.as_ref()), &params, &task, Mode::Eval)
        .unwrap();
    println!("peak heap above baseline of one meta-gradient (tiny-bert, LoRA r=8, 5-way, 25+25 × 32 tokens)");
    println!(
        "{:<22} {:>10} {:>10} {:>10} {:>10}",
        "learner", "K=1", "K=2", "K=4", "K=8"
    );
    for (name, make) in &learners {
        let mut peaks = Vec::new();
        for k in [1, 2, 4, 8] {
            let learner = make(k);
            let meter = MemoryMeter::start();
            let outcome = learner
                .meta_gradient(&WholeGraph::new(model.as_ref()), &params, &task, Mode::Eval)
                .unwrap();
            peaks.push(meter.peak_above_baseline() as f64);
            drop(outcome);
        }
        println!(
            "{name:<22} {}",
            peaks
                .iter()
                .map(|p| format!("{:>10}", format_bytes(*p as u64)))
                .collect::<String>()
        );
        let growth = peaks[3] / peaks[0];
        if *name == "maml full-graph" {
            assert!(
                peaks.windows(2).all(|w| w[1] > w[0]),
                "{name}: peaks must grow with K"
            );
            assert!(
                growth > 2.0,
                "{name}: K=8 peak is only {growth:.2}× the K=1 peak"
            );
        } else {
            for (k, p) in [2, 4, 8].iter().zip(&peaks[1..]) {
                let ratio = p / peaks[0];
                assert!(
                    ratio < 1.2,
                    "{name}: K={k} peak is {ratio:.2}× the K=1 peak"
                );
            }
        }
    }
}
