//! The memory budget during a run: a budget too small for whole sets makes the run
//! redo its steps with smaller micro-batches, and it ends with the same parameters
//! as an unconstrained run (gradient accumulation is exact up to float rounding).
//!
//! One test in its own process: the budget is enforced on the process's heap.

use melora::config::Config;
use melora::memory::{format_bytes, CountingAllocator, MemoryMeter};
use std::sync::{Arc, Mutex};

use melora::train::{train, ProgressFn, TrainOptions, TrainSummary};

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

fn config(output: &std::path::Path, name: &str) -> Config {
    // Sets of 12 examples of 24 tokens: activations dominate the tiny model's heap.
    let yaml = "seed: 5\nmodel:\n  name: tiny-bert\n  max_length: 24\nlora:\n  rank: 2\n\
                meta_learning:\n  method: maml\n  meta_batch_size: 2\n  num_iterations: 3\n  \
                inner:\n    steps: 2\n    lr: 0.5\n    mode: recompute\n\
                data:\n  n_way: 3\n  k_shot: 4\n  n_query: 4\n\
                evaluation:\n  episodes: 2\n  val_episodes: 2\n  eval_every: 100\n\
                tracking:\n  tensorboard: false\n  mlflow: false\n";
    let mut config = Config::from_yaml_str(yaml).unwrap();
    config.tracking.output_dir = output.join(name);
    config
}

/// Trains and returns the summary with the run's heap peak above the heap it started
/// from: what the budget is counted in (the process's runtime, set up before the run,
/// is not part of it).
fn run(config: &Config) -> (TrainSummary, usize) {
    let meter = MemoryMeter::start();
    let summary = train(config, &TrainOptions::default()).unwrap();
    (summary, meter.peak_bytes() - meter.baseline_bytes())
}

#[test]
fn a_budget_below_whole_sets_is_met_with_smaller_micro_batches_and_the_same_result() {
    melora::init();
    let dir = tempfile::tempdir().unwrap();
    let (whole, whole_peak) = run(&config(dir.path(), "whole"));
    let mut single = config(dir.path(), "single");
    single.memory_optimization.gradient_accumulation.micro_batch = Some(1);
    let (_, single_peak) = run(&single);
    println!(
        "heap peak: whole sets {}, micro-batch 1 {}",
        format_bytes(whole_peak as u64),
        format_bytes(single_peak as u64)
    );
    assert!(
        (single_peak as f64) < 0.9 * whole_peak as f64,
        "micro-batches should lower the peak"
    );
    let budget = (single_peak + whole_peak) / 2;
    let mut limited = config(dir.path(), "limited");
    limited.memory_optimization.budget.limit = Some(budget.to_string());
    // A meter started after the first iteration (which went above the budget and was
    // redone) measures the iterations that follow, under the smaller micro-batch.
    let later: Arc<Mutex<Option<MemoryMeter>>> = Arc::default();
    let on_iteration: ProgressFn = {
        let later = later.clone();
        Arc::new(move |report| {
            if report.iteration == 1 {
                *later.lock().unwrap() = Some(MemoryMeter::start());
            }
        })
    };
    let meter = MemoryMeter::start();
    let base = meter.baseline_bytes();
    let constrained = train(
        &limited,
        &TrainOptions {
            on_iteration: Some(on_iteration),
            ..Default::default()
        },
    )
    .unwrap();
    let later_meter = later.lock().unwrap().take().unwrap();
    let later_peak = later_meter.peak_bytes();
    // Dropping the inner meter gives the outer one back the first iteration's peak.
    drop(later_meter);
    let constrained_peak = meter.peak_bytes();
    println!(
        "budget {}: peak {} (first iteration, redone), {} after it",
        format_bytes(budget as u64),
        format_bytes(constrained_peak as u64),
        format_bytes(later_peak as u64)
    );
    assert!(
        later_peak <= budget + base,
        "the later iterations exceed the budget"
    );
    assert_eq!(constrained.iterations, whole.iterations);
    let gap = constrained
        .params
        .sub(&whole.params)
        .unwrap()
        .norm()
        .unwrap()
        / whole.params.norm().unwrap();
    assert!(gap < 1e-5, "constrained run differs by {gap:.3e}");
    // The reduction is recorded in the run's metrics.
    let metrics = std::fs::read_to_string(constrained.run_dir.join("metrics.jsonl")).unwrap();
    assert!(metrics.contains("memory/micro_batch"), "{metrics}");
}
