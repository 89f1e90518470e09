//! `melora profile`: a few meta-iterations of a configuration, built as training
//! builds it (for the fine-tuning baselines, which are not meta-trained, a few test
//! episodes as evaluation runs them), with the measured peak memory (counting
//! allocator and RSS) and time per iteration beside the planner's prediction.

use std::fmt::Write as _;
use std::time::Instant;

use serde::Serialize;

use super::args::{GlobalArgs, ProfileArgs};
use super::{load_config, write_stdout, UserError};
use crate::config::Config;
use crate::data::{EpisodeSource, Prefetcher, Split};
use crate::memory::{current_bytes, format_bytes, is_installed, ProcessMemory, TensorMeter};
use crate::meta::loss_value;
use crate::nn::Mode;
use crate::plan::{self, Plan};
use crate::run::build::build_sources;
use crate::run::{meta_step, training_mode, Run};

/// What `melora profile` reports.
#[derive(Debug, Serialize)]
struct Profile {
    /// The planner's prediction for the configuration.
    plan: Plan,
    /// Measured peak since the model was built, bytes: of the heap (counting
    /// allocator) on the CPU, of the GPU's memory pool on a GPU (as `plan.device` says).
    measured_peak_bytes: Option<u64>,
    /// (predicted − measured) / measured.
    relative_error: Option<f64>,
    /// Peak resident set size of the process, bytes.
    peak_rss_bytes: Option<u64>,
    /// Seconds of each measured meta-iteration (test episode, for a baseline).
    seconds: Vec<f64>,
    /// Their median.
    median_seconds: f64,
    /// Measured iterations (after a warm-up iteration on a throwaway build).
    iterations: usize,
    /// Bytes the warm-up left allocated: thread pools, the first-order worker and
    /// the matrix kernels' per-thread workspaces, set up once per process (neither
    /// predicted nor in the measured peak).
    runtime_setup_bytes: Option<u64>,
}

/// What is profiled: the run's objects, and the episodes it works on (the
/// training loop's prefetcher, or the test episodes a baseline adapts to).
struct Profiled {
    run: Run,
    episodes: Episodes,
}

enum Episodes {
    /// Training's prefetcher, and the validation episodes a run holds beside it
    /// (held, not read: they count in its memory).
    Train {
        prefetcher: Prefetcher,
        _validation: Option<std::sync::Arc<dyn EpisodeSource>>,
    },
    Test(std::sync::Arc<dyn EpisodeSource>),
}

impl Profiled {
    /// The run as `train` builds it, or for a baseline as `evaluate` does.
    fn build(config: &Config) -> anyhow::Result<Self> {
        let run = Run::build(config).map_err(UserError::Config)?;
        let episodes = if run.learner.is_some() {
            // Training holds validation's episodes beside its own.
            let mut sources = build_sources(config, crate::data::training_splits(&config.data))?;
            let train = sources.remove(0);
            Episodes::Train {
                prefetcher: Prefetcher::new(train, 0, config.meta_learning.meta_batch_size, 2)?,
                _validation: sources.pop(),
            }
        } else {
            Episodes::Test(build_sources(config, &[Split::Test])?.remove(0))
        };
        Ok(Profiled { run, episodes })
    }

    /// One meta-iteration on the next meta-batch, with training's dropout seeds; or
    /// the adaptation to test episode `iteration` and its query's outputs.
    fn iteration(&mut self, config: &Config, iteration: usize) -> anyhow::Result<()> {
        let run = &mut self.run;
        // Over the model alone, so that the outer update stays free to change.
        let engine = crate::run::build::build_engine(config, run.model.as_ref())?;
        match (&mut self.episodes, &run.learner) {
            (Episodes::Train { prefetcher, .. }, Some(learner)) => {
                let tasks = prefetcher.next_batch()?;
                let dropout =
                    training_mode(config.seed, iteration, config.meta_learning.meta_batch_size);
                let (next, _) = meta_step(
                    learner.as_ref(),
                    engine.as_ref(),
                    &run.params,
                    &tasks,
                    &mut run.outer,
                    dropout,
                )?;
                drop(engine);
                run.params = next;
            }
            (_, _) => {
                let Episodes::Test(source) = &self.episodes else {
                    unreachable!("a run without a learner profiles test episodes");
                };
                let task = source.episode(iteration as u64)?;
                let adapted =
                    run.adapter
                        .adapt(engine.as_ref(), &run.params, &task.support, Mode::Eval)?;
                let outputs = run
                    .model
                    .logits(&adapted, &task.query, Mode::Eval)?
                    .detach();
                loss_value(&outputs, &task.query)?;
            }
        }
        Ok(())
    }
}

pub(crate) fn run(global: &GlobalArgs, args: &ProfileArgs) -> anyhow::Result<()> {
    if args.iterations == 0 {
        return Err(UserError::Usage("--iterations must be at least 1".into()).into());
    }
    let mut config = load_config(global)?;
    // A memory budget profiles the configuration `train` would run (exit 2 if none fits).
    if let Some(choice) = crate::plan::fit_configured(&config)? {
        eprintln!("{}", choice.explain());
        config = choice.config;
    }
    // The prediction first: a configuration the planner rejects is not run either. On
    // text it is measured on the heaviest of the tasks profiled, as the run peaks there.
    let options = plan::PlanOptions {
        tasks: plan::PlannedTasks::FirstIterations(args.iterations),
        ..plan::PlanOptions::default()
    };
    let plan = plan::plan_with(&config, &options).map_err(UserError::Config)?;
    crate::init();

    // A warm-up on a throwaway build sets up what a process sets up once (thread
    // pools, the first-order worker, the matrix kernels' per-thread workspaces); the
    // prediction leaves these out, so they are reported apart and not measured.
    let before_warm_up = current_bytes();
    {
        let mut run = Profiled::build(&config)?;
        run.iteration(&config, 0)?;
    }
    crate::tensor::kernel_workspace::reserve_on_kernel_threads();
    let runtime_bytes = current_bytes().saturating_sub(before_warm_up) as u64;

    // Everything of the run itself is measured, from building the model on, where
    // it keeps its tensors (the heap, or the GPU's memory).
    let device = crate::run::build::device(&config)?;
    let meter = TensorMeter::start(&device)?;
    let mut run = Profiled::build(&config)?;
    let mut seconds = Vec::with_capacity(args.iterations);
    for iteration in 0..args.iterations {
        let started = Instant::now();
        run.iteration(&config, iteration)?;
        seconds.push(started.elapsed().as_secs_f64());
    }
    drop(run);
    let measured = if meter.is_device() || is_installed() {
        Some(meter.peak_above_baseline()?)
    } else {
        None
    };
    drop(meter);
    let peak_rss_bytes = ProcessMemory::read().ok().map(|m| m.peak_rss_bytes);
    let median_seconds = crate::eval::stats::median(&seconds).unwrap_or(f64::NAN);
    let profile = Profile {
        relative_error: measured.map(|m| (plan.peak_bytes as f64 - m as f64) / (m as f64).max(1.0)),
        plan,
        measured_peak_bytes: measured,
        peak_rss_bytes,
        seconds,
        median_seconds,
        iterations: args.iterations,
        runtime_setup_bytes: is_installed().then_some(runtime_bytes),
    };
    if args.json {
        return write_stdout(&format!("{}\n", serde_json::to_string_pretty(&profile)?));
    }
    write_stdout(&table(&profile))
}

fn table(p: &Profile) -> String {
    let mut out = String::new();
    let plan = &p.plan;
    let trains = plan.variant.meta_trains();
    let plural = if p.iterations == 1 { "" } else { "s" };
    let _ = if trains {
        writeln!(
            out,
            "Profile of {} on {}: {} meta-iteration{plural} after a warm-up (K = {}, \
             meta-batch {})\n",
            plan.method, plan.model, p.iterations, plan.inner_steps, plan.meta_batch_size
        )
    } else {
        writeln!(
            out,
            "Profile of {} on {}: {} test episode{plural} after a warm-up ({} fine-tuning \
             steps each; a baseline is not meta-trained)\n",
            plan.method, plan.model, p.iterations, plan.inner_steps
        )
    };
    out.push_str("| | predicted | measured | error |\n|---|---:|---:|---:|\n");
    let measured = p
        .measured_peak_bytes
        .map_or("not measured".to_string(), format_bytes);
    let error = p
        .relative_error
        .map_or("-".to_string(), |e| format!("{:+.1}%", 100.0 * e));
    let _ = writeln!(
        out,
        "| {} | {} | {measured} | {error} |",
        if plan.device == "cpu" {
            "peak heap (counting allocator)".to_string()
        } else {
            format!("peak of {}'s memory (its memory pool)", plan.device)
        },
        format_bytes(plan.peak_bytes)
    );
    let rss = p
        .peak_rss_bytes
        .map_or("unavailable".to_string(), format_bytes);
    let _ = writeln!(out, "| peak RSS of the process | | {rss} | |");
    let unit = if trains {
        "meta-iteration"
    } else {
        "test episode"
    };
    let _ = writeln!(
        out,
        "| seconds per {unit} (median) | | {:.3} | |",
        p.median_seconds
    );
    if let Some(setup) = p.runtime_setup_bytes {
        let _ = writeln!(
            out,
            "| runtime set up once (thread pools, kernel workspaces) | | {} | |",
            format_bytes(setup)
        );
    }
    let _ = writeln!(
        out,
        "\nThe peak is exact and covers the run from building the model on; RSS also \
         counts code, thread stacks, the runtime set up once and memory the allocator keeps \
         cached."
    );
    out
}
