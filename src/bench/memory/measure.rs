//! One point of the memory benchmark, measured in the current process.

use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::data::{EpisodeSource, Prefetcher, SyntheticText};
use crate::memory::{
    current_bytes, device_memory, is_installed, reset_device_peak, MemoryMeter, ProcessMemory,
};
use crate::nn::Mode;
use crate::run::build::build_engine;
use crate::run::{meta_step, training_mode, Run};
use crate::{Error, Result};

/// What [`measure`] found. The byte figures are of the memory that holds the run's
/// tensors: the heap on the CPU, the GPU's memory pool with `device: cuda`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Measurement {
    /// Highest bytes held during the timed iterations; `None` on the CPU without
    /// the counting allocator.
    pub peak_bytes: Option<u64>,
    /// Bytes held when the timed iterations started.
    pub baseline_bytes: Option<u64>,
    /// Bytes of the built model and its trainable parameters.
    pub model_bytes: Option<u64>,
    /// Peak resident set of the process so far (`VmHWM`), where `/proc` exists.
    pub rss_bytes: Option<u64>,
    /// Seconds of each timed meta-iteration.
    pub seconds: Vec<f64>,
    /// Their median.
    pub seconds_per_iter: f64,
    /// Threads candle's kernels ran on.
    pub kernel_threads: usize,
    /// The share of the timed iterations' wall time spent in matrix products (the
    /// calling thread waiting on a GEMM kernel, which runs on every kernel thread).
    #[serde(default)]
    pub matmul_share: Option<f64>,
    /// What the warm-up meta-iteration (the first, from the initial parameters)
    /// computed; `None` for a baseline, which does not meta-train.
    #[serde(default)]
    pub first_step: Option<FirstStep>,
}

/// The first meta-iteration's figures, which another implementation started from
/// the same parameters on the same tasks must reproduce.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FirstStep {
    /// Mean query loss after adaptation over the meta-batch.
    pub query_loss: f64,
    /// Norm of the meta-batch's mean meta-gradient, before clipping.
    pub meta_gradient_norm: f64,
}

/// The benchmark's tasks: synthetic text episodes of `config.data`'s shape whose
/// sequences all have exactly `model.max_length` tokens (ids below 1000, which every
/// supported vocabulary covers).
pub fn tasks(config: &Config) -> SyntheticText {
    let length = config.model.max_length;
    SyntheticText {
        n_way: config.data.n_way,
        k_shot: config.data.k_shot,
        n_query: config.data.n_query,
        min_len: length,
        max_len: length,
        seed: config.seed,
        ..SyntheticText::default()
    }
}

/// Builds the model, learner and outer update of `config` as training does, runs one
/// warm-up meta-iteration and then `iterations` timed ones on prefetched meta-batches,
/// measuring the heap peak of the timed ones (see the module documentation).
///
/// Heap and resident figures are process-wide: run one point per process for figures
/// that do not include an earlier point's.
pub fn measure(config: &Config, iterations: usize) -> Result<Measurement> {
    measure_on(config, iterations, Arc::new(tasks(config)))
}

/// [`measure`] on the episodes of `source`: meta-iteration i (0 the warm-up) reads
/// its episodes i·B … i·B + B − 1.
pub fn measure_on(
    config: &Config,
    iterations: usize,
    source: Arc<dyn EpisodeSource>,
) -> Result<Measurement> {
    if iterations == 0 {
        return Err(Error::InvalidArgument(
            "at least one timed meta-iteration is needed".into(),
        ));
    }
    crate::init();
    crate::tensor::ensure_second_order()?;
    let device = crate::run::build::device(config)?;
    let before_model = live_bytes(&device)?;
    let run = Run::build(config)?;
    let model_bytes = live_bytes(&device)?.saturating_sub(before_model);
    let engine = build_engine(config, run.model.as_ref())?;
    let (mut params, mut outer) = (run.params, run.outer);
    let Some(learner) = run.learner else {
        // A baseline is not meta-trained: its iterations adapt to test tasks.
        return timed(&device, iterations, model_bytes, |index| {
            let task = source.episode(index as u64)?;
            let adapted = run
                .adapter
                .adapt(engine.as_ref(), &params, &task.support, Mode::Eval)?;
            run.adapter
                .predict(engine.as_ref(), &adapted, &task.query, Mode::Eval)?;
            Ok(None)
        });
    };
    let meta_batch = config.meta_learning.meta_batch_size;
    let mut prefetcher = Prefetcher::new(source, 0, meta_batch, 2)?;
    let seed = config.seed;
    timed(&device, iterations, model_bytes, |iteration| {
        let tasks = prefetcher.next_batch()?;
        let dropout = training_mode(seed, iteration, meta_batch);
        let (next, stats) = meta_step(
            learner.as_ref(),
            engine.as_ref(),
            &params,
            &tasks,
            &mut outer,
            dropout,
        )
        .map_err(|e| e.context(format!("meta-iteration {}", iteration + 1)))?;
        params = next;
        Ok(Some(FirstStep {
            query_loss: stats.query_loss,
            meta_gradient_norm: stats.grad_norm,
        }))
    })
}

/// Runs `iteration(0)` as a warm-up — it sets up what a process sets up once
/// (thread pools, kernel workspaces) and the optimiser state, and its figures are
/// the [`FirstStep`] — then times `iteration(1..=iterations)` under a
/// [`MemoryMeter`] (on a GPU, its memory pool's peak).
fn timed(
    device: &candle_core::Device,
    iterations: usize,
    model_bytes: u64,
    mut iteration: impl FnMut(usize) -> Result<Option<FirstStep>>,
) -> Result<Measurement> {
    let first_step = iteration(0)?;
    let on_device = device_memory(device)?.is_some();
    reset_device_peak(device)?;
    let device_baseline = live_bytes(device)?;
    let meter = MemoryMeter::start();
    let mut seconds = Vec::with_capacity(iterations);
    let matmul_before = candle_core::utils::matmul_nanos();
    for index in 1..=iterations {
        let started = Instant::now();
        iteration(index)?;
        seconds.push(started.elapsed().as_secs_f64());
    }
    let matmul_seconds = (candle_core::utils::matmul_nanos() - matmul_before) as f64 * 1e-9;
    let total_seconds: f64 = seconds.iter().sum();
    let (peak, baseline) = match device_memory(device)? {
        Some(reading) => (reading.peak_bytes, device_baseline),
        None => (meter.peak_bytes() as u64, meter.baseline_bytes() as u64),
    };
    drop(meter);
    let installed = on_device || is_installed();
    Ok(Measurement {
        peak_bytes: installed.then_some(peak),
        baseline_bytes: installed.then_some(baseline),
        model_bytes: installed.then_some(model_bytes),
        rss_bytes: ProcessMemory::read().ok().map(|m| m.peak_rss_bytes),
        seconds_per_iter: median(&seconds),
        seconds,
        kernel_threads: candle_core::utils::get_num_threads(),
        matmul_share: (total_seconds > 0.0).then(|| matmul_seconds / total_seconds),
        first_step,
    })
}

/// Bytes held now where `device` keeps its tensors: the heap, or the GPU's pool.
fn live_bytes(device: &candle_core::Device) -> Result<u64> {
    Ok(match device_memory(device)? {
        Some(reading) => reading.used_bytes,
        None => current_bytes() as u64,
    })
}

/// The median (the mean of the middle two for an even count); NaN when empty.
pub(crate) fn median(values: &[f64]) -> f64 {
    crate::eval::stats::median(values).unwrap_or(f64::NAN)
}
