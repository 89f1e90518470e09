//! `melora bench speed`: melora against PyTorch + peft on the same episodes, each
//! point of each program in a fresh process, the two alternating (see
//! [`crate::bench::speed`]). Results are rewritten after every point, so an
//! interrupted benchmark keeps what it measured.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use super::args::{BenchSpeedArgs, BenchSpeedRowArgs, GlobalArgs};
use super::bench_memory_cmd::{config_from_stdin, measuring_process};
use super::{write_stdout, UserError};
use crate::bench::memory::{bench_config, label, row_config, BenchModel, GridPoint, Measurement};
use crate::bench::speed::{pytorch_method, EpisodeFile, PytorchPoint, SpeedBench, SpeedRow};
use crate::config::{Config, DataSource, Precision};
use crate::models::adapter_files::save_model_adapter;

/// The workload's configuration: the benchmark's (5-way 5-shot 5-query, 32 tokens,
/// LoRA r=8 on query/value, meta-batch 4) on `model_dir`, WordNet tasks.
fn workload(model_dir: &Path) -> Config {
    let mut config = bench_config(&BenchModel::Directory(model_dir.to_owned()));
    config.data.source = DataSource::Wordnet;
    config.data.synthetic_only = false;
    config
}

/// The episodes file's settings (task shape, LoRA) on `config`, so that melora runs
/// what the file says PyTorch runs.
fn with_file_settings(mut config: Config, file: &EpisodeFile) -> Config {
    config.data.n_way = file.n_way;
    config.data.k_shot = file.k_shot;
    config.data.n_query = file.n_query;
    config.model.max_length = file.max_length;
    config.lora.rank = file.lora_rank;
    config.lora.alpha = file.lora_alpha;
    config.lora.target_modules = Some(file.lora_targets.clone());
    config.meta_learning.meta_batch_size = file.meta_batch_size();
    config
}

fn usage(message: String) -> anyhow::Error {
    UserError::Usage(message).into()
}

/// Reads the episodes file, or samples and writes it when it does not exist.
fn episodes(path: &Path, config: &Config, meta_batches: usize) -> anyhow::Result<EpisodeFile> {
    if path.exists() {
        let file = EpisodeFile::read(path).map_err(|e| usage(format!("--episodes: {e}")))?;
        if file.meta_batches.len() < meta_batches {
            return Err(usage(format!(
                "--episodes {}: {} meta-batches, {meta_batches} needed for --iterations {}; \
                 delete the file to sample a new one",
                path.display(),
                file.meta_batches.len(),
                meta_batches - 1
            )));
        }
        return Ok(file);
    }
    eprintln!(
        "bench speed: sampling {meta_batches} meta-batches of WordNet tasks into {}",
        path.display()
    );
    let file = EpisodeFile::sample(config, meta_batches)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    file.write(path)?;
    Ok(file)
}

/// Checks that `python` imports what the script needs, so that a missing package is
/// one clear error instead of a failure in every row.
fn check_python(python: &Path, script: &Path) -> anyhow::Result<()> {
    if !script.is_file() {
        return Err(usage(format!(
            "--script {}: no such file (run from the repository's root, or give the \
             path of bench/pytorch/meta_bench.py)",
            script.display()
        )));
    }
    let status = Command::new(python)
        .args(["-c", "import torch, transformers, peft"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
    match status {
        Ok(s) if s.success() => Ok(()),
        _ => Err(usage(format!(
            "--python {}: cannot import torch, transformers and peft; install them with \
             `{0} -m pip install -r bench/pytorch/requirements.txt`, or pass --melora-only",
            python.display()
        ))),
    }
}

pub(crate) fn run(global: &GlobalArgs, args: &BenchSpeedArgs) -> anyhow::Result<ExitCode> {
    if args.iterations == 0 {
        return Err(usage("--iterations must be at least 1".into()));
    }
    if args.threads == Some(0) {
        return Err(usage("--threads must be at least 1".into()));
    }
    if let Some(&k) = args.ks.iter().find(|&&k| k == 0) {
        return Err(usage(format!(
            "--k: inner steps must be at least 1, got {k}"
        )));
    }
    if let Some(&m) = args.methods.iter().find(|&&m| pytorch_method(m).is_none()) {
        return Err(usage(format!(
            "--methods: `{m}` has no PyTorch counterpart in bench/pytorch/meta_bench.py; \
             choose among maml-full_graph, maml, fomaml, reptile, melora-diagonal, \
             melora-gauss_newton"
        )));
    }
    if !args.model_dir.join("config.json").is_file() {
        return Err(usage(format!(
            "--model-dir {}: no config.json there (expected a Hugging Face model folder \
             with config.json, model.safetensors and tokenizer.json; \
             scripts/fetch-minilm.sh fetches all-MiniLM-L6-v2)",
            args.model_dir.display()
        )));
    }
    if !args.melora_only {
        check_python(&args.python, &args.script)?;
    }
    let output = global
        .output
        .clone()
        .unwrap_or_else(|| PathBuf::from("bench-results"));
    let threads = args
        .threads
        .unwrap_or_else(candle_core::utils::get_num_threads);
    let episodes_path = args
        .episodes
        .clone()
        .unwrap_or_else(|| output.join("episodes.json"));
    let file = episodes(
        &episodes_path,
        &workload(&args.model_dir),
        args.iterations + 1,
    )?;
    let base = with_file_settings(workload(&args.model_dir), &file);
    let initial_adapter = output.join("initial-adapter");
    write_initial_adapter(&base, &initial_adapter)?;
    let mut bench = SpeedBench {
        episodes: episodes_path.clone(),
        model: args.model_dir.clone(),
        threads,
        iterations: args.iterations,
        machine: crate::bench::machine::Machine::current(),
        rows: Vec::new(),
    };
    bench.machine.kernel_threads = threads;
    std::fs::create_dir_all(&output)?;
    let total = args.methods.len() * args.ks.len();
    let mut index = 0;
    for &k in &args.ks {
        for &method in &args.methods {
            index += 1;
            let point = GridPoint {
                variant: method,
                k,
                checkpointing: false,
                precision: Precision::F32,
            };
            let config = row_config(&base, &point);
            let prefix = format!("[{index}/{total}] {}, K={k}", label(method));
            // Alternating: PyTorch first on odd points, melora first on even ones.
            let (mut melora, mut pytorch) = (None, None);
            for turn in 0..2 {
                if (turn == 0) == (index % 2 == 1) && !args.melora_only {
                    pytorch = Some(run_pytorch(
                        args,
                        &episodes_path,
                        &initial_adapter,
                        (method, k),
                        threads,
                    ));
                } else {
                    melora = Some(run_melora(
                        &config,
                        &episodes_path,
                        args.iterations,
                        threads,
                    ));
                }
            }
            let melora = melora.unwrap_or_else(|| Err("not run".into()));
            let pytorch = pytorch.unwrap_or_else(|| Err("not run (--melora-only)".into()));
            let melora_tokens_per_second = melora.as_ref().ok().map(|m| {
                let rates: Vec<f64> = m
                    .seconds
                    .iter()
                    .enumerate()
                    .map(|(i, s)| file.tokens(i + 1) as f64 / s)
                    .collect();
                crate::eval::stats::median(&rates).unwrap_or(f64::NAN)
            });
            let row = SpeedRow {
                method,
                k,
                melora,
                melora_tokens_per_second,
                pytorch,
            };
            let seconds = |r: &Result<f64, String>| match r {
                Ok(s) => format!("{s:.2} s"),
                Err(e) => format!("failed: {e}"),
            };
            eprintln!(
                "{prefix}: melora {}, PyTorch {}{}",
                seconds(
                    &row.melora
                        .as_ref()
                        .map(|m| m.seconds_per_iter)
                        .map_err(Clone::clone)
                ),
                seconds(
                    &row.pytorch
                        .as_ref()
                        .map(|p| p.seconds_per_iteration)
                        .map_err(Clone::clone)
                ),
                row.time_ratio()
                    .map_or(String::new(), |r| format!(" ({r:.2}×)")),
            );
            bench.rows.push(row);
            bench.machine.load_average_end = crate::bench::machine::load_average();
            bench.write(&output)?;
        }
    }
    let (json, md) = bench.write(&output)?;
    write_stdout(&format!(
        "{}\nwritten: {} and {}\n",
        bench.to_markdown(),
        json.display(),
        md.display()
    ))?;
    let failed = bench
        .rows
        .iter()
        .filter(|r| r.melora.is_err() || (!args.melora_only && r.pytorch.is_err()))
        .count();
    if failed > 0 {
        eprintln!(
            "error: {failed} of {} points failed (see {})",
            bench.rows.len(),
            md.display()
        );
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

fn run_melora(
    config: &Config,
    episodes: &Path,
    iterations: usize,
    threads: usize,
) -> Result<Measurement, String> {
    let exe =
        std::env::current_exe().map_err(|e| format!("cannot find the melora executable: {e}"))?;
    let yaml = config.to_yaml_string().map_err(|e| e.to_string())?;
    let mut command = Command::new(exe);
    command
        .args(["bench", "speed-row", "--iterations"])
        .arg(iterations.to_string())
        .arg("--episodes")
        .arg(episodes)
        .env("RAYON_NUM_THREADS", threads.to_string());
    measuring_process(command, Some(&yaml))
}

/// Writes the trainable parameters every point of `config` starts from (LoRA's A as
/// the seed draws it, zero B and head) into `dir` as a PEFT adapter, so that the
/// PyTorch script starts from the same and both first meta-iterations compare.
fn write_initial_adapter(config: &Config, dir: &Path) -> anyhow::Result<()> {
    let model = crate::run::build::build_model(config)?;
    let params = crate::run::build::initial_params(model.as_ref(), config)?;
    let base = config.model.path.as_ref().map(|p| p.display().to_string());
    save_model_adapter(dir, model.as_ref(), &params, base.as_deref())?;
    Ok(())
}

fn run_pytorch(
    args: &BenchSpeedArgs,
    episodes: &Path,
    initial_adapter: &Path,
    (method, k): (crate::config::Variant, usize),
    threads: usize,
) -> Result<PytorchPoint, String> {
    let method = pytorch_method(method).ok_or("no PyTorch counterpart")?;
    let mut command = Command::new(&args.python);
    command
        .arg(&args.script)
        .arg("--model-dir")
        .arg(&args.model_dir)
        .arg("--episodes")
        .arg(episodes)
        .arg("--initial-adapter")
        .arg(initial_adapter)
        .args(["--method", method, "--k", &k.to_string()])
        .args(["--threads", &threads.to_string()])
        .args([
            "--iterations",
            &args.iterations.to_string(),
            "--warmup",
            "1",
        ])
        .env("OMP_NUM_THREADS", threads.to_string())
        .env("HF_HUB_OFFLINE", "1");
    measuring_process(command, None)
}

/// `melora bench speed-row`: the configuration (YAML) from standard input, measured
/// in this process on the episodes file; the measurement as one line of JSON.
pub(crate) fn run_row(args: &BenchSpeedRowArgs) -> anyhow::Result<()> {
    let config = config_from_stdin()?;
    let file = EpisodeFile::read(&args.episodes)?;
    let measurement = crate::bench::memory::measure_on(&config, args.iterations, file.source()?)?;
    write_stdout(&format!("{}\n", serde_json::to_string(&measurement)?))
}
