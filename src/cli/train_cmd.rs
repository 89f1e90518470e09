//! `melora train` and `melora evaluate`.

use std::path::Path;
use std::process::ExitCode;

use super::args::{EvaluateArgs, GlobalArgs, TrainArgs};
use super::progress::{bar, interrupt_flag, training_callback};
use super::{load_config, write_stdout, UserError};
use crate::config::Config;
use crate::eval::Evaluation;
use crate::memory::format_bytes;
use crate::train::checkpoint::read_checkpoint_state;
use crate::train::{evaluate, run_dir, save_evaluation_as, train, EvaluateOptions, TrainOptions};

/// The configuration of `--config` (with flags), or else the one recorded in the
/// checkpoint `dir` (with flags): a checkpoint is evaluated or resumed as trained.
pub(crate) fn config_for_checkpoint(
    global: &GlobalArgs,
    dir: Option<&Path>,
) -> anyhow::Result<Config> {
    match (dir, &global.config) {
        (Some(dir), None) => {
            let state = read_checkpoint_state(dir)?;
            let mut config = Config::from_yaml_str(&state.config).map_err(|e| {
                anyhow::anyhow!(
                    "the configuration recorded in {} is invalid: {e}",
                    dir.display()
                )
            })?;
            config
                .apply(&global.overrides())
                .map_err(UserError::Config)?;
            Ok(config)
        }
        _ => load_config(global),
    }
}

pub(crate) fn run_train(global: &GlobalArgs, args: &TrainArgs) -> anyhow::Result<ExitCode> {
    let mut config = config_for_checkpoint(global, args.resume.as_deref())?;
    if let Some(name) = &args.run_name {
        config.tracking.run_name = Some(name.clone());
        config.validate().map_err(UserError::Config)?;
    }
    // A memory budget picks the configuration the planner says fits (exit 2 if none).
    if let Some(choice) = crate::plan::fit_configured(&config)? {
        eprintln!("{}", choice.explain());
        config = choice.config;
    }
    let total = config.meta_learning.num_iterations as u64;
    let progress = bar(total, "train");
    let options = TrainOptions {
        resume: args.resume.clone(),
        stop: Some(interrupt_flag()),
        max_iterations: None,
        on_iteration: Some(training_callback(progress.clone())),
    };
    eprintln!(
        "training {} on {} ({} iterations) into {}",
        crate::config::Variant::of(&config),
        config.model.name,
        total,
        run_dir(&config).display()
    );
    let summary = train(&config, &options);
    progress.finish_and_clear();
    let summary = summary?;
    let mut text = format!("run: {}\n", summary.run_dir.display());
    let ended = if summary.interrupted {
        " (interrupted)"
    } else if summary.stopped_early {
        " (early stopping)"
    } else {
        ""
    };
    text += &format!("iterations: {}{ended}\n", summary.iterations);
    if let Some(best) = summary.best_val_score {
        text += &format!("best validation score: {best:.4}\n");
    }
    if let Some(s) = summary.seconds_per_iteration {
        text += &format!("seconds per meta-iteration: {s:.3} (median)\n");
    }
    if let Some(b) = summary.peak_bytes {
        text += &format!("peak memory: {}\n", format_bytes(b));
    }
    let last = summary.run_dir.join("last");
    if summary.interrupted {
        text += &format!(
            "checkpoint saved; continue with: melora train --resume {}\n",
            last.display()
        );
    } else {
        let best = summary.run_dir.join("best");
        text += &format!(
            "checkpoints: {} and {}\nnext: melora evaluate --checkpoint {}\n",
            best.display(),
            last.display(),
            best.display()
        );
    }
    write_stdout(&text)?;
    Ok(if summary.interrupted {
        ExitCode::from(130)
    } else {
        ExitCode::SUCCESS
    })
}

/// The summary lines of an evaluation.
pub(crate) fn evaluation_text(e: &Evaluation) -> String {
    let level = (e.confidence * 100.0).round();
    let mut text = String::new();
    if let Some(a) = &e.accuracy {
        text += &format!(
            "accuracy:   {:.4} ± {:.4} ({level}% CI)\n",
            a.mean, a.half_width
        );
    }
    if let Some(f) = &e.macro_f1 {
        text += &format!("macro-F1:   {:.4} ± {:.4}\n", f.mean, f.half_width);
    }
    let loss = if e.regression {
        "MSE:       "
    } else {
        "loss:      "
    };
    text += &format!("{loss} {:.4} ± {:.4}\n", e.loss.mean, e.loss.half_width);
    text += &format!("adaptation: {:.1} ms per task\n", e.adapt_seconds * 1e3);
    if let Some(b) = e.peak_bytes {
        text += &format!("peak memory: {}\n", format_bytes(b));
    }
    text
}

pub(crate) fn run_evaluate(global: &GlobalArgs, args: &EvaluateArgs) -> anyhow::Result<ExitCode> {
    let mut config = config_for_checkpoint(global, args.checkpoint.as_deref())?;
    // Another BatchNorm setting than the run's is another result, kept beside it.
    let mut suffix = String::new();
    if let Some(statistics) = args.batch_norm {
        if statistics != config.evaluation.batch_norm {
            suffix = format!("-{statistics}-bn");
        }
        config.evaluation.batch_norm = statistics;
        config.validate()?;
    }
    let episodes = args.episodes.unwrap_or(config.evaluation.episodes);
    if episodes == 0 {
        return Err(UserError::Usage("--episodes must be at least 1".into()).into());
    }
    let progress = bar(episodes as u64, "evaluate");
    let evaluation = evaluate(
        &config,
        &EvaluateOptions {
            checkpoint: args.checkpoint.clone(),
            episodes: Some(episodes),
            episode_seed: None,
            ..Default::default()
        },
        &mut |i| progress.set_position(i as u64 + 1),
    );
    progress.finish_and_clear();
    let evaluation = evaluation?;
    // Beside the checkpoint's folder (its run), or in the configuration's run folder.
    let dir = match &args.checkpoint {
        Some(dir) => dir
            .canonicalize()
            .ok()
            .and_then(|d| d.parent().map(Path::to_path_buf))
            .unwrap_or_else(|| run_dir(&config)),
        None => run_dir(&config),
    };
    // Episodes of another shape than the run's are another result, kept beside it.
    let file = if global.n_way.is_some() || global.k_shot.is_some() || global.n_query.is_some() {
        format!(
            "evaluation-{}way-{}shot-{}query{suffix}.json",
            config.data.n_way, config.data.k_shot, config.data.n_query
        )
    } else {
        format!("evaluation{suffix}.json")
    };
    let path = save_evaluation_as(&evaluation, &dir, &file)?;
    if args.json {
        write_stdout(&format!("{}\n", serde_json::to_string_pretty(&evaluation)?))?;
    } else {
        let what = match &args.checkpoint {
            Some(c) => c.display().to_string(),
            None => format!("untrained {}", config.model.name),
        };
        write_stdout(&format!(
            "{what}: {} ({}) on {episodes} test episodes (seed {})\n{}written: {}\n",
            crate::config::Variant::of(&config),
            config.model.name,
            config.seed,
            evaluation_text(&evaluation),
            path.display()
        ))?;
    }
    Ok(ExitCode::SUCCESS)
}
