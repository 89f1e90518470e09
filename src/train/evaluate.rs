//! `melora evaluate`: a trained (or untrained) model adapted and scored on a fixed set
//! of meta-test episodes.

use std::path::{Path, PathBuf};

use crate::config::{BatchNormEvaluation, Config, Method};
use crate::data::{episode_sources, EpisodeSource, Split};
use crate::eval::{evaluate_episodes, Evaluation};
use crate::memory::MemoryMeter;
use crate::models::{FewShotModel, RunningStatistics};
use crate::nn::Mode;
use crate::tensor::ParamSet;
use crate::Result;

use super::run::params_from;
use crate::run::build::{build_finetune, build_text_encoder};
use crate::run::Run;

/// What to evaluate.
#[derive(Debug, Clone, Default)]
pub struct EvaluateOptions {
    /// Checkpoint folder of the parameters; `None` evaluates the initialisation
    /// (the only choice for the fine-tuning baselines).
    pub checkpoint: Option<PathBuf>,
    /// Parameters to start every task from, instead of a checkpoint's or the
    /// initialisation (e.g. pre-trained ones).
    pub params: Option<ParamSet>,
    /// Adapt with the fine-tuning baselines' optimiser (`evaluation.finetune_steps`
    /// AdamW steps) instead of the method's own adaptation: the `meta-init-finetune`
    /// comparison of a meta-trained checkpoint.
    pub finetune_start: bool,
    /// Test episodes; `None` takes `evaluation.episodes`.
    pub episodes: Option<usize>,
    /// Seed of the test episodes; `None` takes the configuration's seed. Runs that are
    /// compared pass the same value, so they see the same tasks.
    pub episode_seed: Option<u64>,
    /// The classes the episodes come from; `None` is the meta-test split (the
    /// meta-validation split chooses learning rates).
    pub split: Option<Split>,
    /// Score the starting parameters as they are, without adapting (a point at zero
    /// steps of the score-against-steps curve).
    pub no_adaptation: bool,
}

/// Adapts and scores the configured model on the meta-test episodes; `progress(i)`
/// is called after episode `i`. The reported peak memory covers building the
/// model, loading the checkpoint and every adaptation.
pub fn evaluate(
    config: &Config,
    options: &EvaluateOptions,
    progress: &mut dyn FnMut(usize),
) -> Result<Evaluation> {
    // Before the meter: the process-wide set-up (worker thread, thread pool) is not
    // the evaluation's memory.
    crate::init();
    let meter = MemoryMeter::start();
    let mut evaluation = with_prepared(config, options, |run, params, source, engine| {
        evaluate_episodes(
            run.adapter.as_ref(),
            engine,
            params,
            source,
            options.episodes.unwrap_or(config.evaluation.episodes),
            config.evaluation.confidence,
            evaluation_loss_scale(config, options.checkpoint.as_deref())?,
            progress,
        )
    })?;
    if crate::memory::is_installed() {
        evaluation.peak_bytes = Some(meter.peak_above_baseline() as u64);
    }
    Ok(evaluation)
}

/// The support set of episode `task` of the evaluated split and the predictions
/// `[b, d]` for `inputs` of `config`'s model adapted to it, as [`evaluate`] adapts.
pub(crate) fn predict_after_adaptation(
    config: &Config,
    options: &EvaluateOptions,
    task: u64,
    inputs: &crate::data::Batch,
) -> Result<(crate::data::Batch, candle_core::Tensor)> {
    with_prepared(config, options, |run, params, source, engine| {
        let episode = source.episode(task)?;
        let adapted = run
            .adapter
            .adapt(engine, params, &episode.support, Mode::Eval)?;
        let predicted = run.adapter.predict(engine, &adapted, inputs, Mode::Eval)?;
        Ok((episode.support, predicted.detach()))
    })
}

/// Builds what an evaluation adapts with (the run, its adapter as `options` ask, the
/// starting parameters, the episodes of the evaluated split, the engine) and calls
/// `score` with them, under running BatchNorm statistics when configured.
fn with_prepared<T>(
    config: &Config,
    options: &EvaluateOptions,
    score: impl FnOnce(&Run, &ParamSet, &dyn EpisodeSource, &dyn crate::engine::GradEngine) -> Result<T>,
) -> Result<T> {
    crate::init();
    let mut run = Run::build(config)?;
    if options.finetune_start {
        run.adapter = build_finetune(config);
    }
    if options.no_adaptation {
        run.adapter = Box::new(crate::meta::NoAdaptation);
    }
    let model = run.model.as_ref();
    let encoder = build_text_encoder(config)?;
    let params = match (&options.params, &options.checkpoint) {
        (Some(params), _) => params.clone(),
        // The baseline's own start: supervised pre-training on the meta-train classes.
        (None, None) if config.meta_learning.method == Method::PretrainFinetune => {
            super::pretrain(config, model)?.params
        }
        (None, checkpoint) => params_from(model, config, checkpoint.as_deref())?,
    };
    let split = options.split.unwrap_or(Split::Test);
    // Running BatchNorm statistics come from training episodes: both splits are read
    // in one pass over the data set.
    let running = config.evaluation.batch_norm == BatchNormEvaluation::Running;
    let splits: &[Split] = if running {
        &[split, Split::Train]
    } else {
        &[split]
    };
    let mut sources = episode_sources(
        &config.data,
        options.episode_seed.unwrap_or(config.seed),
        splits,
        encoder.as_ref(),
        &crate::run::build::device(config)?,
    )?;
    let source = sources.remove(0);
    let _running = match sources.pop() {
        Some(train) => running_statistics(config, model, &params, train.as_ref())?,
        None => None,
    };
    let engine = run.engine()?;
    score(&run, &params, source.as_ref(), engine.as_ref())
}

/// With `evaluation.batch_norm: running`, estimates the backbone's running
/// BatchNorm statistics at `params` over the first `evaluation.batch_norm_episodes`
/// episodes of `train` (support and query sets forwarded apart, as training
/// normalises them) and returns the guard under which evaluation uses them; `None`
/// with batch statistics.
pub(crate) fn running_statistics<'m>(
    config: &Config,
    model: &'m dyn FewShotModel,
    params: &ParamSet,
    train: &dyn EpisodeSource,
) -> Result<Option<RunningStatistics<'m>>> {
    if config.evaluation.batch_norm != BatchNormEvaluation::Running {
        return Ok(None);
    }
    let Some(statistics) = model.batch_norm_statistics() else {
        return Err(crate::Error::InvalidArgument(format!(
            "evaluation.batch_norm: running needs a model with BatchNorm layers, and {} has \
             none",
            config.model.name
        )));
    };
    // Statistics only: no graph.
    let params = params.detach();
    let guard = statistics.estimate(|| {
        for index in 0..config.evaluation.batch_norm_episodes {
            let task = train.episode(index as u64)?;
            for set in [&task.support, &task.query] {
                model.features(&params, set, Mode::Eval)?;
            }
        }
        Ok(())
    })?;
    Ok(Some(guard))
}

/// The loss scale adaptation runs under: none unless the activations are f16; then
/// the scale the checkpoint's training reached, or the configured initial scale.
pub(crate) fn evaluation_loss_scale(
    config: &Config,
    checkpoint: Option<&Path>,
) -> Result<Option<f64>> {
    if config.memory_optimization.precision != crate::config::Precision::F16 {
        return Ok(None);
    }
    let trained = match checkpoint {
        Some(dir) => super::checkpoint::read_checkpoint_state(dir)?.loss_scaler,
        None => None,
    };
    Ok(Some(trained.map_or(
        config.memory_optimization.loss_scaling.initial_scale,
        |s| s.scale(),
    )))
}

/// Writes `evaluation` as `evaluation.json` in `dir` (atomically) and returns the path.
pub fn save_evaluation(evaluation: &Evaluation, dir: &Path) -> Result<PathBuf> {
    save_evaluation_as(evaluation, dir, "evaluation.json")
}

/// Writes `evaluation` as `file` in `dir` (atomically) and returns the path.
pub fn save_evaluation_as(evaluation: &Evaluation, dir: &Path, file: &str) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(|e| crate::Error::io(dir, e))?;
    let path = dir.join(file);
    let json = serde_json::to_vec_pretty(evaluation).map_err(|e| crate::Error::Format {
        path: path.clone(),
        message: e.to_string(),
    })?;
    crate::io::write_atomic(&path, &json)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::{train, TrainOptions};

    fn tiny_config(output: &Path) -> Config {
        let yaml = "seed: 5\nmodel:\n  name: tiny-bert\n  max_length: 12\nlora:\n  rank: 2\n\
                    meta_learning:\n  method: fomaml\n  meta_batch_size: 2\n  num_iterations: 2\n  \
                    inner:\n    steps: 1\n    lr: 0.5\n\
                    data:\n  n_way: 3\n  k_shot: 2\n  n_query: 2\n\
                    evaluation:\n  episodes: 4\n  eval_every: 2\n  val_episodes: 2\n";
        let mut config = Config::from_yaml_str(yaml).unwrap();
        config.tracking.output_dir = output.to_path_buf();
        config
    }

    /// A trained checkpoint and the same parameters evaluated twice give identical
    /// per-episode scores (same episodes, deterministic adaptation), and the summary
    /// is consistent with them.
    #[test]
    fn evaluation_of_a_checkpoint_is_reproducible() {
        let dir = tempfile::tempdir().unwrap();
        let config = tiny_config(dir.path());
        let summary = train(&config, &TrainOptions::default()).unwrap();
        let options = EvaluateOptions {
            checkpoint: Some(summary.run_dir.join("last")),
            ..Default::default()
        };
        let mut seen = 0;
        let a = evaluate(&config, &options, &mut |_| seen += 1).unwrap();
        let b = evaluate(&config, &options, &mut |_| {}).unwrap();
        assert_eq!(seen, 4);
        assert_eq!(a.episodes.len(), 4);
        let scores = |e: &Evaluation| e.episodes.iter().map(|x| x.accuracy).collect::<Vec<_>>();
        assert_eq!(scores(&a), scores(&b));
        let mean: f64 = a.episodes.iter().map(|e| e.accuracy.unwrap()).sum::<f64>() / 4.0;
        assert!((a.accuracy.unwrap().mean - mean).abs() < 1e-12);
        assert!(a.macro_f1.is_some() && !a.regression);
        // The untrained model is a different starting point.
        let untrained = evaluate(&config, &EvaluateOptions::default(), &mut |_| {}).unwrap();
        assert_eq!(untrained.episodes.len(), 4);
        let path = save_evaluation(&a, dir.path()).unwrap();
        let back: Evaluation = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        assert_eq!(back, a);
    }

    /// `evaluation.batch_norm: running` evaluates a backbone with population
    /// statistics of training episodes: reproducible, different from the batch
    /// statistics' scores, in validation during training too; a model without
    /// BatchNorm refuses it.
    #[test]
    fn running_batch_norm_statistics_evaluate_vision_backbones() {
        let dir = tempfile::tempdir().unwrap();
        let yaml = "seed: 3\nmodel:\n  name: conv4\nmeta_learning:\n  method: protonet\n  \
                    meta_batch_size: 1\n  num_iterations: 2\n\
                    data:\n  synthetic_task: images\n  n_way: 3\n  k_shot: 2\n  n_query: 3\n\
                    evaluation:\n  episodes: 3\n  eval_every: 2\n  val_episodes: 2\n  \
                    batch_norm: running\n  batch_norm_episodes: 4\n";
        let mut running = Config::from_yaml_str(yaml).unwrap();
        running.tracking.output_dir = dir.path().to_path_buf();
        let summary = train(&running, &TrainOptions::default()).unwrap();
        assert_eq!(summary.validations.len(), 1);
        let options = EvaluateOptions {
            checkpoint: Some(summary.run_dir.join("last")),
            ..Default::default()
        };
        let losses = |e: &Evaluation| e.episodes.iter().map(|x| x.loss).collect::<Vec<_>>();
        let a = evaluate(&running, &options, &mut |_| {}).unwrap();
        let b = evaluate(&running, &options, &mut |_| {}).unwrap();
        assert_eq!(losses(&a), losses(&b));
        let mut batch = running.clone();
        batch.evaluation.batch_norm = BatchNormEvaluation::Batch;
        let c = evaluate(&batch, &options, &mut |_| {}).unwrap();
        assert_ne!(losses(&a), losses(&c));

        let err = Config::from_yaml_str("evaluation:\n  batch_norm: running\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("evaluation.batch_norm") && err.contains("tiny-bert"),
            "{err}"
        );
    }

    #[test]
    fn a_missing_checkpoint_names_the_folder() {
        let dir = tempfile::tempdir().unwrap();
        let options = EvaluateOptions {
            checkpoint: Some(dir.path().join("no-such-run")),
            ..Default::default()
        };
        let err = evaluate(&tiny_config(dir.path()), &options, &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(err.contains("no-such-run"), "{err}");
    }
}
