//! One point of the memory benchmark, measured in the current process.

use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::config::{Config, Variant};
use crate::data::{EpisodeSource, Prefetcher, SyntheticText};
use crate::memory::{current_bytes, is_installed, MemoryMeter, ProcessMemory};
use crate::nn::Mode;
use crate::run::build::{
    build_adapter, build_engine, build_learner, build_model, build_outer, initial_params,
};
use crate::run::{meta_step, training_mode};
use crate::{Error, Result};

/// What [`measure`] found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Measurement {
    /// Highest heap bytes of the process during the timed iterations; `None` without
    /// the counting allocator.
    pub peak_bytes: Option<u64>,
    /// Heap bytes held when the timed iterations started.
    pub baseline_bytes: Option<u64>,
    /// Heap bytes of the built model and its trainable parameters.
    pub model_bytes: Option<u64>,
    /// Peak resident set of the process so far (`VmHWM`), where `/proc` exists.
    pub rss_bytes: Option<u64>,
    /// Seconds of each timed meta-iteration.
    pub seconds: Vec<f64>,
    /// Their median.
    pub seconds_per_iter: f64,
    /// Threads candle's kernels ran on.
    pub kernel_threads: usize,
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
    if iterations == 0 {
        return Err(Error::InvalidArgument(
            "at least one timed meta-iteration is needed".into(),
        ));
    }
    crate::init();
    crate::tensor::ensure_second_order()?;
    let before_model = current_bytes();
    let model = build_model(config)?;
    let engine = build_engine(config, model.as_ref())?;
    let mut params = initial_params(model.as_ref(), config)?;
    let model_bytes = current_bytes().saturating_sub(before_model) as u64;
    if Variant::of(config).is_baseline() {
        return measure_adaptation(config, engine.as_ref(), &params, iterations, model_bytes);
    }
    let learner = build_learner(config)?;
    let mut outer = build_outer(config)?;
    let meta_batch = config.meta_learning.meta_batch_size;
    let mut prefetcher = Prefetcher::new(Arc::new(tasks(config)), 0, meta_batch, 2)?;
    let seed = config.seed;
    let mut step = |iteration: usize, params: &crate::tensor::ParamSet| {
        let tasks = prefetcher.next_batch()?;
        let dropout = training_mode(seed, iteration, meta_batch);
        meta_step(
            learner.as_ref(),
            engine.as_ref(),
            params,
            &tasks,
            &mut outer,
            dropout,
        )
        .map(|(next, _)| next)
        .map_err(|e| Error::InvalidArgument(format!("meta-iteration {}: {e}", iteration + 1)))
    };
    // The warm-up sets up what a process sets up once (thread pools, kernel
    // workspaces) and the optimiser state.
    params = step(0, &params)?;
    let meter = MemoryMeter::start();
    let mut seconds = Vec::with_capacity(iterations);
    for iteration in 1..=iterations {
        let started = Instant::now();
        params = step(iteration, &params)?;
        seconds.push(started.elapsed().as_secs_f64());
    }
    let (peak, baseline) = (meter.peak_bytes() as u64, meter.baseline_bytes() as u64);
    drop(meter);
    drop(params);
    let installed = is_installed();
    Ok(Measurement {
        peak_bytes: installed.then_some(peak),
        baseline_bytes: installed.then_some(baseline),
        model_bytes: installed.then_some(model_bytes),
        rss_bytes: ProcessMemory::read().ok().map(|m| m.peak_rss_bytes),
        seconds_per_iter: median(&seconds),
        seconds,
        kernel_threads: candle_core::utils::get_num_threads(),
    })
}

/// A baseline's point: one warm-up adaptation, then `iterations` timed ones, each
/// adapting to the support set of a new task and predicting its query (what the
/// baseline does per test task; it is not meta-trained).
fn measure_adaptation(
    config: &Config,
    engine: &dyn crate::engine::GradEngine,
    params: &crate::tensor::ParamSet,
    iterations: usize,
    model_bytes: u64,
) -> Result<Measurement> {
    let adapter = build_adapter(config)?;
    let source = tasks(config);
    let adapt = |index: u64| -> Result<()> {
        let task = source.episode(index)?;
        let adapted = adapter.adapt(engine, params, &task.support, Mode::Eval)?;
        adapter.predict(engine, &adapted, &task.query, Mode::Eval)?;
        Ok(())
    };
    adapt(0)?;
    let meter = MemoryMeter::start();
    let mut seconds = Vec::with_capacity(iterations);
    for index in 1..=iterations {
        let started = Instant::now();
        adapt(index as u64)?;
        seconds.push(started.elapsed().as_secs_f64());
    }
    let (peak, baseline) = (meter.peak_bytes() as u64, meter.baseline_bytes() as u64);
    drop(meter);
    let installed = is_installed();
    Ok(Measurement {
        peak_bytes: installed.then_some(peak),
        baseline_bytes: installed.then_some(baseline),
        model_bytes: installed.then_some(model_bytes),
        rss_bytes: ProcessMemory::read().ok().map(|m| m.peak_rss_bytes),
        seconds_per_iter: median(&seconds),
        seconds,
        kernel_threads: candle_core::utils::get_num_threads(),
    })
}

/// The median (the mean of the middle two for an even count); NaN when empty.
pub(crate) fn median(values: &[f64]) -> f64 {
    crate::eval::stats::median(values).unwrap_or(f64::NAN)
}
