//! Memory of the metric learners under gradient checkpointing, measured by the
//! counting allocator: ProtoNets and FS-CT + VIC on ResNet-12 (32 px RGB, 5-way
//! 2-shot 3-query), the peak heap above the baseline of one meta-gradient without
//! checkpointing and with every residual stage checkpointed. One test in its own
//! process, so no other test allocates while it measures.
//!
//! `cargo test --release --test metric_memory -- --nocapture` prints the figures.

use candle_core::{DType, Device, Tensor};
use melora::data::{Batch, Episode};
use melora::engine::{CheckpointPlan, Checkpointed, GradEngine, WholeGraph};
use melora::memory::{format_bytes, CountingAllocator, MemoryMeter};
use melora::meta::{Distance, FsctLearner, MetaLearner, ProtoNet, VicWeights};
use melora::models::fsct::FsctConfig;
use melora::models::{Backbone, ImageShape};
use melora::nn::Mode;

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

const WAYS: usize = 5;

fn images(per_class: usize, seed: u64) -> Batch {
    let n = WAYS * per_class;
    let values: Vec<f32> = (0..n * 3 * 32 * 32)
        .map(|i| ((i as u64 * 2_654_435_761 + seed * 97) % 1000) as f32 / 1000.0 - 0.5)
        .collect();
    let x = Tensor::from_vec(values, (n, 3, 32, 32), &Device::Cpu).unwrap();
    let labels: Vec<u32> = (0..n as u32).map(|i| i % WAYS as u32).collect();
    Batch::from_dense(x, Tensor::from_vec(labels, n, &Device::Cpu).unwrap()).unwrap()
}

fn peak(f: impl FnOnce()) -> usize {
    let meter = MemoryMeter::start();
    f();
    meter.peak_above_baseline()
}

#[test]
fn checkpointing_lowers_the_metric_learners_peak() {
    melora::init();
    let model = Backbone::from_name("resnet12")
        .unwrap()
        .build(
            ImageShape {
                channels: 3,
                side: 32,
            },
            WAYS,
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
    let task = Episode::new(images(2, 1), images(3, 2), WAYS).unwrap();
    let fsct = FsctLearner {
        head: FsctConfig::new(1, WAYS, 2),
        weights: VicWeights {
            cross_entropy: 1.0,
            variance: 1.0,
            covariance: 0.04,
        },
    };
    let mut params = model.init_params(0).unwrap();
    fsct.init_head(&mut params, 1).unwrap();
    let whole = WholeGraph::new(model.as_ref());
    let checkpointed = Checkpointed::new(model.as_ref(), &CheckpointPlan::Every(1)).unwrap();
    let protonet = ProtoNet {
        distance: Distance::SquaredEuclidean,
    };
    let learners: [(&str, &dyn MetaLearner); 2] = [("protonet", &protonet), ("fsct", &fsct)];
    for (name, learner) in learners {
        let run = |engine: &dyn GradEngine| {
            peak(|| {
                learner
                    .meta_gradient(engine, &params, &task, Mode::Eval)
                    .unwrap();
            })
        };
        // A warm-up settles the kernels' one-time buffers before measuring.
        run(&whole);
        let (plain, staged) = (run(&whole), run(&checkpointed));
        println!(
            "{name} on resnet12: peak {} whole graph, {} checkpointed per stage ({:.2}×)",
            format_bytes(plain as u64),
            format_bytes(staged as u64),
            staged as f64 / plain as f64
        );
        assert!(
            (staged as f64) < 0.75 * plain as f64,
            "{name}: checkpointing should lower the peak: {staged} vs {plain} bytes"
        );
    }
}
