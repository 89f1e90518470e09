//! `melora full` and `melora report`.

use std::process::ExitCode;

use indicatif::ProgressBar;

use super::args::{CompareArgs, FullArgs, GlobalArgs, ReportArgs};
use super::progress::{bar, interrupt_flag, training_callback};
use super::{load_config, write_stdout};
use crate::report::{
    best_baseline_table, comparison_table, statistics_table, write_experiment_report,
};
use crate::train::{
    experiment_dir, merge_results, run_full, save_results, FullObserver, FullOptions, FullResults,
    RunRecord, TrainOptions,
};

/// Shows each run's progress bar and a line per finished run.
struct Console {
    bar: Option<ProgressBar>,
}

impl FullObserver for Console {
    fn run_started(&mut self, label: &str, seed: u64, index: usize, total: usize) {
        eprintln!("[{index}/{total}] {label} (seed {seed})");
    }

    fn train_options(&mut self, label: &str, iterations: usize) -> TrainOptions {
        let progress = bar(iterations as u64, label);
        self.bar = Some(progress.clone());
        TrainOptions {
            stop: Some(interrupt_flag()),
            on_iteration: Some(training_callback(progress)),
            ..TrainOptions::default()
        }
    }

    fn evaluation_progress(&mut self, done: usize, total: usize) {
        if done == 1 {
            if let Some(b) = self.bar.take() {
                b.finish_and_clear();
            }
            self.bar = Some(bar(total as u64, "evaluate"));
        }
        if let Some(b) = &self.bar {
            b.set_position(done as u64);
        }
    }

    fn note(&mut self, text: &str) {
        eprintln!("{text}");
    }

    fn run_kept(&mut self, record: &RunRecord, index: usize, total: usize) {
        eprintln!(
            "[{index}/{total}] {} (seed {}): kept from the earlier results, {}",
            record.label,
            record.seed,
            record.evaluation.headline()
        );
    }

    fn run_finished(&mut self, record: &RunRecord) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
        let speed = record
            .seconds_per_iteration
            .map_or(String::new(), |s| format!(", {s:.3} s/iteration"));
        eprintln!(
            "    {}: {}{speed}",
            record.label,
            record.evaluation.headline()
        );
    }
}

pub(crate) fn run_full_cmd(global: &GlobalArgs, args: &FullArgs) -> anyhow::Result<ExitCode> {
    let config = load_config(global)?;
    if args.seeds == Some(0) {
        return Err(super::UserError::Usage("--seeds must be at least 1".into()).into());
    }
    let mut console = Console { bar: None };
    let results = run_full(
        &config,
        &FullOptions {
            skip_baselines: args.skip_baselines,
            seeds: args.seeds,
            resume: args.resume,
        },
        &mut console,
    )?;
    let dir = experiment_dir(&config);
    let (md, html) = write_experiment_report(&dir)?;
    let mut text = tables_text(&results);
    text += &format!(
        "\nresults: {}\nreport: {} and {}\n",
        dir.join(crate::train::RESULTS_FILE).display(),
        md.display(),
        html.display()
    );
    if results.interrupted {
        text += "interrupted: the report shows the runs that finished; `melora full --resume` \
                 with the same options keeps them and runs the rest\n";
    }
    write_stdout(&text)?;
    Ok(if results.interrupted {
        ExitCode::from(130)
    } else {
        ExitCode::SUCCESS
    })
}

/// The comparison table, the configured method's paired statistics against each
/// method, and each method with meta-learning against the best baseline, as text.
fn tables_text(results: &FullResults) -> String {
    let mut text = format!("\n{}", comparison_table(results).to_text());
    if !results.comparisons.is_empty() {
        text += &format!(
            "\npaired statistics, {} against each method:\n{}",
            results.main,
            statistics_table(results).to_text()
        );
    }
    if let Some(best) = results.against_best_baseline.first() {
        text += &format!(
            "\neach method with meta-learning against the best baseline, {}:\n{}",
            best.baseline,
            best_baseline_table(results).to_text()
        );
    }
    text
}

pub(crate) fn run_compare(args: &CompareArgs) -> anyhow::Result<ExitCode> {
    let results = merge_results(&args.dirs)?;
    let mut text = format!(
        "comparing {}\n{}",
        results.experiment,
        tables_text(&results)
    );
    if let Some(out) = &args.output {
        std::fs::create_dir_all(out)
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", out.display()))?;
        let path = save_results(&results, out)?;
        let (md, html) = write_experiment_report(out)?;
        text += &format!(
            "\nresults: {}\nreport: {} and {}\n",
            path.display(),
            md.display(),
            html.display()
        );
    }
    write_stdout(&text)?;
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn run_report(args: &ReportArgs) -> anyhow::Result<ExitCode> {
    let (md, html) = write_experiment_report(&args.dir)?;
    write_stdout(&format!(
        "report: {} and {}\n",
        md.display(),
        html.display()
    ))?;
    Ok(ExitCode::SUCCESS)
}
