//! `melora train`: meta-training with validation, best and last checkpoints, exact
//! resumption and clean interruption.
//!
//! Episodes are a deterministic function of their index (see `data::EpisodeSource`),
//! and dropout seeds of the iteration, so a run resumed from a checkpoint of
//! iteration i continues exactly as the uninterrupted run would.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use std::time::Instant;

use crate::config::{BatchNormEvaluation, Config, Variant};
use crate::data::{Episode, EpisodeSource, Prefetcher};
use crate::engine::GradEngine;
use crate::eval::evaluate_episodes;
use crate::memory::MemoryMeter;
use crate::memory::{format_bytes, BudgetGuard};
use crate::meta::{Adapter, MetaLearner};
use crate::models::FewShotModel;
use crate::optim::LossScaler;
use crate::tensor::ParamSet;
use crate::track::{Resume, RunEnd, RunTracker, TrackerOptions};
use crate::Result;

use super::checkpoint::{load_checkpoint, save_checkpoint, CheckpointState};
use super::evaluate::running_statistics;
use crate::run::build::{build_engine, build_learner, build_sources};
use crate::run::{meta_step, training_mode, OuterUpdate, Run, StepStats};

/// What the progress callback sees after each iteration.
#[derive(Debug, Clone)]
pub struct IterationReport<'a> {
    /// Iterations completed (1-based).
    pub iteration: usize,
    /// Iterations the run will take unless stopped.
    pub total: usize,
    /// The iteration's statistics.
    pub stats: &'a StepStats,
    /// The validation score taken after this iteration, if any (accuracy, or minus the
    /// MSE for regression).
    pub validation: Option<f64>,
    /// The best validation score so far.
    pub best: Option<f64>,
    /// Seconds the iteration took.
    pub seconds: f64,
    /// The micro-batch this iteration was redone with after going above the memory
    /// budget (it stays in use), if it was.
    pub reduced_micro_batch: Option<usize>,
    /// The GPU's memory after this iteration, on a CUDA run.
    pub device_memory: Option<crate::memory::DeviceMemoryReading>,
}

/// Called after every iteration.
pub type ProgressFn = Arc<dyn Fn(&IterationReport<'_>) + Send + Sync>;

/// How a training run is driven.
#[derive(Default, Clone)]
pub struct TrainOptions {
    /// Continue from this checkpoint folder.
    pub resume: Option<PathBuf>,
    /// Set from outside (Ctrl-C) to stop after the current iteration, saving a
    /// checkpoint; the MLflow run then ends KILLED.
    pub stop: Option<Arc<AtomicBool>>,
    /// Stop after this many iterations of this call, as a stop request would
    /// (checkpoint saved, MLflow run KILLED): tests of resumption.
    pub max_iterations: Option<usize>,
    /// Called after every iteration.
    pub on_iteration: Option<ProgressFn>,
}

impl std::fmt::Debug for TrainOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrainOptions")
            .field("resume", &self.resume)
            .field("stop", &self.stop)
            .field("max_iterations", &self.max_iterations)
            .field("on_iteration", &self.on_iteration.is_some())
            .finish()
    }
}

/// What a run produced.
#[derive(Debug)]
pub struct TrainSummary {
    /// The folder of the run (checkpoints, resolved configuration, metrics).
    pub run_dir: PathBuf,
    /// Iterations completed in total.
    pub iterations: usize,
    /// The final parameters.
    pub params: ParamSet,
    /// Best validation score (accuracy, or minus the MSE for regression).
    pub best_val_score: Option<f64>,
    /// Statistics of each iteration of this call.
    pub history: Vec<StepStats>,
    /// (iteration, validation score) of each validation.
    pub validations: Vec<(usize, f64)>,
    /// Whether the run stopped early on request.
    pub interrupted: bool,
    /// Whether early stopping ended the run.
    pub stopped_early: bool,
    /// Median seconds per meta-iteration of this call (validation excluded).
    pub seconds_per_iteration: Option<f64>,
    /// Peak heap bytes of the run above the level at its start (model, data,
    /// training); `None` without the counting allocator.
    pub peak_bytes: Option<u64>,
    /// The classes meta-training drew its tasks from (`None` for synthetic tasks).
    pub train_classes: Option<Vec<String>>,
}

/// The mean validation score over the first `count` episodes of `source`: accuracy,
/// or minus the MSE for regression tasks. With a loss scale (f16 activations)
/// adaptation runs under it.
pub(crate) fn validation_score(
    adapter: &dyn Adapter,
    engine: &dyn GradEngine,
    params: &ParamSet,
    source: &dyn EpisodeSource,
    count: usize,
    loss_scale: Option<f64>,
) -> Result<f64> {
    let evaluation = evaluate_episodes(
        adapter,
        engine,
        params,
        source,
        count,
        0.95,
        loss_scale,
        &mut |_| {},
    )?;
    Ok(evaluation.score())
}

/// Half the micro-batch in use (`None`: whole sets, i.e. the largest set of
/// `tasks`), or `None` if it is already 1.
fn halved_micro_batch(current: Option<usize>, tasks: &[crate::data::Episode]) -> Option<usize> {
    let largest = tasks
        .iter()
        .map(|t| t.support.len().max(t.query.len()))
        .max()
        .unwrap_or(1);
    let size = current.unwrap_or(largest).min(largest);
    (size > 1).then(|| size.div_ceil(2))
}

/// The run's folder: `<output_dir>/<experiment_name>/<run_name>`, the run named
/// `<method>-seed<seed>` unless `tracking.run_name` is set.
pub fn run_dir(config: &Config) -> PathBuf {
    config
        .tracking
        .output_dir
        .join(&config.tracking.experiment_name)
        .join(run_name(config))
}

/// The run's name (see [`run_dir`]).
pub fn run_name(config: &Config) -> String {
    config
        .tracking
        .run_name
        .clone()
        .unwrap_or_else(|| format!("{}-seed{}", Variant::of(config), config.seed))
}

/// Meta-trains the configured learner: for each iteration a meta-step on the next
/// meta-batch, a validation every `evaluation.eval_every` iterations, and the best
/// and last checkpoints saved.
pub fn train(config: &Config, options: &TrainOptions) -> Result<TrainSummary> {
    crate::init();
    let meter = MemoryMeter::start();
    // On a GPU the tensors are in device memory, which the heap meter does not see.
    let device = crate::run::build::device(config)?;
    crate::memory::reset_device_peak(&device)?;
    let device_base = crate::memory::device_memory(&device)?.map_or(0, |r| r.used_bytes);
    // An `auto` budget is what the device has free before the run allocates.
    let budget = crate::plan::configured_budget(config)?;
    let run = Run::build(config)?;
    let Some(learner) = run.learner else {
        // Run::build gives baselines no learner; build_learner says why.
        return Err(build_learner(config)
            .err()
            .expect("a baseline has no learner"));
    };
    let engine = build_engine(config, run.model.as_ref())?;
    let mut trainer = Trainer {
        config,
        model: run.model.as_ref(),
        statistics_source: None,
        engine,
        learner,
        outer: run.outer,
        params: run.params,
        best: None,
        stale: 0,
        micro_batch: config.memory_optimization.gradient_accumulation.micro_batch,
        guard: None,
        run_dir: run_dir(config),
        config_yaml: config.to_yaml_string()?,
        mlflow_run_id: None,
    };
    let (start, resume) = match &options.resume {
        Some(dir) => trainer.resume_from(dir)?,
        None => (0, None),
    };
    let run_dir = trainer.run_dir.clone();
    std::fs::create_dir_all(&run_dir).map_err(|e| crate::Error::io(&run_dir, e))?;
    let mut sources = build_sources(config, crate::data::training_splits(&config.data))?;
    let train_source = sources.remove(0);
    // None: the data set keeps no validation classes (data.val_fraction: 0).
    let val_source = sources.pop();
    let train_classes = train_source.class_names();
    let meta_batch = config.meta_learning.meta_batch_size;
    let total = config.meta_learning.num_iterations;
    // Validation bounds num_iterations × meta_batch_size, and start ≤ num_iterations.
    let first_episode = start
        .checked_mul(meta_batch)
        .and_then(|n| u64::try_from(n).ok())
        .ok_or_else(|| {
            crate::Error::InvalidArgument(format!(
                "iteration {start} × meta_batch_size {meta_batch} overflows the episode index"
            ))
        })?;
    if config.evaluation.batch_norm == BatchNormEvaluation::Running {
        trainer.statistics_source = Some(train_source.clone());
    }
    let mut prefetcher = Prefetcher::new(train_source, first_episode, meta_batch, 2)?;
    // The budget holds for the run from building the model on (model, data and
    // steps), which is what the planner predicts.
    trainer.guard = budget
        .map(|budget| BudgetGuard::arm_on(&device, budget, meter.baseline_bytes(), device_base))
        .transpose()?;
    // From here on every way out ends the tracker (see `RunEnd` below).
    let mut tracker = RunTracker::create(
        &config.tracking.output_dir,
        &config.tracking.experiment_name,
        &run_name(config),
        &trainer.config_yaml,
        &tracked_params(config),
        TrackerOptions {
            tensorboard: config.tracking.tensorboard,
            mlflow: config.tracking.mlflow,
            resume,
        },
    )?;
    trainer.mlflow_run_id = tracker.mlflow_run_id().map(str::to_owned);
    let mut summary = TrainSummary {
        run_dir: run_dir.clone(),
        iterations: start,
        params: trainer.params.clone(),
        best_val_score: trainer.best,
        history: Vec::new(),
        validations: Vec::new(),
        interrupted: false,
        stopped_early: false,
        seconds_per_iteration: None,
        peak_bytes: None,
        train_classes,
    };
    let mut times = Vec::new();
    let outcome = (|| -> Result<()> {
        for iteration in start..total {
            let stop_requested = options
                .stop
                .as_ref()
                .is_some_and(|s| s.load(Ordering::SeqCst))
                || options
                    .max_iterations
                    .is_some_and(|m| iteration - start >= m);
            if stop_requested {
                summary.interrupted = true;
                trainer.save("last", iteration)?;
                break;
            }
            let started = Instant::now();
            let tasks = prefetcher.next_batch()?;
            let (stats, reduced_micro_batch) = trainer
                .step(iteration, &tasks)
                .map_err(|e| e.context(format!("iteration {}", iteration + 1)))?;
            let seconds = started.elapsed().as_secs_f64();
            times.push(seconds);
            summary.iterations = iteration + 1;
            let mut metrics = step_metrics(&stats, seconds);
            let validate =
                (iteration + 1) % config.evaluation.eval_every == 0 || iteration + 1 == total;
            let (mut validation, mut new_best) = (None, false);
            if validate {
                match &val_source {
                    Some(source) => {
                        let (score, best) = trainer.validate(source.as_ref())?;
                        validation = Some(score);
                        metrics.push(("val/score", score));
                        summary.validations.push((iteration + 1, score));
                        new_best = best;
                    }
                    // Nothing to choose by: the latest iterate is the best.
                    None => new_best = true,
                }
            }
            if crate::memory::is_installed() {
                metrics.push(("memory/peak_bytes", meter.peak_above_baseline() as f64));
            }
            let device_memory = crate::memory::device_memory(&device)?;
            if let Some(reading) = device_memory {
                metrics.push(("memory/device_bytes", reading.used_bytes as f64));
                metrics.push(("memory/device_peak_bytes", reading.peak_bytes as f64));
            }
            if let Some(size) = reduced_micro_batch {
                metrics.push(("memory/micro_batch", size as f64));
            }
            // Logged before the checkpoints are written: a crash in between leaves
            // the step logged past the older checkpoint, which a resumed run drops
            // and logs again, rather than checkpointed but never logged.
            tracker.log((iteration + 1) as u64, &metrics)?;
            if new_best {
                trainer.save("best", iteration + 1)?;
            }
            if validate {
                trainer.save("last", iteration + 1)?;
            }
            if let Some(report) = &options.on_iteration {
                report(&IterationReport {
                    iteration: iteration + 1,
                    total,
                    stats: &stats,
                    validation,
                    best: trainer.best,
                    seconds,
                    reduced_micro_batch,
                    device_memory,
                });
            }
            summary.history.push(stats);
            if config
                .evaluation
                .early_stopping_patience
                .is_some_and(|patience| trainer.stale >= patience)
            {
                summary.stopped_early = true;
                break;
            }
        }
        Ok(())
    })();
    let end = match &outcome {
        Err(_) => RunEnd::Failed,
        Ok(()) if summary.interrupted => RunEnd::Killed,
        Ok(()) => RunEnd::Finished,
    };
    let finished = tracker.finish(end);
    // The loop's error is the one to report; a failure to end the records after
    // it is secondary.
    if let (Err(_), Err(e)) = (&outcome, &finished) {
        eprintln!("warning: the run's records could not be ended: {e}");
    }
    outcome?;
    finished?;
    summary.params = trainer.params;
    summary.best_val_score = trainer.best;
    summary.seconds_per_iteration = crate::eval::stats::median(&times);
    summary.peak_bytes = crate::memory::is_installed().then(|| meter.peak_above_baseline() as u64);
    Ok(summary)
}

/// What an iteration logs of its step.
fn step_metrics(stats: &StepStats, seconds: f64) -> Vec<(&'static str, f64)> {
    let mut metrics = vec![
        ("train/query_loss", stats.query_loss),
        ("train/support_loss", stats.support_loss),
        ("train/grad_norm", stats.grad_norm),
        ("train/seconds", seconds),
    ];
    if !stats.regression {
        metrics.push(("train/query_accuracy", stats.query_accuracy));
    }
    if let Some(scale) = stats.loss_scale {
        // f16: the scale this step ran under, and whether it overflowed (skipped).
        metrics.push(("train/loss_scale", scale));
        metrics.push(("train/skipped", f64::from(u8::from(stats.skipped))));
    }
    metrics
}

/// The state of a training run between iterations, and what it does each one.
struct Trainer<'a> {
    config: &'a Config,
    model: &'a dyn FewShotModel,
    /// The training episodes running BatchNorm statistics are estimated on, with
    /// `evaluation.batch_norm: running`.
    statistics_source: Option<Arc<dyn EpisodeSource>>,
    engine: Box<dyn GradEngine + 'a>,
    learner: Box<dyn MetaLearner>,
    outer: OuterUpdate,
    params: ParamSet,
    /// The best validation score so far, and validations since it.
    best: Option<f64>,
    stale: usize,
    /// The micro-batch in use (halved when a step goes above the budget).
    micro_batch: Option<usize>,
    guard: Option<BudgetGuard>,
    run_dir: PathBuf,
    config_yaml: String,
    mlflow_run_id: Option<String>,
}

impl Trainer<'_> {
    /// Restores parameters, optimiser and progress from the checkpoint `dir`: the
    /// iteration to continue from, and where the records continue.
    fn resume_from(&mut self, dir: &Path) -> Result<(usize, Option<Resume>)> {
        let checkpoint = load_checkpoint(dir, &self.params)?;
        self.params = checkpoint.params;
        self.outer
            .optimizer
            .restore(checkpoint.state.optimizer_steps, checkpoint.moments);
        let start = checkpoint.state.iteration;
        self.best = checkpoint.state.best_val_score;
        self.stale = checkpoint.state.validations_since_best;
        if checkpoint.state.loss_scaler.is_some() && self.outer.loss_scale.is_some() {
            self.outer.loss_scale = checkpoint.state.loss_scaler;
        }
        let total = self.config.meta_learning.num_iterations;
        if start > total {
            return Err(crate::Error::Config {
                key: "meta_learning.num_iterations".into(),
                message: format!(
                    "the checkpoint {} has completed {start} iterations, more than the {total} \
                     of this run; raise num_iterations (--num-iterations) to continue it",
                    dir.display(),
                ),
            });
        }
        // The records continue from the checkpoint: what a crashed run logged after
        // it is dropped, and its MLflow run goes on.
        let resume = Resume {
            step: start as u64,
            mlflow_run_id: checkpoint.state.mlflow_run_id,
        };
        Ok((start, Some(resume)))
    }

    /// One meta-step on `tasks`, moving the parameters. A step that goes above the
    /// memory budget, or runs out of GPU memory, is redone with half the micro-batch
    /// (nothing changed before it was abandoned, and its tensors are freed as the
    /// error returns), which stays in use; that micro-batch is returned.
    fn step(&mut self, iteration: usize, tasks: &[Episode]) -> Result<(StepStats, Option<usize>)> {
        let dropout = training_mode(
            self.config.seed,
            iteration,
            self.config.meta_learning.meta_batch_size,
        );
        let mut reduced = None;
        loop {
            if let Some(guard) = &self.guard {
                guard.clear()?;
            }
            let outcome = meta_step(
                self.learner.as_ref(),
                self.engine.as_ref(),
                &self.params,
                tasks,
                &mut self.outer,
                dropout,
            );
            match outcome {
                Err(e)
                    if matches!(e, crate::Error::OverBudget { .. })
                        || e.is_device_out_of_memory() =>
                {
                    let what = match e {
                        crate::Error::OverBudget { budget } => {
                            format!("more than the budget of {}", format_bytes(budget))
                        }
                        _ => "more memory than the GPU has free".to_string(),
                    };
                    let half = halved_micro_batch(self.micro_batch, tasks)
                        .filter(|&half| self.learner.set_micro_batch(Some(half)))
                        .ok_or_else(|| {
                            crate::Error::MemoryBudget(format!(
                                "a meta-step needs {what} even with the smallest micro-batch \
                                 this learner takes; raise --memory-budget, or enable \
                                 memory_optimization.checkpointing or precision: bf16"
                            ))
                        })?;
                    self.micro_batch = Some(half);
                    reduced = Some(half);
                }
                outcome => {
                    let (next, stats) = outcome?;
                    self.params = next;
                    return Ok((stats, reduced));
                }
            }
        }
    }

    /// The validation score of the current parameters, and whether it is the best
    /// so far.
    fn validate(&mut self, source: &dyn EpisodeSource) -> Result<(f64, bool)> {
        let _running = match &self.statistics_source {
            Some(train) => {
                running_statistics(self.config, self.model, &self.params, train.as_ref())?
            }
            None => None,
        };
        let score = validation_score(
            self.learner.as_ref(),
            self.engine.as_ref(),
            &self.params,
            source,
            self.config.evaluation.val_episodes,
            // f16: adaptation's backward passes need the loss scale too.
            self.outer.loss_scale.as_ref().map(LossScaler::scale),
        )?;
        let best = self.best.is_none_or(|b| score > b);
        if best {
            self.best = Some(score);
            self.stale = 0;
        } else {
            self.stale += 1;
        }
        Ok((score, best))
    }

    /// Writes the checkpoint `name` (`best` or `last`) of the run after `iteration`
    /// iterations.
    fn save(&self, name: &str, iteration: usize) -> Result<()> {
        let config = self.config;
        let state = CheckpointState {
            iteration,
            optimizer_steps: self.outer.optimizer.steps(),
            best_val_score: self.best,
            validations_since_best: self.stale,
            model: config
                .model
                .path
                .as_ref()
                .map_or(config.model.name.clone(), |p| p.display().to_string()),
            lora_rank: config.lora.rank,
            n_way: config.data.n_way,
            config: self.config_yaml.clone(),
            loss_scaler: self.outer.loss_scale.clone(),
            mlflow_run_id: self.mlflow_run_id.clone(),
        };
        save_checkpoint(
            &self.run_dir.join(name),
            &self.params,
            &self.outer.optimizer,
            &state,
        )
    }
}

/// The settings a tracker records as a run's parameters (MLflow `params`).
fn tracked_params(config: &Config) -> Vec<(String, String)> {
    let ml = &config.meta_learning;
    vec![
        ("method".into(), Variant::of(config).to_string()),
        ("model".into(), config.model.name.clone()),
        ("lora_rank".into(), config.lora.rank.to_string()),
        ("inner_steps".into(), ml.inner.steps.to_string()),
        ("inner_lr".into(), ml.inner.lr.to_string()),
        ("inner_adapt".into(), ml.inner.adapt.to_string()),
        ("outer_lr".into(), ml.outer.lr.to_string()),
        ("meta_batch_size".into(), ml.meta_batch_size.to_string()),
        ("num_iterations".into(), ml.num_iterations.to_string()),
        ("n_way".into(), config.data.n_way.to_string()),
        ("k_shot".into(), config.data.k_shot.to_string()),
        ("seed".into(), config.seed.to_string()),
    ]
}

/// The checkpoint folder `dir`'s parameters for `model`, or its initialisation.
pub fn params_from(
    model: &dyn FewShotModel,
    config: &Config,
    checkpoint: Option<&Path>,
) -> Result<ParamSet> {
    let init = crate::run::build::initial_params(model, config)?;
    let replaced = replaceable_at_other_shapes(config);
    let replaced: Vec<&str> = replaced.iter().map(String::as_str).collect();
    match checkpoint {
        Some(dir) => super::checkpoint::load_checkpoint_params(dir, &init, &replaced),
        None => Ok(init),
    }
}

/// The parameters whose values cannot change what `config`'s learner computes, so a
/// checkpoint meta-trained at another `data.n_way` is evaluated (or adapted) with
/// this configuration's own: the classification head, which the metric learners
/// never read, and FS-CT's prototype weights at one shot, where the softmax over a
/// single shot is 1 whatever the weight. FS-CT at several shots keeps its trained
/// weights, so there the shapes must match.
fn replaceable_at_other_shapes(config: &Config) -> Vec<String> {
    use crate::config::Method;
    let head = [crate::models::HEAD_WEIGHT, crate::models::HEAD_BIAS].map(String::from);
    match config.meta_learning.method {
        Method::Protonet => head.to_vec(),
        Method::FsctCosine | Method::FsctSoftmax if config.data.k_shot == 1 => {
            let mut names = head.to_vec();
            names.push(format!("{}proto_weight", crate::meta::FSCT_PREFIX));
            names
        }
        Method::FsctCosine | Method::FsctSoftmax => head.to_vec(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::build::build_model;

    fn tiny_config(output: &Path) -> Config {
        let yaml = "seed: 3\nmodel:\n  name: tiny-bert\n  max_length: 16\nlora:\n  rank: 2\n\
                    meta_learning:\n  method: maml\n  meta_batch_size: 2\n  num_iterations: 6\n  \
                    inner:\n    steps: 1\n    lr: 0.5\n\
                    data:\n  n_way: 3\n  k_shot: 2\n  n_query: 2\n\
                    evaluation:\n  episodes: 3\n  eval_every: 3\n";
        let mut config = Config::from_yaml_str(yaml).unwrap();
        config.tracking.output_dir = output.to_path_buf();
        config
    }

    /// The GPU of `MELORA_TEST_DEVICE`, or `None` (with a message) when the tests run
    /// on the CPU.
    fn test_gpu() -> Option<candle_core::Device> {
        let device = crate::fixtures::test_device();
        if device.is_cpu() {
            eprintln!("skipped: needs a GPU (MELORA_TEST_DEVICE=cuda)");
            return None;
        }
        Some(device)
    }

    /// A run on the test GPU whose sets of 12 examples of 24 tokens make the
    /// activations a large part of the device memory it uses.
    fn device_config(output: &Path, micro_batch: Option<usize>) -> Config {
        let mut config = tiny_config(output);
        config.device = crate::fixtures::test_device_setting();
        config.model.max_length = 24;
        config.meta_learning.num_iterations = 3;
        config.meta_learning.inner.steps = 2;
        config.meta_learning.inner.mode = crate::config::InnerMode::Recompute;
        config.data.k_shot = 4;
        config.data.n_query = 4;
        config.evaluation.eval_every = 100;
        config.memory_optimization.gradient_accumulation.micro_batch = micro_batch;
        config
    }

    /// Trains, with the device's peak above its use before the run.
    fn device_run(config: &Config, device: &candle_core::Device) -> (TrainSummary, u64) {
        let meter = crate::memory::TensorMeter::start(device).unwrap();
        let summary = train(config, &TrainOptions::default()).unwrap();
        (summary, meter.peak_above_baseline().unwrap())
    }

    /// The unconstrained run and the device peaks of whole sets and of micro-batches
    /// of 1, with the byte count halfway between them.
    fn device_peaks(dir: &Path, device: &candle_core::Device) -> (TrainSummary, u64) {
        let (whole, whole_peak) = device_run(&device_config(&dir.join("a"), None), device);
        let (_, single_peak) = device_run(&device_config(&dir.join("b"), Some(1)), device);
        eprintln!("device peaks: whole sets {whole_peak} B, micro-batch 1 {single_peak} B");
        assert!(
            (single_peak as f64) < 0.9 * whole_peak as f64,
            "micro-batches should lower the peak"
        );
        (whole, (single_peak + whole_peak) / 2)
    }

    /// That `constrained` redid a step with a smaller micro-batch and ended with the
    /// parameters of `whole`.
    fn assert_redone_alike(whole: &TrainSummary, constrained: &TrainSummary) {
        let metrics = std::fs::read_to_string(constrained.run_dir.join("metrics.jsonl")).unwrap();
        assert!(
            metrics.contains("memory/micro_batch"),
            "no step was redone: {metrics}"
        );
        let gap = constrained
            .params
            .sub(&whole.params)
            .unwrap()
            .norm()
            .unwrap()
            / whole.params.norm().unwrap();
        assert!(gap < 1e-5, "the constrained run differs by {gap:.3e}");
    }

    /// The device check's provoked out-of-memory error: with a ballast taking all
    /// of the GPU's memory but what lies between the peaks of whole sets and of
    /// micro-batches of 1, the first step runs out of device memory, is redone
    /// with smaller micro-batches, and the run ends with the unconstrained run's
    /// parameters. Runs where `MELORA_TEST_DEVICE` names a GPU.
    #[test]
    fn on_the_device_an_out_of_memory_step_is_redone_with_smaller_micro_batches() {
        let Some(device) = test_gpu() else { return };
        let dir = tempfile::tempdir().unwrap();
        let (whole, room) = device_peaks(dir.path(), &device);
        let free = crate::memory::free_memory_bytes(&device).unwrap().unwrap();
        let ballast = candle_core::Tensor::zeros(
            (free.saturating_sub(room) as usize,),
            candle_core::DType::U8,
            &device,
        )
        .unwrap();
        let (constrained, _) = device_run(&device_config(&dir.path().join("c"), None), &device);
        drop(ballast);
        assert_redone_alike(&whole, &constrained);
    }

    /// A device budget between the peaks of whole sets and of micro-batches of 1 is
    /// met with smaller micro-batches (the budget guard reads the GPU's memory
    /// pool), and the run ends with the unconstrained run's parameters. Runs where
    /// `MELORA_TEST_DEVICE` names a GPU (on the CPU, tests/memory_budget.rs).
    #[test]
    fn on_the_device_a_budget_is_met_with_smaller_micro_batches() {
        let Some(device) = test_gpu() else { return };
        let dir = tempfile::tempdir().unwrap();
        let (whole, budget) = device_peaks(dir.path(), &device);
        let mut limited = device_config(&dir.path().join("c"), None);
        limited.memory_optimization.budget.limit = Some(budget.to_string());
        let (constrained, _) = device_run(&limited, &device);
        assert_redone_alike(&whole, &constrained);
    }

    /// f16 activations over an int8 base with a scale forced to overflow: the run skips
    /// steps until the scale fits, keeps f32 finite parameters, and a resumed run
    /// continues with the checkpoint's scale (same parameters as uninterrupted).
    #[test]
    fn f16_int8_training_recovers_from_overflow_and_resumes_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let config = |name: &str| {
            let mut c = tiny_config(&dir.path().join(name));
            c.model.quantization = crate::config::Quantization::Int8;
            c.memory_optimization.precision = crate::config::Precision::F16;
            c.memory_optimization.loss_scaling.initial_scale = 2f64.powi(24);
            c.memory_optimization.loss_scaling.growth_interval = 2;
            c.meta_learning.num_iterations = 10;
            c
        };
        let whole = train(&config("a"), &TrainOptions::default()).unwrap();
        assert!(whole
            .params
            .iter()
            .all(|(_, t)| t.dtype() == candle_core::DType::F32));
        assert!(whole.params.norm().unwrap().is_finite());
        let skipped = whole.history.iter().filter(|s| s.skipped).count();
        assert!(skipped >= 1, "the forced scale did not overflow");
        assert!(skipped < whole.history.len(), "no step was applied");
        let first = train(
            &config("b"),
            &TrainOptions {
                max_iterations: Some(7),
                ..Default::default()
            },
        )
        .unwrap();
        let saved = load_checkpoint(&first.run_dir.join("last"), &first.params).unwrap();
        let scaler = saved
            .state
            .loss_scaler
            .expect("the scaler's state is saved");
        assert!(scaler.scale() < 2f64.powi(24));
        let resumed = train(
            &config("b"),
            &TrainOptions {
                resume: Some(first.run_dir.join("last")),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(
            resumed.params.sub(&whole.params).unwrap().norm().unwrap(),
            0.0,
            "resumed run differs"
        );
    }

    /// Interrupted after 4 iterations and resumed from the last checkpoint, a run ends
    /// with the uninterrupted run's parameters.
    #[test]
    fn resumed_training_equals_uninterrupted_training() {
        let dir = tempfile::tempdir().unwrap();
        let whole = train(
            &tiny_config(&dir.path().join("a")),
            &TrainOptions::default(),
        )
        .unwrap();
        assert_eq!(whole.iterations, 6);
        assert_eq!(whole.validations.len(), 2);
        let config = tiny_config(&dir.path().join("b"));
        let first = train(
            &config,
            &TrainOptions {
                max_iterations: Some(4),
                ..Default::default()
            },
        )
        .unwrap();
        assert!(first.interrupted);
        assert_eq!(first.iterations, 4);
        let resumed = train(
            &config,
            &TrainOptions {
                resume: Some(first.run_dir.join("last")),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(resumed.iterations, 6);
        let gap = resumed.params.sub(&whole.params).unwrap().norm().unwrap()
            / whole.params.norm().unwrap();
        assert!(gap < 1e-6, "resumed run differs by {gap:.3e}");
        // The interruption left only complete checkpoints.
        let leftovers: Vec<_> = std::fs::read_dir(&first.run_dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|n| n.contains("partial") || n.ends_with(".old"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn missing_or_mismatched_checkpoints_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let config = tiny_config(&dir.path().join("a"));
        let missing = TrainOptions {
            resume: Some(dir.path().join("nowhere")),
            ..Default::default()
        };
        let err = train(&config, &missing).unwrap_err().to_string();
        assert!(
            err.contains("nowhere") && err.contains("state.json"),
            "{err}"
        );
        let first = train(
            &config,
            &TrainOptions {
                max_iterations: Some(1),
                ..Default::default()
            },
        )
        .unwrap();
        let mut other = tiny_config(&dir.path().join("b"));
        other.lora.rank = 4;
        let resume = TrainOptions {
            resume: Some(first.run_dir.join("last")),
            ..Default::default()
        };
        let err = train(&other, &resume).unwrap_err().to_string();
        assert!(
            err.contains("does not fit this model") && err.contains("rank 2"),
            "{err}"
        );
    }

    /// The MLflow runs (folder, `meta.yaml`) of the experiment `tiny_config` writes to.
    fn mlflow_runs(output: &Path) -> Vec<(PathBuf, serde_norway::Value)> {
        let experiment = output.join("mlruns/1");
        let mut runs: Vec<(PathBuf, serde_norway::Value)> = std::fs::read_dir(&experiment)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.join("meta.yaml").exists())
            .map(|p| {
                let meta =
                    serde_norway::from_str(&std::fs::read_to_string(p.join("meta.yaml")).unwrap())
                        .unwrap();
                (p, meta)
            })
            .collect();
        runs.sort_by(|a, b| a.0.cmp(&b.0));
        runs
    }

    /// An error in the loop (here: a checkpoint that cannot be written) is returned
    /// as it was, and the MLflow run ends FAILED instead of staying RUNNING.
    #[test]
    fn a_failing_run_is_failed_in_mlflow_and_keeps_its_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = tiny_config(dir.path());
        config.tracking.mlflow = true;
        // A file where the first checkpoint (iteration 3) is staged.
        let blocker = super::super::checkpoint::staging_dir(&run_dir(&config).join("best"));
        std::fs::create_dir_all(blocker.parent().unwrap()).unwrap();
        std::fs::write(&blocker, b"in the way").unwrap();
        let err = train(&config, &TrainOptions::default()).unwrap_err();
        match &err {
            crate::Error::Io { path, .. } => assert_eq!(path, &blocker, "{err}"),
            other => panic!("expected the checkpoint's Error::Io, got {other:?}"),
        }
        let runs = mlflow_runs(dir.path());
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0].1["status"].as_u64(), Some(4), "FAILED");
        assert!(runs[0].1["end_time"].as_u64().is_some());
    }

    /// A stop request (Ctrl-C) ends the MLflow run KILLED; resuming continues that
    /// run (FINISHED at the end), each metric logged once per step.
    #[test]
    fn a_stopped_run_is_killed_in_mlflow_and_its_resumption_continues_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = tiny_config(dir.path());
        config.tracking.mlflow = true;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let first = train(
            &config,
            &TrainOptions {
                stop: Some(stop),
                on_iteration: Some(Arc::new(move |report: &IterationReport<'_>| {
                    if report.iteration == 4 {
                        flag.store(true, Ordering::SeqCst);
                    }
                })),
                ..Default::default()
            },
        )
        .unwrap();
        assert!(first.interrupted);
        assert_eq!(first.iterations, 4);
        let runs = mlflow_runs(dir.path());
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0].1["status"].as_u64(), Some(5), "KILLED");
        assert!(runs[0].1["end_time"].as_u64().is_some());

        let resumed = train(
            &config,
            &TrainOptions {
                resume: Some(first.run_dir.join("last")),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(resumed.iterations, 6);
        let runs = mlflow_runs(dir.path());
        assert_eq!(runs.len(), 1, "the resumption opened a new MLflow run");
        let (run, meta) = &runs[0];
        assert_eq!(meta["status"].as_u64(), Some(3), "FINISHED");
        let steps: Vec<u64> = std::fs::read_to_string(run.join("metrics/train/query_loss"))
            .unwrap()
            .lines()
            .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
            .collect();
        assert_eq!(steps, [1, 2, 3, 4, 5, 6]);
    }

    /// Every step a checkpoint includes is logged: a run that dies between writing
    /// `best` and `last` at iteration 3 (here `last` cannot be staged) has step 3
    /// in `metrics.jsonl`, and resuming from `best` then logs each step once.
    #[test]
    fn a_checkpointed_step_is_logged_even_if_the_run_dies_checkpointing() {
        let dir = tempfile::tempdir().unwrap();
        let config = tiny_config(dir.path());
        let run = run_dir(&config);
        let blocker = super::super::checkpoint::staging_dir(&run.join("last"));
        std::fs::create_dir_all(&run).unwrap();
        std::fs::write(&blocker, b"in the way").unwrap();
        train(&config, &TrainOptions::default()).unwrap_err();
        let best = super::super::checkpoint::read_checkpoint_state(&run.join("best")).unwrap();
        assert_eq!(best.iteration, 3);
        let steps = |run: &Path| -> Vec<u64> {
            crate::track::read_metrics(&run.join("metrics.jsonl"))
                .unwrap()
                .iter()
                .map(|r| r.step)
                .collect()
        };
        assert_eq!(steps(&run), [1, 2, 3], "checkpointed step 3 is not logged");
        std::fs::remove_file(&blocker).unwrap();
        let resumed = train(
            &config,
            &TrainOptions {
                resume: Some(run.join("best")),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(resumed.iterations, 6);
        assert_eq!(steps(&run), [1, 2, 3, 4, 5, 6]);
    }

    /// A checkpoint's iteration beyond num_iterations (7 of 6), or at usize::MAX, used
    /// to end the run at once with 7 "completed" iterations, or to overflow
    /// `start × meta_batch`.
    #[test]
    fn resuming_a_checkpoint_beyond_num_iterations_is_a_config_error() {
        let dir = tempfile::tempdir().unwrap();
        let config = tiny_config(&dir.path().join("a"));
        let first = train(
            &config,
            &TrainOptions {
                max_iterations: Some(1),
                ..Default::default()
            },
        )
        .unwrap();
        let last = first.run_dir.join("last");
        let state_path = last.join("state.json");
        let state: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&state_path).unwrap()).unwrap();
        for iteration in [7, usize::MAX] {
            let mut crafted = state.clone();
            crafted["iteration"] = serde_json::json!(iteration);
            std::fs::write(&state_path, serde_json::to_vec(&crafted).unwrap()).unwrap();
            let resume = TrainOptions {
                resume: Some(last.clone()),
                ..Default::default()
            };
            match train(&config, &resume) {
                Err(crate::Error::Config { key, message }) => {
                    assert_eq!(key, "meta_learning.num_iterations");
                    assert!(
                        message.contains("last") && message.contains(&iteration.to_string()),
                        "{message}"
                    );
                }
                other => panic!("iteration {iteration}: expected a config error, got {other:?}"),
            }
        }
    }

    /// A count near usize::MAX (`evaluate --episodes`) used to be a 'capacity
    /// overflow' panic before the first episode was drawn.
    #[test]
    fn a_huge_episode_count_is_no_capacity_overflow() {
        struct Failing;
        impl EpisodeSource for Failing {
            fn episode(&self, index: u64) -> Result<crate::data::Episode> {
                Err(crate::Error::InvalidArgument(format!("no episode {index}")))
            }
        }
        let config = tiny_config(Path::new("unused"));
        let model = build_model(&config).unwrap();
        let learner = build_learner(&config).unwrap();
        let params = model.init_params(1).unwrap();
        let err = validation_score(
            learner.as_ref(),
            &crate::engine::WholeGraph::new(model.as_ref()),
            &params,
            &Failing,
            usize::MAX,
            None,
        )
        .unwrap_err();
        assert!(err.to_string().contains("no episode 0"), "{err}");
    }

    #[test]
    fn an_unwritable_output_directory_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a-file");
        std::fs::write(&file, b"x").unwrap();
        let err = train(&tiny_config(&file.join("runs")), &TrainOptions::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("a-file"), "{err}");
    }
}
