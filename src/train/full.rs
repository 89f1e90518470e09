//! `melora full`: the configured method and its baselines trained on the same splits
//! and seeds, evaluated on the same test episodes, compared with paired statistics,
//! and (if configured) an ablation grid — everything saved in
//! `<output_dir>/<experiment>/results.json` after each run, so an interruption keeps
//! what was finished.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::{Config, HessianKind, Method, Variant};
use crate::data::{episode_source, episode_sources, Split};
use crate::eval::stats::{
    bootstrap_ci_diff, cohens_d_paired, mean_ci, paired_t_test, wilcoxon_signed_rank,
};
use crate::eval::{Evaluation, IntervalRecord};
use crate::memory::MemoryMeter;
use crate::nn::Mode;
use crate::{Error, Result};

use super::curve::{adaptation_curve, sinusoid_fit, CurvePoint, SinusoidFit};
use super::evaluate::{evaluate, save_evaluation, EvaluateOptions};
use super::pretrain::pretrain;
use super::resume::{run_identity, unfinished_training, Earlier, Reuse};
use super::run::{run_dir, train, TrainOptions};
use crate::run::build::{
    build_engine, build_learner, build_model, build_text_encoder, initial_params,
};

/// File name of a comparison's results inside the experiment folder.
pub const RESULTS_FILE: &str = "results.json";

/// One method trained with one seed and evaluated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// The method (see [`Variant`]), or an ablation point's label.
    pub label: String,
    /// Training seed.
    pub seed: u64,
    /// The run's folder (`None` for the fine-tuning baselines, which do not train).
    pub run_dir: Option<PathBuf>,
    /// Meta-iterations trained.
    pub iterations: usize,
    /// Median seconds per meta-iteration.
    pub seconds_per_iteration: Option<f64>,
    /// Peak heap bytes of training (model, data, graphs) above the start, or of the
    /// evaluation for the fine-tuning baselines.
    pub peak_bytes: Option<u64>,
    /// The test-episode scores (with the classes they were drawn from).
    pub evaluation: Evaluation,
    /// The classes meta-training drew its tasks from (`None` for synthetic tasks and
    /// for the baselines that do not meta-train).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_classes: Option<Vec<String>>,
    /// The fine-tuning learning rate the test used (fine-tuning baselines only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finetune_lr: Option<f64>,
    /// The learning rates tried on meta-validation tasks, with their scores.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lr_sweep: Vec<LrTrial>,
    /// The test score after each of `evaluation.curve_steps` adaptation steps
    /// (methods with an inner loop, and the pre-trained model adapted by the same
    /// steps); empty when no curve is configured.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub curve: Vec<CurvePoint>,
    /// The first sinusoid test task fitted after some of those steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fit: Option<SinusoidFit>,
    /// The pre-trained baseline's SGD step size in the curve, chosen among
    /// `comparison.finetune_lr_sweep` on meta-validation tasks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub curve_lr: Option<f64>,
    /// The run's configuration less where it was written and the comparison's plan,
    /// by which `melora full --resume` knows whether the run can be kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<serde_json::Value>,
}

/// One learning rate of a fine-tuning baseline's sweep.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LrTrial {
    /// The learning rate.
    pub lr: f64,
    /// Mean validation score (accuracy, or minus the MSE) on
    /// `evaluation.val_episodes` meta-validation tasks.
    pub val_score: f64,
}

/// The class-disjoint split of a data set's classes that every run of an experiment
/// shares.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SplitRecord {
    /// Meta-training classes.
    pub train: Vec<String>,
    /// Meta-validation classes (checkpoint selection, learning-rate sweeps).
    pub val: Vec<String>,
    /// Meta-test classes (every reported score).
    pub test: Vec<String>,
}

/// A method's scores pooled over seeds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MethodSummary {
    /// The method.
    pub label: String,
    /// Seeds trained.
    pub seeds: usize,
    /// Mean headline metric (accuracy, or MSE for regression) over the test episodes,
    /// each episode's value averaged over seeds, with its confidence interval.
    pub headline: IntervalRecord,
    /// Mean macro-F1 over episodes and seeds (classification).
    pub macro_f1: Option<f64>,
    /// Largest peak memory over the seeds.
    pub peak_bytes: Option<u64>,
    /// Mean over seeds of the median seconds per meta-iteration.
    pub seconds_per_iteration: Option<f64>,
    /// Mean seconds of adaptation per test task.
    pub adapt_seconds: f64,
    /// Per-episode headline values averaged over seeds (the paired samples).
    pub per_episode: Vec<f64>,
}

/// A two-sided test's outcome in serialisable form.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TestRecord {
    /// The statistic (t, or Wilcoxon's min(W+, W−)).
    pub statistic: f64,
    /// Two-sided p-value.
    pub p_value: f64,
}

/// One method against another, paired by test episode.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    /// The method compared (in `comparisons`, the configured one).
    #[serde(default)]
    pub method: String,
    /// The method it is compared with.
    pub baseline: String,
    /// Mean of (method − baseline) in the headline metric.
    pub mean_difference: f64,
    /// Paired t-test (`None` when every difference is equal, e.g. all zero).
    pub t_test: Option<TestRecord>,
    /// Wilcoxon signed-rank test (`None` when every difference is zero).
    pub wilcoxon: Option<TestRecord>,
    /// Cohen's d of the paired differences (`None` when they do not vary).
    pub cohens_d: Option<f64>,
    /// Percentile bootstrap interval of the mean difference, `[low, high]`.
    pub bootstrap: Option<(f64, f64)>,
}

/// One point of the ablation grid.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AblationPoint {
    /// LoRA rank.
    pub lora_rank: usize,
    /// Inner steps K.
    pub inner_steps: usize,
    /// Hessian approximation (the melora method), else `None`.
    pub hessian: Option<HessianKind>,
    /// Mean headline metric and its interval.
    pub headline: IntervalRecord,
    /// Peak memory of training.
    pub peak_bytes: Option<u64>,
}

/// Peak memory of one task's meta-gradient with K inner steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemoryPoint {
    /// The method.
    pub label: String,
    /// Inner steps K.
    pub k: usize,
    /// Peak heap bytes above the model and parameters.
    pub peak_bytes: u64,
}

/// Everything `melora full` produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FullResults {
    /// The experiment's name.
    pub experiment: String,
    /// The configured method, compared against the others.
    pub main: String,
    /// Test episodes per evaluation.
    pub episodes: usize,
    /// Seed of the test episodes (the same for every run).
    pub episode_seed: u64,
    /// Seed of the class split (`data.split_seed`, or the configuration's seed), the
    /// same for every run whatever its training seed.
    #[serde(default)]
    pub split_seed: u64,
    /// The classes of each split, for data sets (`None` for synthetic tasks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub splits: Option<SplitRecord>,
    /// Whether the tasks are regression (headline metric MSE, lower is better).
    pub regression: bool,
    /// Level of the confidence intervals.
    pub confidence: f64,
    /// Every trained and evaluated run.
    pub runs: Vec<RunRecord>,
    /// Each method pooled over seeds, the configured one first.
    pub methods: Vec<MethodSummary>,
    /// The configured method against each other method.
    pub comparisons: Vec<Comparison>,
    /// Every method with meta-learning (a meta-learner, or `meta-init-finetune`)
    /// against the best baseline without it (the best mean headline score among
    /// `no-adaptation`, `prototype`, `lora-finetune`, `finetune` and
    /// `pretrain-finetune`); empty when either side is missing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub against_best_baseline: Vec<Comparison>,
    /// The ablation grid (empty when not configured).
    pub ablation: Vec<AblationPoint>,
    /// Peak memory against K per meta-learning method.
    pub memory_vs_k: Vec<MemoryPoint>,
    /// Whether the comparison stopped early on request.
    pub interrupted: bool,
    /// Baselines of `comparison.baselines` that do not apply to the model or data,
    /// with the reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<SkippedMethod>,
}

impl FullResults {
    /// How `other`'s test tasks differ from these (episodes, their seed, the class
    /// split, the kind of task), or `None` when they are the same tasks, so that
    /// their scores pair by episode.
    pub(crate) fn test_task_mismatch(&self, other: &FullResults) -> Option<String> {
        if self.episodes != other.episodes {
            Some(format!(
                "{} test episodes against {}",
                self.episodes, other.episodes
            ))
        } else if self.episode_seed != other.episode_seed {
            Some(format!(
                "test episodes of seed {} against {}",
                self.episode_seed, other.episode_seed
            ))
        } else if self.split_seed != other.split_seed || self.splits != other.splits {
            Some(format!(
                "class splits of seed {} against {}, or other classes",
                self.split_seed, other.split_seed
            ))
        } else if self.regression != other.regression
            && !self.runs.is_empty()
            && !other.runs.is_empty()
        {
            Some("regression against classification".into())
        } else {
            None
        }
    }
}

/// A method `melora full` did not run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SkippedMethod {
    /// The method.
    pub label: String,
    /// Why it does not apply.
    pub reason: String,
}

/// What the caller sees of a comparison's progress, and how each training is driven.
pub trait FullObserver {
    /// A run (`index` of `total`) starts.
    fn run_started(&mut self, _label: &str, _seed: u64, _index: usize, _total: usize) {}
    /// Options of the next training (stop flag, progress callback).
    fn train_options(&mut self, _label: &str, _iterations: usize) -> TrainOptions {
        TrainOptions::default()
    }
    /// Test episode `done` (1-based) of `total` finished.
    fn evaluation_progress(&mut self, _done: usize, _total: usize) {}
    /// A run finished.
    fn run_finished(&mut self, _record: &RunRecord) {}
    /// A run (`index` of `total`) was kept from the earlier comparison (`--resume`).
    fn run_kept(&mut self, _record: &RunRecord, _index: usize, _total: usize) {}
    /// Something to tell the user, such as the configuration a memory budget chose.
    fn note(&mut self, _text: &str) {}
}

/// `config` fitted to its memory budget, if it sets one (see
/// [`crate::plan::budget`]); the choice is told to `observer`.
fn fitted_to_budget(config: Config, observer: &mut dyn FullObserver) -> Result<Config> {
    match crate::plan::fit_configured(&config)? {
        Some(choice) => {
            observer.note(&choice.explain());
            Ok(choice.config)
        }
        None => Ok(config),
    }
}

/// How `melora full` is driven beyond the configuration.
#[derive(Debug, Clone, Copy, Default)]
pub struct FullOptions {
    /// Run only the configured method (and the ablation).
    pub skip_baselines: bool,
    /// Seeds per method, replacing `comparison.seeds`.
    pub seeds: Option<usize>,
    /// Keep the runs an earlier comparison in the same experiment folder finished
    /// with the same configuration, continue a meta-training it left unfinished from
    /// its last checkpoint, and run only the rest.
    pub resume: bool,
}

/// The experiment folder of `config`: `<output_dir>/<experiment_name>`.
pub fn experiment_dir(config: &Config) -> PathBuf {
    config
        .tracking
        .output_dir
        .join(&config.tracking.experiment_name)
}

/// Runs the comparison (see the module documentation).
pub fn run_full(
    config: &Config,
    options: &FullOptions,
    observer: &mut dyn FullObserver,
) -> Result<FullResults> {
    if !config.data.has_validation_classes() {
        return Err(Error::Config {
            key: "data.val_fraction".into(),
            message: "melora full chooses checkpoints and the fine-tuning baselines' learning \
                      rates on meta-validation classes, and 0 leaves none; set it above 0, or \
                      run train and evaluate"
                .into(),
        });
    }
    let main = Variant::of(config);
    let mut variants = vec![main];
    if !options.skip_baselines {
        variants.extend(config.comparison.baselines.iter().filter(|v| **v != main));
    }
    let seeds = options.seeds.unwrap_or(config.comparison.seeds).max(1);
    let grid = ablation_grid(config);
    let dir = experiment_dir(config);
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    // One class split for the whole experiment: a run of another training seed that
    // split by its own seed would meta-train on classes the evaluation tests.
    let split_seed = config.data.split_seed.unwrap_or(config.seed);
    let mut config = config.clone();
    config.data.split_seed = Some(split_seed);
    let config = &config;
    let mut results = FullResults {
        experiment: config.tracking.experiment_name.clone(),
        main: main.to_string(),
        episodes: config.evaluation.episodes,
        episode_seed: config.seed,
        split_seed,
        splits: split_record(config)?,
        regression: false,
        confidence: config.evaluation.confidence,
        runs: Vec::new(),
        methods: Vec::new(),
        comparisons: Vec::new(),
        against_best_baseline: Vec::new(),
        ablation: Vec::new(),
        memory_vs_k: Vec::new(),
        interrupted: false,
        skipped: Vec::new(),
    };
    let plan = plan_runs(config, &variants, seeds, &grid, &mut results, observer)?;
    let earlier = if options.resume {
        Earlier::load(&dir, &results)?
    } else {
        None
    };
    // Every run's fate decided before any runs, so that results.json holds the kept
    // runs from the start: an interruption loses none of them.
    let mut reuse = Vec::with_capacity(plan.len());
    for planned in &plan {
        reuse.push(match &earlier {
            Some(earlier) => earlier.reuse(
                &planned.label,
                planned.variant,
                planned.config.seed,
                &planned.config,
            )?,
            None => Reuse::Absent,
        });
    }
    // A meta-init-finetune run adapted the checkpoint of the main run of its seed,
    // and is not kept when that run is trained again.
    for i in 0..plan.len() {
        if plan[i].variant != Variant::MetaInitFinetune || !matches!(reuse[i], Reuse::Keep(_)) {
            continue;
        }
        let main_kept = plan.iter().zip(&reuse).any(|(p, r)| {
            p.ablation.is_none()
                && p.variant == main
                && p.config.seed == plan[i].config.seed
                && matches!(r, Reuse::Keep(_))
        });
        if !main_kept {
            reuse[i] = Reuse::Rerun("the checkpoint it adapts is trained again".into());
        }
    }
    let mut records: Vec<Option<RunRecord>> = Vec::with_capacity(plan.len());
    let mut pending = Vec::with_capacity(plan.len());
    for r in reuse {
        match r {
            Reuse::Keep(record) => {
                records.push(Some(*record));
                pending.push(None);
            }
            other => {
                records.push(None);
                pending.push(Some(other));
            }
        }
    }
    if records.iter().any(Option::is_some) {
        collect_runs(&mut results, &plan, &records)?;
        save_results(&results, &dir)?;
    }
    let total = plan.len();
    for (i, planned) in plan.iter().enumerate() {
        let index = i + 1;
        let Some(reuse) = pending[i].take() else {
            let record = records[i].as_ref().expect("a kept run");
            observer.run_kept(record, index, total);
            continue;
        };
        let (label, run_config) = (&planned.label, &planned.config);
        if let Reuse::Rerun(why) = reuse {
            observer.note(&format!(
                "{label} (seed {}) runs again: {why}",
                run_config.seed
            ));
        }
        // The meta-initialisation baseline adapts the main run's checkpoint of the
        // same seed.
        let start = match planned.variant {
            Variant::MetaInitFinetune => Some(main_checkpoint(
                &results,
                &main.to_string(),
                run_config.seed,
            )?),
            _ => None,
        };
        observer.run_started(label, run_config.seed, index, total);
        let continue_from = continued_training(options, planned.variant, run_config, observer)?;
        let Some(record) = train_and_evaluate(
            run_config,
            planned.variant,
            label,
            config.seed,
            start,
            continue_from,
            observer,
        )?
        else {
            results.interrupted = true;
            break;
        };
        observer.run_finished(&record);
        records[i] = Some(record);
        collect_runs(&mut results, &plan, &records)?;
        save_results(&results, &dir)?;
    }
    if !results.interrupted {
        let mut trained: Vec<Variant> = variants
            .iter()
            .copied()
            .filter(|v| v.meta_trains())
            .collect();
        // Full-graph MAML is the memory reference every other method is measured against.
        if trained.contains(&Variant::Maml) && !trained.contains(&Variant::MamlFullGraph) {
            trained.push(Variant::MamlFullGraph);
        }
        results.memory_vs_k = memory_vs_k(config, &trained)?;
        save_results(&results, &dir)?;
    }
    Ok(results)
}

/// One run a comparison holds.
struct PlannedRun {
    variant: Variant,
    /// The method, or the ablation point's label.
    label: String,
    /// The run's configuration, fitted to the memory budget.
    config: Config,
    /// Rank, K and Hessian approximation of an ablation point.
    ablation: Option<(usize, usize, Option<HessianKind>)>,
}

/// Every run of the comparison in order: each applicable method (the configured one
/// first) with each seed, then the ablation grid; the methods that do not apply to
/// the model or data go to `results.skipped`, with the reason.
fn plan_runs(
    config: &Config,
    variants: &[Variant],
    seeds: usize,
    grid: &[(usize, usize, Option<HessianKind>)],
    results: &mut FullResults,
    observer: &mut dyn FullObserver,
) -> Result<Vec<PlannedRun>> {
    let mut plan = Vec::new();
    for &variant in variants {
        if let Some(why) = crate::config::pairing::method_does_not_apply(&variant.apply(config)) {
            observer.note(&format!("{variant} skipped: {why}"));
            results.skipped.push(SkippedMethod {
                label: variant.to_string(),
                reason: why,
            });
            continue;
        }
        for s in 0..seeds {
            let mut run_config = variant.apply(config);
            run_config.seed = config.seed + s as u64;
            let label = variant.to_string();
            // The meta-initialisation baseline evaluates the main run's checkpoint in
            // a folder of its own.
            run_config.tracking.run_name = (variant == Variant::MetaInitFinetune)
                .then(|| format!("{label}-seed{}", run_config.seed));
            plan.push(PlannedRun {
                variant,
                label,
                config: fitted_to_budget(run_config, observer)?,
                ablation: None,
            });
        }
    }
    for &(rank, k, hessian) in grid {
        let mut run_config = config.clone();
        run_config.lora.rank = rank;
        run_config.meta_learning.inner.steps = k;
        if let Some(kind) = hessian {
            run_config.memory_optimization.hessian_approximation.kind = kind;
        }
        let label = match hessian {
            Some(kind) => format!("ablation-r{rank}-k{k}-{kind}"),
            None => format!("ablation-r{rank}-k{k}"),
        };
        run_config.tracking.run_name = Some(label.clone());
        let run_config = fitted_to_budget(run_config, observer)?;
        plan.push(PlannedRun {
            variant: Variant::of(&run_config),
            label,
            config: run_config,
            ablation: Some((rank, k, hessian)),
        });
    }
    Ok(plan)
}

/// Rebuilds `results`' runs, ablation points, summaries and comparisons from the
/// runs of `plan` that have a record (kept or finished), in the plan's order.
fn collect_runs(
    results: &mut FullResults,
    plan: &[PlannedRun],
    records: &[Option<RunRecord>],
) -> Result<()> {
    results.runs.clear();
    results.ablation.clear();
    for (planned, record) in plan.iter().zip(records) {
        let Some(record) = record else { continue };
        results.regression = record.evaluation.regression;
        if let Some((lora_rank, inner_steps, hessian)) = planned.ablation {
            results.ablation.push(AblationPoint {
                lora_rank,
                inner_steps,
                hessian,
                headline: headline_interval(
                    &record.evaluation.headline_values(),
                    results.confidence,
                )?,
                peak_bytes: record.peak_bytes,
            });
        }
        results.runs.push(record.clone());
    }
    summarise(results)
}

/// With `--resume`, the last checkpoint of a meta-training of `config` that an
/// earlier comparison left unfinished, which the training continues from.
fn continued_training(
    options: &FullOptions,
    variant: Variant,
    config: &Config,
    observer: &mut dyn FullObserver,
) -> Result<Option<PathBuf>> {
    if !options.resume || !variant.meta_trains() {
        return Ok(None);
    }
    let last = unfinished_training(config, variant)?;
    if let Some(dir) = &last {
        observer.note(&format!("continuing from the checkpoint {}", dir.display()));
    }
    Ok(last)
}

/// Rank × K × Hessian points of the ablation, empty when it is off.
fn ablation_grid(config: &Config) -> Vec<(usize, usize, Option<HessianKind>)> {
    let ablation = &config.comparison.ablation;
    if !ablation.is_enabled() {
        return Vec::new();
    }
    let or = |v: &Vec<usize>, d: usize| if v.is_empty() { vec![d] } else { v.clone() };
    let ranks = or(&ablation.lora_ranks, config.lora.rank);
    let ks = or(&ablation.inner_steps, config.meta_learning.inner.steps);
    let hessians: Vec<Option<HessianKind>> = if config.meta_learning.method == Method::Melora {
        if ablation.hessian.is_empty() {
            vec![Some(config.memory_optimization.hessian_approximation.kind)]
        } else {
            ablation.hessian.iter().copied().map(Some).collect()
        }
    } else {
        vec![None]
    };
    let mut grid = Vec::new();
    for &h in &hessians {
        for &r in &ranks {
            for &k in &ks {
                grid.push((r, k, h));
            }
        }
    }
    grid
}

/// The checkpoint of the main method's run with training seed `seed` (its best, else
/// its last), which the `meta-init-finetune` baseline adapts.
fn main_checkpoint(results: &FullResults, main: &str, seed: u64) -> Result<PathBuf> {
    let run = results
        .runs
        .iter()
        .find(|r| r.label == main && r.seed == seed)
        .and_then(|r| r.run_dir.clone())
        .ok_or_else(|| {
            Error::InvalidArgument(format!(
                "meta-init-finetune adapts the checkpoint of the configured method ({main}), \
                 which has no run with seed {seed}; it needs a meta-learning \
                 meta_learning.method"
            ))
        })?;
    let best = run.join("best");
    Ok(if best.exists() {
        best
    } else {
        run.join("last")
    })
}

/// Trains `variant` (meta-training, or a baseline's pre-training) as `config` says,
/// chooses a fine-tuning baseline's learning rate by a sweep on meta-validation tasks,
/// and evaluates it on the test episodes; `start` is the checkpoint a
/// `meta-init-finetune` run adapts. `None` when the training was interrupted.
fn train_and_evaluate(
    config: &Config,
    variant: Variant,
    label: &str,
    episode_seed: u64,
    start: Option<PathBuf>,
    continue_from: Option<PathBuf>,
    observer: &mut dyn FullObserver,
) -> Result<Option<RunRecord>> {
    // Before the sweep below writes its chosen learning rate into the configuration.
    let identity = run_identity(config, variant)?;
    let mut train_classes = None;
    let mut options = EvaluateOptions {
        checkpoint: start,
        finetune_start: variant == Variant::MetaInitFinetune,
        episode_seed: Some(episode_seed),
        ..Default::default()
    };
    let (mut run, mut iterations, mut seconds, mut peak) = (None, 0, None, None);
    if variant.meta_trains() {
        let train_options = TrainOptions {
            resume: continue_from,
            ..observer.train_options(label, config.meta_learning.num_iterations)
        };
        let summary = train(config, &train_options)?;
        if summary.interrupted {
            return Ok(None);
        }
        train_classes = summary.train_classes.clone();
        let best = summary.run_dir.join("best");
        options.checkpoint = Some(if best.exists() {
            best
        } else {
            summary.run_dir.join("last")
        });
        run = Some(summary.run_dir);
        iterations = summary.iterations;
        seconds = summary.seconds_per_iteration;
        peak = summary.peak_bytes;
    } else if variant == Variant::PretrainFinetune {
        let model = build_model(config)?;
        let outcome = pretrain(config, model.as_ref())?;
        observer.note(&format!(
            "pre-trained over {} classes: {} steps, final loss {:.4}",
            outcome.classes, outcome.steps, outcome.final_loss
        ));
        options.params = Some(outcome.params);
        iterations = outcome.steps;
        seconds = outcome.seconds_per_step;
        peak = outcome.peak_bytes;
    }
    let mut config = config.clone();
    let sweep = &config.comparison.finetune_lr_sweep;
    let mut lr_sweep = Vec::new();
    let finetune_lr = if variant.fine_tunes() {
        if !sweep.is_empty() {
            for &lr in sweep {
                let mut trial = config.clone();
                trial.evaluation.finetune_lr = lr;
                let score = evaluate(
                    &trial,
                    &EvaluateOptions {
                        episodes: Some(config.evaluation.val_episodes),
                        split: Some(Split::Val),
                        ..options.clone()
                    },
                    &mut |_| {},
                )?
                .score();
                lr_sweep.push(LrTrial {
                    lr,
                    val_score: score,
                });
            }
            let best = lr_sweep
                .iter()
                .filter(|t| t.val_score.is_finite())
                .max_by(|a, b| a.val_score.total_cmp(&b.val_score))
                .map_or(config.evaluation.finetune_lr, |t| t.lr);
            config.evaluation.finetune_lr = best;
        }
        Some(config.evaluation.finetune_lr)
    } else {
        None
    };
    let episodes = config.evaluation.episodes;
    let options = EvaluateOptions {
        episodes: Some(episodes),
        ..options
    };
    let evaluation = evaluate(&config, &options, &mut |i| {
        observer.evaluation_progress(i + 1, episodes)
    })?;
    let (curve, fit, curve_lr) = match curve_config(&config, variant, &options)? {
        Some((curve_config, curve_lr)) => {
            let steps = config.evaluation.curve_step_counts();
            observer.note(&format!(
                "{label}: scoring after {} adaptation steps",
                steps
                    .iter()
                    .map(usize::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
            (
                adaptation_curve(&curve_config, &options, &steps)?,
                sinusoid_fit(&curve_config, &options, &steps)?,
                curve_lr,
            )
        }
        None => (Vec::new(), None, None),
    };
    if peak.is_none() {
        peak = evaluation.peak_bytes;
    } else if let (Some(p), Some(e)) = (peak, evaluation.peak_bytes) {
        // Pre-training's peak, or adapting to a test task's, whichever is higher.
        if variant == Variant::PretrainFinetune {
            peak = Some(p.max(e));
        }
    }
    let eval_dir = run.clone().unwrap_or_else(|| run_dir(&config));
    save_evaluation(&evaluation, &eval_dir)?;
    Ok(Some(RunRecord {
        label: label.to_string(),
        seed: config.seed,
        run_dir: run.take(),
        iterations,
        seconds_per_iteration: seconds,
        peak_bytes: peak,
        evaluation,
        train_classes,
        finetune_lr,
        lr_sweep,
        curve,
        fit,
        curve_lr,
        config: Some(identity),
    }))
}

/// The configuration the score-against-steps curve of `variant` adapts with: its
/// own inner loop for a meta-learner with one; for the pre-trained baseline the same
/// SGD steps (first-order MAML's inner loop: the fine-tuning of Finn et al.'s
/// pre-trained model) at the step size among `comparison.finetune_lr_sweep` that
/// scores best on meta-validation tasks after the largest step count, which is
/// returned too; `None` for everything else, or when no curve is configured.
fn curve_config(
    config: &Config,
    variant: Variant,
    options: &EvaluateOptions,
) -> Result<Option<(Config, Option<f64>)>> {
    let steps = config.evaluation.curve_step_counts();
    let Some(&most) = steps.last() else {
        return Ok(None);
    };
    if variant.meta_trains() && crate::config::LearnerSpec::of(config).has_inner_loop() {
        return Ok(Some((config.clone(), None)));
    }
    if variant != Variant::PretrainFinetune {
        return Ok(None);
    }
    let mut config = config.clone();
    config.meta_learning.method = Method::Fomaml;
    let sweep = &config.comparison.finetune_lr_sweep;
    if most == 0 || sweep.is_empty() {
        return Ok(Some((config, None)));
    }
    let mut best: Option<(f64, f64)> = None;
    for &lr in sweep {
        let mut trial = config.clone();
        trial.meta_learning.inner.lr = lr;
        trial.meta_learning.inner.steps = most;
        let trial_options = EvaluateOptions {
            episodes: Some(config.evaluation.val_episodes),
            split: Some(Split::Val),
            ..options.clone()
        };
        let score = match evaluate(&trial, &trial_options, &mut |_| {}) {
            Ok(evaluation) => evaluation.score(),
            // A step size at which SGD diverges is not a candidate.
            Err(Error::NonFinite(_)) => continue,
            Err(e) => return Err(e),
        };
        if score.is_finite() && best.is_none_or(|(_, b)| score > b) {
            best = Some((lr, score));
        }
    }
    if let Some((lr, _)) = best {
        config.meta_learning.inner.lr = lr;
    }
    Ok(Some((config, best.map(|(lr, _)| lr))))
}

/// The classes of each split of `config`'s data set (`None` for synthetic tasks).
fn split_record(config: &Config) -> Result<Option<SplitRecord>> {
    let encoder = build_text_encoder(config)?;
    let sources = episode_sources(
        &config.data,
        config.seed,
        &[Split::Train, Split::Val, Split::Test],
        encoder.as_ref(),
        &crate::run::build::device(config)?,
    )?;
    let names: Vec<Option<Vec<String>>> = sources.iter().map(|s| s.class_names()).collect();
    Ok(match &names[..] {
        [Some(train), Some(val), Some(test)] => Some(SplitRecord {
            train: train.clone(),
            val: val.clone(),
            test: test.clone(),
        }),
        _ => None,
    })
}

fn headline_interval(values: &[f64], confidence: f64) -> Result<IntervalRecord> {
    if values.len() < 2 {
        return Ok(IntervalRecord {
            mean: values.first().copied().unwrap_or(f64::NAN),
            half_width: 0.0,
            n: values.len(),
        });
    }
    Ok(mean_ci(values, confidence)?.into())
}

/// Recomputes the per-method summaries and the paired comparisons from the runs.
pub(crate) fn summarise(results: &mut FullResults) -> Result<()> {
    let mut labels: Vec<String> = Vec::new();
    for run in &results.runs {
        if !run.label.starts_with("ablation-") && !labels.contains(&run.label) {
            labels.push(run.label.clone());
        }
    }
    results.methods = labels
        .iter()
        .map(|label| {
            let runs: Vec<&RunRecord> = results.runs.iter().filter(|r| &r.label == label).collect();
            let n = runs[0].evaluation.episodes.len();
            let per_episode: Vec<f64> = (0..n)
                .map(|i| {
                    runs.iter()
                        .map(|r| r.evaluation.headline_values()[i])
                        .sum::<f64>()
                        / runs.len() as f64
                })
                .collect();
            let f1s: Option<Vec<f64>> = runs
                .iter()
                .map(|r| r.evaluation.macro_f1.map(|f| f.mean))
                .collect();
            let seconds: Vec<f64> = runs
                .iter()
                .filter_map(|r| r.seconds_per_iteration)
                .collect();
            Ok(MethodSummary {
                label: label.clone(),
                seeds: runs.len(),
                headline: headline_interval(&per_episode, results.confidence)?,
                macro_f1: f1s.map(|f| f.iter().sum::<f64>() / f.len() as f64),
                peak_bytes: runs.iter().filter_map(|r| r.peak_bytes).max(),
                seconds_per_iteration: (!seconds.is_empty())
                    .then(|| seconds.iter().sum::<f64>() / seconds.len() as f64),
                adapt_seconds: runs.iter().map(|r| r.evaluation.adapt_seconds).sum::<f64>()
                    / runs.len() as f64,
                per_episode,
            })
        })
        .collect::<Result<_>>()?;
    results.comparisons = match results.methods.split_first() {
        Some((main, others)) => others
            .iter()
            .map(|other| compare(main, other, results.confidence))
            .collect(),
        None => Vec::new(),
    };
    // A label `method@experiment` comes from `melora compare`.
    let without_meta_learning = |m: &&MethodSummary| {
        m.label
            .split('@')
            .next()
            .unwrap_or_default()
            .parse::<Variant>()
            .is_ok_and(|v| v.is_baseline() && v != Variant::MetaInitFinetune)
    };
    let better = |a: f64, b: f64| {
        if results.regression {
            a < b
        } else {
            a > b
        }
    };
    let best = results
        .methods
        .iter()
        .filter(without_meta_learning)
        .filter(|m| m.headline.mean.is_finite())
        .fold(None, |best: Option<&MethodSummary>, m| match best {
            Some(b) if !better(m.headline.mean, b.headline.mean) => Some(b),
            _ => Some(m),
        });
    results.against_best_baseline = match best {
        Some(best) => results
            .methods
            .iter()
            .filter(|m| !without_meta_learning(m))
            .map(|m| compare(m, best, results.confidence))
            .collect(),
        None => Vec::new(),
    };
    Ok(())
}

/// Paired statistics of `main` against `other` over the shared test episodes. A test
/// that is undefined for these samples (e.g. identical scores) is `None`, not an error.
fn compare(main: &MethodSummary, other: &MethodSummary, confidence: f64) -> Comparison {
    let (a, b) = (&main.per_episode, &other.per_episode);
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let record = |r: crate::eval::stats::TestResult| TestRecord {
        statistic: r.statistic,
        p_value: r.p_value,
    };
    Comparison {
        method: main.label.clone(),
        baseline: other.label.clone(),
        mean_difference: a.iter().zip(b).map(|(x, y)| x - y).sum::<f64>() / n.max(1) as f64,
        t_test: paired_t_test(a, b).ok().map(record),
        wilcoxon: wilcoxon_signed_rank(a, b).ok().map(record),
        cohens_d: cohens_d_paired(a, b).ok().filter(|d| d.is_finite()),
        bootstrap: bootstrap_ci_diff(a, b, 2000, confidence, 0)
            .ok()
            .map(|i| (i.low, i.high)),
    }
}

/// Peak memory of one task's meta-gradient for each method and each K of
/// `comparison.memory_inner_steps`, measured above the model and its parameters.
fn memory_vs_k(config: &Config, variants: &[Variant]) -> Result<Vec<MemoryPoint>> {
    let ks = &config.comparison.memory_inner_steps;
    if ks.is_empty() || variants.is_empty() {
        return Ok(Vec::new());
    }
    let model = build_model(config)?;
    let encoder = build_text_encoder(config)?;
    let source = episode_source(
        &config.data,
        config.seed,
        Split::Train,
        encoder.as_ref(),
        &crate::run::build::device(config)?,
    )?;
    let task = source.episode(0)?;
    let mut points = Vec::new();
    for variant in variants {
        for &k in ks {
            let mut c = variant.apply(config);
            c.meta_learning.inner.steps = k;
            let learner = build_learner(&c)?;
            let params = initial_params(model.as_ref(), &c)?;
            let meter = MemoryMeter::start();
            let engine = build_engine(&c, model.as_ref())?;
            learner.meta_gradient(
                engine.as_ref(),
                &params,
                &task,
                Mode::Train { seed: config.seed },
            )?;
            points.push(MemoryPoint {
                label: variant.to_string(),
                k,
                peak_bytes: meter.peak_above_baseline() as u64,
            });
        }
    }
    Ok(points)
}

/// Writes `results` as `results.json` in `dir`, atomically.
pub fn save_results(results: &FullResults, dir: &Path) -> Result<PathBuf> {
    let path = dir.join(RESULTS_FILE);
    let json = serde_json::to_vec_pretty(results).map_err(|e| Error::Format {
        path: path.clone(),
        message: e.to_string(),
    })?;
    crate::io::write_atomic(&path, &json)?;
    Ok(path)
}

/// Reads `results.json` from an experiment folder.
pub fn load_results(dir: &Path) -> Result<FullResults> {
    let path = dir.join(RESULTS_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        Error::io(
            &path,
            std::io::Error::new(
                e.kind(),
                format!("{e}; run `melora full` first, or give the experiment folder it wrote"),
            ),
        )
    })?;
    serde_json::from_str(&text).map_err(|e| Error::Format {
        path,
        message: format!("not a melora results file: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use super::*;

    struct Quiet;
    impl FullObserver for Quiet {}

    /// A JSONL data set of `classes` classes whose texts name their class.
    fn jsonl(dir: &Path, classes: usize) -> PathBuf {
        let path = dir.join("texts.jsonl");
        let lines: String = (0..classes)
            .flat_map(|c| {
                (0..6).map(move |i| {
                    format!("{{\"text\": \"word{c} other{c} {i}\", \"label\": \"class{c}\"}}\n")
                })
            })
            .collect();
        std::fs::write(&path, lines).unwrap();
        path
    }

    /// With several training seeds on a data set, every run meta-trains on the same
    /// meta-train classes and is tested on the same meta-test classes, disjoint from
    /// them, and results.json records the split.
    #[test]
    fn every_seed_of_an_experiment_shares_one_class_split() {
        let dir = tempfile::tempdir().unwrap();
        let yaml = format!(
            "seed: 42\nmodel:\n  name: tiny-bert\n  max_length: 8\nlora:\n  rank: 2\n\
             meta_learning:\n  method: fomaml\n  meta_batch_size: 1\n  num_iterations: 2\n  \
             inner:\n    lr: 0.1\n\
             data:\n  source: jsonl\n  path: {}\n  n_way: 2\n  k_shot: 1\n  n_query: 1\n\
             evaluation:\n  episodes: 3\n  eval_every: 2\n  val_episodes: 1\n\
             comparison:\n  baselines: [lora-finetune]\n  memory_inner_steps: []\n",
            jsonl(dir.path(), 20).display()
        );
        let mut config = Config::from_yaml_str(&yaml).unwrap();
        config.tracking.output_dir = dir.path().join("runs");
        let options = FullOptions {
            skip_baselines: false,
            seeds: Some(3),
            resume: false,
        };
        let results = run_full(&config, &options, &mut Quiet).unwrap();
        assert_eq!(results.split_seed, 42);
        let splits = results
            .splits
            .clone()
            .expect("a data set's split is recorded");
        let set = |v: &[String]| v.iter().cloned().collect::<std::collections::HashSet<_>>();
        let (train, val, test) = (set(&splits.train), set(&splits.val), set(&splits.test));
        assert!(train.is_disjoint(&test) && train.is_disjoint(&val) && val.is_disjoint(&test));
        assert_eq!(train.len() + val.len() + test.len(), 20);
        assert_eq!(results.runs.len(), 6);
        for run in &results.runs {
            let tested = set(run.evaluation.classes.as_deref().expect("test classes"));
            assert_eq!(
                tested, test,
                "{} seed {} is tested elsewhere",
                run.label, run.seed
            );
            if let Some(trained) = &run.train_classes {
                let trained = set(trained);
                assert!(
                    trained.is_disjoint(&tested),
                    "{} seed {} trained on test classes",
                    run.label,
                    run.seed
                );
                assert_eq!(trained, train, "{} seed {}", run.label, run.seed);
            }
        }
        assert_eq!(
            results
                .runs
                .iter()
                .filter(|r| r.train_classes.is_some())
                .count(),
            3
        );
        let saved = load_results(&experiment_dir(&config)).unwrap();
        assert_eq!(saved.splits, Some(splits));
    }

    /// Every baseline runs beside the meta-learner: the fine-tuning ones with a
    /// learning rate chosen on meta-validation tasks (the sweep recorded), and a
    /// baseline that does not apply (pre-training on tasks of new classes) is skipped
    /// with the reason.
    #[test]
    fn the_comparison_runs_every_baseline_with_a_chosen_learning_rate() {
        let dir = tempfile::tempdir().unwrap();
        let yaml = "seed: 4\nmodel:\n  name: tiny-bert\n  max_length: 8\nlora:\n  rank: 2\n\
             meta_learning:\n  method: fomaml\n  meta_batch_size: 1\n  num_iterations: 2\n  \
             inner:\n    lr: 0.5\n\
             data:\n  synthetic_task: domains\n  n_way: 2\n  k_shot: 1\n  n_query: 1\n\
             evaluation:\n  episodes: 3\n  eval_every: 2\n  val_episodes: 2\n  \
             finetune_steps: 2\n\
             comparison:\n  baselines: [maml, metasgd, no-adaptation, prototype, lora-finetune, \
             finetune, pretrain-finetune, meta-init-finetune]\n  memory_inner_steps: []\n  \
             finetune_lr_sweep: [0.001, 0.1]\n";
        let mut config = Config::from_yaml_str(yaml).unwrap();
        config.tracking.output_dir = dir.path().to_path_buf();
        let results = run_full(&config, &FullOptions::default(), &mut Quiet).unwrap();
        let labels: Vec<&str> = results.methods.iter().map(|m| m.label.as_str()).collect();
        assert_eq!(
            labels,
            [
                "fomaml",
                "maml",
                "metasgd",
                "no-adaptation",
                "prototype",
                "lora-finetune",
                "finetune",
                "pretrain-finetune",
                "meta-init-finetune"
            ]
        );
        for run in &results.runs {
            let tunes = Variant::from_str(&run.label).unwrap().fine_tunes();
            assert_eq!(
                run.lr_sweep.len(),
                if tunes { 2 } else { 0 },
                "{}",
                run.label
            );
            assert_eq!(run.finetune_lr.is_some(), tunes, "{}", run.label);
            if let Some(lr) = run.finetune_lr {
                let best = run
                    .lr_sweep
                    .iter()
                    .max_by(|a, b| a.val_score.total_cmp(&b.val_score))
                    .unwrap();
                assert_eq!(lr, best.lr, "{}", run.label);
            }
        }
        // No adaptation of a zero head predicts the first class: chance.
        let none = &results.methods[3];
        assert!(
            (none.headline.mean - 0.5).abs() < 1e-12,
            "{}",
            none.headline.mean
        );
        assert!(results.skipped.is_empty());
        // Every method with meta-learning against the best baseline without it.
        let summary = |label: &str| results.methods.iter().find(|m| m.label == label).unwrap();
        let best = [
            "no-adaptation",
            "prototype",
            "lora-finetune",
            "finetune",
            "pretrain-finetune",
        ]
        .into_iter()
        .map(summary)
        // The first of equal scores.
        .reduce(|a, b| {
            if b.headline.mean > a.headline.mean {
                b
            } else {
                a
            }
        })
        .unwrap();
        let compared: Vec<&str> = results
            .against_best_baseline
            .iter()
            .map(|c| c.method.as_str())
            .collect();
        assert_eq!(
            compared,
            ["fomaml", "maml", "metasgd", "meta-init-finetune"]
        );
        for c in &results.against_best_baseline {
            assert_eq!(c.baseline, best.label);
            let expected = summary(&c.method).headline.mean - best.headline.mean;
            assert!((c.mean_difference - expected).abs() < 1e-12, "{c:?}");
        }

        // Synthetic text makes new classes for every task: no pre-training.
        let mut text = config.clone();
        text.data.synthetic_task = crate::config::SyntheticTask::Text;
        text.comparison.baselines = vec![Variant::PretrainFinetune];
        text.tracking.experiment_name = "text".into();
        let results = run_full(&text, &FullOptions::default(), &mut Quiet).unwrap();
        assert_eq!(results.skipped.len(), 1);
        assert!(results.skipped[0].reason.contains("new classes"));
        assert_eq!(results.methods.len(), 1);
    }

    /// `evaluation.curve_steps` scores every method with an inner loop, and the
    /// pre-trained model adapted by the same SGD steps, again after each number of
    /// steps: one step is the evaluation itself, zero is the checkpoint without
    /// adaptation; sinusoid tasks also get the fit of their first test task, whose
    /// support points lie on the recorded sine, and the report draws both.
    #[test]
    fn adaptation_curves_score_each_step_count_and_fit_a_sinusoid() {
        let dir = tempfile::tempdir().unwrap();
        let yaml = "seed: 3\nmodel:\n  name: mlp\n\
             meta_learning:\n  method: maml\n  meta_batch_size: 2\n  num_iterations: 4\n  \
             inner:\n    steps: 1\n    lr: 0.01\n\
             data:\n  synthetic_task: sinusoid\n  k_shot: 5\n  n_query: 5\n\
             evaluation:\n  episodes: 4\n  eval_every: 2\n  val_episodes: 2\n  \
             finetune_steps: 2\n  curve_steps: [3, 0, 1]\n\
             comparison:\n  baselines: [reptile, pretrain-finetune, finetune]\n  \
             memory_inner_steps: []\n  finetune_lr_sweep: [0.001]\n  pretrain:\n    \
             steps: 3\n    tune: all\n";
        let mut config = Config::from_yaml_str(yaml).unwrap();
        config.tracking.output_dir = dir.path().to_path_buf();
        let results = run_full(&config, &FullOptions::default(), &mut Quiet).unwrap();
        for run in &results.runs {
            let steps: Vec<usize> = run.curve.iter().map(|p| p.steps).collect();
            let expected: &[usize] = if run.label == "finetune" {
                &[]
            } else {
                &[0, 1, 3]
            };
            assert_eq!(steps, expected, "{}", run.label);
            assert_eq!(run.fit.is_some(), !expected.is_empty(), "{}", run.label);
        }
        for run in &results.runs {
            let swept = run.label == "pretrain-finetune";
            assert_eq!(run.curve_lr, swept.then_some(0.001), "{}", run.label);
        }
        let maml = &results.runs[0];
        assert_eq!(maml.label, "maml");
        // One step is how the main evaluation adapts.
        assert_eq!(maml.curve[1].headline, Some(maml.evaluation.loss));
        // Zero steps: the checkpoint scored as it is, through the no-adaptation method.
        let mut none = config.clone();
        none.meta_learning.method = Method::NoAdaptation;
        let best = maml.run_dir.as_ref().unwrap().join("best");
        let unadapted = evaluate(
            &none,
            &EvaluateOptions {
                checkpoint: Some(best),
                episode_seed: Some(results.episode_seed),
                ..Default::default()
            },
            &mut |_| {},
        )
        .unwrap();
        assert_eq!(maml.curve[0].headline, Some(unadapted.loss));
        assert_ne!(maml.curve[0].headline, maml.curve[2].headline);

        let fit = maml.fit.as_ref().unwrap();
        assert_eq!(fit.support.len(), 5);
        for &(x, y) in &fit.support {
            let truth = fit.amplitude * (x - fit.phase).sin();
            assert!((y - truth).abs() < 1e-5, "({x}, {y}) is not on the sine");
        }
        let steps: Vec<usize> = fit.predictions.iter().map(|p| p.steps).collect();
        assert_eq!(steps, [0, 1, 3]);
        for p in &fit.predictions {
            assert_eq!(p.values.len(), fit.grid.len());
            assert!(p.values.iter().all(|v| v.is_finite()));
        }
        assert_ne!(fit.predictions[0].values, fit.predictions[2].values);

        let dir = experiment_dir(&config);
        let (markdown, _) = crate::report::write_experiment_report(&dir).unwrap();
        let text = std::fs::read_to_string(markdown).unwrap();
        assert!(text.contains("Score against adaptation steps"), "{text}");
        for plot in [
            "score-vs-steps",
            "fit-maml",
            "fit-reptile",
            "fit-pretrain-finetune",
        ] {
            assert!(
                dir.join("plots").join(format!("{plot}.png")).exists(),
                "{plot}"
            );
        }

        let err = Config::from_yaml_str("evaluation:\n  curve_steps: [0, 5000]\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("evaluation.curve_steps") && err.contains("5000"),
            "{err}"
        );
    }
}
