//! `melora bench memory`: every point of the grid measured in a fresh child process
//! (`melora bench memory-row`, hidden), so that the process-wide heap peak and resident
//! high-water mark of one point never include another's. Results are rewritten after
//! every point, so an interrupted benchmark keeps what it measured.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

use super::args::{BenchMemoryArgs, BenchMemoryRowArgs, GlobalArgs, OnOff};
use super::{load_config, write_stdout, UserError};
use crate::bench::memory::{
    bench_config, measure, predicted_bytes, quick_config, row_config, set_model, BenchModel, Grid,
    Measurement, MemoryBench, MemoryRow, ModelInfo, SkippedRow, DEFAULT_MODEL,
};
use crate::config::Config;
use crate::memory::format_bytes;

/// The configuration every point starts from: `--config` (with flags) if given, else
/// the benchmark's own (MiniLM-shaped, or tiny-bert with `--quick`) with the flags;
/// `--model-dir` replaces the model either way.
fn base_config(global: &GlobalArgs, args: &BenchMemoryArgs) -> anyhow::Result<Config> {
    let mut config = if global.config.is_some() {
        load_config(global)?
    } else {
        let mut c = if args.quick {
            quick_config()
        } else {
            bench_config(&BenchModel::Builtin(DEFAULT_MODEL.into()))
        };
        c.apply(&global.overrides()).map_err(UserError::Config)?;
        c
    };
    if let Some(dir) = &args.model_dir {
        if !dir.join("config.json").is_file() {
            return Err(UserError::Usage(format!(
                "--model-dir {}: no config.json there (expected a Hugging Face model folder \
                 with config.json and model.safetensors)",
                dir.display()
            ))
            .into());
        }
        set_model(&mut config, &BenchModel::Directory(dir.clone()));
    }
    config.validate().map_err(UserError::Config)?;
    if config.model.path.is_none()
        && crate::models::load::builtin_config(&config.model.name).is_none()
    {
        return Err(UserError::Usage(format!(
            "bench memory measures transformers on text tasks; `{}` is not one (use \
             --model minilm-shaped, bert-base-shaped, gpt2-medium-shaped, tiny-bert, \
             tiny-distilbert, tiny-gpt2, tiny-t5, or --model-dir DIR)",
            config.model.name
        ))
        .into());
    }
    Ok(config)
}

fn grid(args: &BenchMemoryArgs) -> Grid {
    let mut grid = if args.quick {
        Grid::quick()
    } else {
        Grid::full()
    };
    if !args.methods.is_empty() {
        grid.variants = dedup(&args.methods);
    }
    if !args.ks.is_empty() {
        grid.ks = dedup(&args.ks);
    }
    if !args.checkpointing.is_empty() {
        grid.checkpointing = dedup(&args.checkpointing)
            .into_iter()
            .map(|c| c == OnOff::On)
            .collect();
    }
    if !args.precision.is_empty() {
        grid.precisions = dedup(&args.precision);
    }
    grid
}

fn dedup<T: PartialEq + Copy>(values: &[T]) -> Vec<T> {
    let mut out = Vec::new();
    for &v in values {
        if !out.contains(&v) {
            out.push(v);
        }
    }
    out
}

pub(crate) fn run(global: &GlobalArgs, args: &BenchMemoryArgs) -> anyhow::Result<ExitCode> {
    if args.iterations == 0 {
        return Err(UserError::Usage("--iterations must be at least 1".into()).into());
    }
    if args
        .methods
        .contains(&crate::config::Variant::MetaInitFinetune)
    {
        return Err(UserError::Usage(
            "--methods: meta-init-finetune adapts a meta-trained checkpoint (in `melora \
             full`); bench memory measures methods from their initialisation, so measure \
             the meta-learner and the finetune baselines instead"
                .into(),
        )
        .into());
    }
    if let Some(&k) = args.ks.iter().find(|&&k| k == 0) {
        return Err(
            UserError::Usage(format!("--k: inner steps must be at least 1, got {k}")).into(),
        );
    }
    let output = global
        .output
        .clone()
        .unwrap_or_else(|| PathBuf::from("bench-results"));
    if args.threads == Some(0) {
        return Err(UserError::Usage("--threads must be at least 1".into()).into());
    }
    let threads = args.threads.unwrap_or(if args.quick {
        1
    } else {
        candle_core::utils::get_num_threads()
    });
    let base = base_config(global, args)?;
    let points = grid(args).points();
    let mut bench = MemoryBench::new(
        ModelInfo::of(&base)?,
        args.quick,
        args.iterations,
        points.len(),
    );
    bench.machine.kernel_threads = threads;
    bench.device = base.device.to_string();
    let json_path = output.join("memory.json");
    if args.resume && json_path.is_file() {
        let previous = MemoryBench::read(&json_path)
            .map_err(|e| UserError::Usage(format!("--resume: {e}")))?;
        bench.resume(previous, &points).map_err(|e| {
            UserError::Usage(format!(
                "--resume: cannot add to {}: {e}; drop --resume (to replace it) or give \
                 another --output folder",
                json_path.display()
            ))
        })?;
    }
    eprintln!(
        "bench memory: {} points on {}; results in {}",
        points.len(),
        bench.model.describe(),
        output.display()
    );
    let started = Instant::now();
    let total = points.len();
    for (i, point) in points.iter().enumerate() {
        let config = row_config(&base, point);
        let prefix = format!("[{}/{total}] {point}", i + 1);
        if bench.has_measured(point) {
            eprintln!("{prefix}: measured before, kept (--resume)");
            continue;
        }
        if let Err(e) = config.validate() {
            eprintln!("{prefix}: skipped: {e}");
            bench.skip(SkippedRow::new(point, e.to_string()));
            bench.write(&output)?;
            continue;
        }
        let row_started = Instant::now();
        let row = MemoryRow::new(
            point,
            predicted_bytes(&config),
            run_child(&config, args.iterations, threads),
        );
        let elapsed = row_started.elapsed().as_secs_f64();
        match &row.error {
            Some(e) => eprintln!("{prefix}: failed ({elapsed:.1} s): {e}"),
            None => {
                let bytes = |b: Option<u64>| b.map_or("–".to_string(), format_bytes);
                eprintln!(
                    "{prefix}: peak {}, RSS {}, predicted {}, {:.3} s/iteration ({elapsed:.1} s)",
                    bytes(row.peak_bytes),
                    bytes(row.rss_bytes),
                    bytes(row.predicted_bytes),
                    row.seconds_per_iter.unwrap_or(f64::NAN),
                );
            }
        }
        bench.push(row);
        bench.write(&output)?;
    }
    let (json, md, png) = bench.write(&output)?;
    write_stdout(&format!(
        "{}\nwritten: {}, {} and {} ({:.0} s)\n",
        bench.to_markdown(),
        json.display(),
        md.display(),
        png.display(),
        started.elapsed().as_secs_f64()
    ))?;
    let failed = bench.rows.iter().filter(|r| r.error.is_some()).count();
    if failed > 0 {
        // Each failure is recorded with its message; the status tells scripts.
        let _ = writeln!(
            std::io::stderr(),
            "error: {failed} of {} measured points failed (see {})",
            bench.rows.len(),
            md.display()
        );
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

/// Measures one point in a fresh process: this executable's `bench memory-row`, the
/// configuration on its standard input, the measurement as JSON on its standard output.
pub(super) fn run_child(
    config: &Config,
    iterations: usize,
    threads: usize,
) -> Result<Measurement, String> {
    let exe =
        std::env::current_exe().map_err(|e| format!("cannot find the melora executable: {e}"))?;
    let yaml = config.to_yaml_string().map_err(|e| e.to_string())?;
    let mut command = Command::new(&exe);
    command
        .args(["bench", "memory-row", "--iterations"])
        .arg(iterations.to_string())
        .env("RAYON_NUM_THREADS", threads.to_string());
    measuring_process(command, Some(&yaml))
}

/// Runs `command` in a fresh process (with `input` on its standard input) and reads
/// the JSON value on the last line of its standard output; `Err` says why there is
/// none: the child's last line of standard error, or how it ended.
pub(super) fn measuring_process<T: serde::de::DeserializeOwned>(
    mut command: Command,
    input: Option<&str>,
) -> Result<T, String> {
    let program = command.get_program().to_string_lossy().to_string();
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {program}: {e}"))?;
    if let (Some(mut stdin), Some(input)) = (child.stdin.take(), input) {
        // A child that fails before reading closes the pipe; its status says why.
        let _ = stdin.write_all(input.as_bytes());
    }
    let output = child
        .wait_with_output()
        .map_err(|e| format!("waiting for the measuring process: {e}"))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let message = stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .map(|l| l.trim().trim_start_matches("error: ").to_string());
        return Err(match (output.status.code(), message) {
            (Some(_), Some(m)) => m,
            (Some(code), None) => format!("the measuring process exited with status {code}"),
            (None, m) => format!(
                "the measuring process was killed ({}){}",
                signal(&output.status),
                m.map_or(String::new(), |m| format!(": {m}"))
            ),
        });
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    serde_json::from_str(line)
        .map_err(|e| format!("unreadable measurement `{line}` from the measuring process: {e}"))
}

#[cfg(unix)]
fn signal(status: &std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status.signal() {
        Some(9) => "SIGKILL: out of memory?".into(),
        Some(s) => format!("signal {s}"),
        None => "no status".into(),
    }
}

#[cfg(not(unix))]
fn signal(_status: &std::process::ExitStatus) -> String {
    "no status".into()
}

/// `melora bench memory-row`: the configuration (YAML) from standard input, measured
/// in this process; the measurement as one line of JSON.
pub(crate) fn run_row(args: &BenchMemoryRowArgs) -> anyhow::Result<()> {
    let config = config_from_stdin()?;
    // Image tasks are read as the run reads them (the image-folder scenario of
    // `bench fsct-memory`); text tasks are the benchmark's own.
    let measurement = if crate::config::pairing::TaskInputs::of(&config)
        == crate::config::pairing::TaskInputs::Images
    {
        let source =
            crate::run::build::build_sources(&config, &[crate::data::Split::Train])?.swap_remove(0);
        crate::bench::memory::measure_on(&config, args.iterations, source)?
    } else {
        measure(&config, args.iterations)?
    };
    write_stdout(&format!("{}\n", serde_json::to_string(&measurement)?))
}

/// The validated configuration (YAML) a measuring child reads from its standard
/// input (see [`measuring_process`]).
pub(super) fn config_from_stdin() -> anyhow::Result<Config> {
    let mut yaml = String::new();
    std::io::stdin()
        .read_to_string(&mut yaml)
        .map_err(|e| anyhow::anyhow!("cannot read the configuration from standard input: {e}"))?;
    let config = Config::from_yaml_str(&yaml).map_err(UserError::Config)?;
    config.validate().map_err(UserError::Config)?;
    Ok(config)
}
