//! `melora train`, `evaluate`, `full` and `report`, run as a user would, on tiny
//! configurations (built-in tiny BERT, synthetic tasks; a few iterations).

use std::path::Path;
use std::time::{Duration, Instant};

mod common;

use common::{event_steps, melora, metrics_lines, mlflow_runs, mlflow_steps, step_of, text};

const TINY: &str = "seed: 3
model:
  name: tiny-bert
  max_length: 12
lora:
  rank: 2
meta_learning:
  method: fomaml
  meta_batch_size: 2
  num_iterations: 4
  inner:
    steps: 1
    lr: 0.5
data:
  n_way: 3
  k_shot: 2
  n_query: 2
evaluation:
  episodes: 6
  eval_every: 2
  val_episodes: 2
  finetune_steps: 2
tracking:
  experiment_name: tiny
  tensorboard: true
  mlflow: true
comparison:
  baselines:
  - maml
  - finetune
  memory_inner_steps:
  - 1
  - 2
";

fn write_config(dir: &Path) -> String {
    let path = dir.join("tiny.yml");
    std::fs::write(&path, TINY).unwrap();
    path.display().to_string()
}

#[test]
fn train_then_evaluate_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    let out = dir.path().join("runs");
    let out_s = out.display().to_string();
    let train = melora(&["train", "--config", &config, "--output", &out_s]);
    assert!(train.status.success(), "{}", text(&train.stderr));
    let stdout = text(&train.stdout);
    assert!(stdout.contains("iterations: 4"), "{stdout}");
    let run = out.join("tiny").join("fomaml-seed3");
    for file in [
        "config.yml",
        "metrics.jsonl",
        "best/state.json",
        "last/params.safetensors",
    ] {
        assert!(
            run.join(file).exists(),
            "{file} missing in {}",
            run.display()
        );
    }
    assert!(out.join("mlruns").is_dir());
    let events = std::fs::read_dir(&run)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains("tfevents")
        })
        .count();
    assert_eq!(events, 1);
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 4, "{metrics}");
    assert!(metrics.contains("val/score"));

    // The checkpoint carries its configuration: no --config needed.
    let best = run.join("best").display().to_string();
    let eval = melora(&["evaluate", "--checkpoint", &best, "--episodes", "3"]);
    assert!(eval.status.success(), "{}", text(&eval.stderr));
    let stdout = text(&eval.stdout);
    assert!(
        stdout.contains("accuracy:") && stdout.contains("macro-F1:"),
        "{stdout}"
    );
    assert!(run.join("evaluation.json").exists());

    // The reference project's --mode spelling.
    let resumed = melora(&[
        "--mode",
        "train",
        "--resume",
        &run.join("last").display().to_string(),
    ]);
    assert!(resumed.status.success(), "{}", text(&resumed.stderr));
    assert!(text(&resumed.stdout).contains("iterations: 4"));
}

#[test]
fn bad_checkpoints_and_outputs_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-run").join("best");
    let eval = melora(&["evaluate", "--checkpoint", &missing.display().to_string()]);
    assert!(!eval.status.success());
    let err = text(&eval.stderr);
    assert!(
        err.contains("no-such-run") && err.contains("checkpoint folder"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");

    let config = write_config(dir.path());
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let out = file.join("runs").display().to_string();
    let train = melora(&["train", "--config", &config, "--output", &out]);
    assert!(!train.status.success());
    let err = text(&train.stderr);
    assert!(err.contains("a-file"), "{err}");
}

/// `--device` on a CPU-only build: CUDA is a configuration error (exit 2) that says
/// how to build with it, before anything is written; a wrong name is a usage error.
#[test]
fn a_gpu_device_on_a_cpu_build_says_how_to_get_one() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    let out = dir.path().join("runs");
    let out_text = out.display().to_string();
    let wrong = melora(&["train", "--config", &config, "--device", "gpu"]);
    assert_eq!(wrong.status.code(), Some(2));
    let err = text(&wrong.stderr);
    assert!(err.contains("unknown device `gpu`"), "{err}");
    if cfg!(feature = "cuda") {
        return; // a CUDA build opens the GPU, or says why it cannot
    }
    let train = melora(&[
        "train", "--config", &config, "--output", &out_text, "--device", "cuda",
    ]);
    assert_eq!(train.status.code(), Some(2), "{}", text(&train.stderr));
    let err = text(&train.stderr);
    assert!(
        err.contains("`device`") && err.contains("--features cuda") && !err.contains("panicked"),
        "{err}"
    );
    assert!(
        !out.join("tiny").exists(),
        "a refused run wrote {}",
        out.display()
    );
}

#[test]
fn full_writes_the_comparison_and_the_report() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    let out = dir.path().join("runs");
    let full = melora(&[
        "full",
        "--config",
        &config,
        "--output",
        &out.display().to_string(),
    ]);
    assert!(full.status.success(), "{}", text(&full.stderr));
    let stdout = text(&full.stdout);
    for name in [
        "fomaml",
        "maml",
        "finetune",
        "paired statistics",
        "Wilcoxon",
        "against the best baseline",
    ] {
        assert!(stdout.contains(name), "`{name}` missing from:\n{stdout}");
    }
    let exp = out.join("tiny");
    for file in [
        "results.json",
        "report.md",
        "report.html",
        "plots/training-loss.png",
        "plots/validation.svg",
        "plots/pareto.png",
        "plots/memory-vs-k.png",
    ] {
        assert!(exp.join(file).exists(), "{file} missing");
    }
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(exp.join("results.json")).unwrap()).unwrap();
    assert_eq!(results["methods"].as_array().unwrap().len(), 3);
    // Every method saw the same 6 test episodes.
    for run in results["runs"].as_array().unwrap() {
        assert_eq!(run["evaluation"]["episodes"].as_array().unwrap().len(), 6);
    }
    // maml and maml-full_graph at K = 1, 2.
    assert!(results["memory_vs_k"].as_array().unwrap().len() >= 6);

    // Resumed, every run is kept: the same scores, nothing trained again.
    let resumed = melora(&[
        "full",
        "--config",
        &config,
        "--output",
        &out.display().to_string(),
        "--resume",
    ]);
    assert!(resumed.status.success(), "{}", text(&resumed.stderr));
    let err = text(&resumed.stderr);
    assert_eq!(
        err.matches("kept from the earlier results").count(),
        3,
        "{err}"
    );
    let again: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(exp.join("results.json")).unwrap()).unwrap();
    assert_eq!(again["methods"], results["methods"]);
    assert!(exp.join("results.before-resume.json").is_file());

    // compare: an experiment beside itself is the same comparison, written out.
    let merged = dir.path().join("merged");
    let exp_text = exp.display().to_string();
    let compare = melora(&[
        "compare",
        &exp_text,
        &exp_text,
        "--output",
        &merged.display().to_string(),
    ]);
    assert!(compare.status.success(), "{}", text(&compare.stderr));
    assert!(text(&compare.stdout).contains("paired statistics"));
    let same: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(merged.join("results.json")).unwrap())
            .unwrap();
    assert_eq!(same["methods"], results["methods"]);
    assert!(merged.join("report.md").is_file());
    let missing = melora(&[
        "compare",
        &exp_text,
        &dir.path().join("none").display().to_string(),
    ]);
    assert!(!missing.status.success());
    assert!(
        text(&missing.stderr).contains("melora full"),
        "{}",
        text(&missing.stderr)
    );

    std::fs::remove_file(exp.join("report.md")).unwrap();
    let report = melora(&["report", &exp.display().to_string()]);
    assert!(report.status.success(), "{}", text(&report.stderr));
    assert!(exp.join("report.md").exists());

    let nowhere = melora(&["report", &dir.path().join("nothing").display().to_string()]);
    assert!(!nowhere.status.success());
    assert!(text(&nowhere.stderr).contains("melora full"));
}

#[test]
fn every_shipped_configuration_is_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yml") {
            let out = melora(&["config", "--check", "--config", &path.display().to_string()]);
            assert!(
                out.status.success(),
                "{}: {}",
                path.display(),
                text(&out.stderr)
            );
            checked += 1;
        }
    }
    assert!(
        checked >= 5,
        "only {checked} configurations in {}",
        dir.display()
    );
}

/// A memory budget: one below what the planner predicts for the configuration as
/// given makes `train` choose a more frugal one, say so and run it; one below the
/// most frugal configuration is refused with the smallest feasible budget, status 2.
#[test]
fn a_memory_budget_chooses_a_configuration_or_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    let output = dir.path().join("runs").display().to_string();
    let planned = melora(&["plan", "--config", &config, "--method", "maml", "--json"]);
    assert!(planned.status.success(), "{}", text(&planned.stderr));
    let json: serde_json::Value = serde_json::from_slice(&planned.stdout).unwrap();
    let peak = json["plan"]["peak_bytes"].as_u64().unwrap();
    // 90% of the plain prediction: checkpointing or micro-batches must make it fit.
    let budget = (peak * 9 / 10).to_string();
    let out = melora(&[
        "train",
        "--config",
        &config,
        "--method",
        "maml",
        "--output",
        &output,
        "--memory-budget",
        &budget,
    ]);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("as given: predicted") && stderr.contains("too large"),
        "{stderr}"
    );
    assert!(
        stderr.contains("chosen: ") && !stderr.contains("chosen: the configuration as given"),
        "{stderr}"
    );
    let out = melora(&[
        "train",
        "--config",
        &config,
        "--output",
        &output,
        "--memory-budget",
        "1KiB",
    ]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("smallest predicted peak is") && stderr.contains("--memory-budget"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// A run small enough to take about a second, validated (and checkpointed) every
/// 5 of its 40 iterations, with every log on.
const KILLABLE: &str = "seed: 5
model:
  name: tiny-bert
  max_length: 8
lora:
  rank: 2
meta_learning:
  method: fomaml
  meta_batch_size: 1
  num_iterations: 40
  inner:
    steps: 1
    lr: 0.5
data:
  n_way: 2
  k_shot: 1
  n_query: 1
evaluation:
  episodes: 2
  eval_every: 5
  val_episodes: 1
tracking:
  experiment_name: killed
  tensorboard: true
  mlflow: true
";

/// The iteration of the `last` checkpoint in `run` (or of the previous one a
/// checkpoint swap in progress left beside it), if any.
fn last_checkpoint(run: &Path) -> Option<u64> {
    [
        run.join("last/state.json"),
        run.join(".last.old/state.json"),
    ]
    .iter()
    .find_map(|path| {
        let text = std::fs::read_to_string(path).ok()?;
        let state: serde_json::Value = serde_json::from_str(&text).ok()?;
        state["iteration"].as_u64()
    })
}

/// `kill -9` during `train` with steps logged past the last checkpoint, then
/// `train --resume`: the run completes, `metrics.jsonl`, the TensorBoard events
/// and the (one) MLflow run hold every step exactly once, what was logged up to
/// the checkpoint is kept as it was, and the re-run steps have the killed run's
/// losses (exact resumption).
#[test]
fn a_run_killed_and_resumed_logs_every_step_once() {
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("killable.yml");
    std::fs::write(&config, KILLABLE).unwrap();
    let out = dir.path().join("runs");
    let run = out.join("killed").join("fomaml-seed5");
    let log = std::fs::File::create(dir.path().join("stderr.txt")).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_melora"))
        .args(["train", "--config", &config.display().to_string()])
        .args(["--output", &out.display().to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    // Kill one or two steps past a checkpoint, three or more before the next.
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let logged = metrics_lines(&run.join("metrics.jsonl"))
            .last()
            .map_or(0, step_of);
        if let Some(checkpoint) = last_checkpoint(&run) {
            if (checkpoint + 1..=checkpoint + 2).contains(&logged) {
                break;
            }
        }
        let finished = child.try_wait().unwrap();
        assert!(
            finished.is_none() && Instant::now() < deadline,
            "no step past a checkpoint to kill at (exit {finished:?}); stderr:\n{}",
            std::fs::read_to_string(dir.path().join("stderr.txt")).unwrap()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(9), "the run ended before the kill");
    let checkpoint = last_checkpoint(&run).unwrap();
    let killed = metrics_lines(&run.join("metrics.jsonl"));
    let killed_at = killed.last().map_or(0, step_of);
    assert!(
        killed_at > checkpoint,
        "{killed_at} vs checkpoint {checkpoint}"
    );

    let resumed = melora(&["train", "--resume", &run.join("last").display().to_string()]);
    assert!(resumed.status.success(), "{}", text(&resumed.stderr));
    assert!(text(&resumed.stdout).contains("iterations: 40"));

    let all: Vec<u64> = (1..=40).collect();
    let lines = metrics_lines(&run.join("metrics.jsonl"));
    assert_eq!(lines.iter().map(step_of).collect::<Vec<_>>(), all);
    for (line, before) in lines.iter().zip(&killed) {
        let step = step_of(line);
        if step <= checkpoint {
            assert_eq!(line, before, "step {step} before the checkpoint changed");
        } else {
            for key in [
                "train/query_loss",
                "train/support_loss",
                "train/grad_norm",
                "train/query_accuracy",
            ] {
                assert_eq!(line[key], before[key], "{key} at re-run step {step}");
            }
        }
    }
    assert_eq!(event_steps(&run), all);
    let runs = mlflow_runs(&out.join("mlruns"), "killed");
    assert_eq!(runs.len(), 1, "the resumption continues the MLflow run");
    let (mlflow_run, meta) = &runs[0];
    assert_eq!(meta["status"].as_u64(), Some(3), "FINISHED");
    assert_eq!(
        mlflow_steps(&mlflow_run.join("metrics/train/query_loss")),
        all
    );
    assert_eq!(
        mlflow_steps(&mlflow_run.join("metrics/val/score")),
        (1..=8).map(|i| 5 * i).collect::<Vec<u64>>()
    );
}

/// Ctrl-C (SIGINT) during `train`: the run saves `last`, exits with status 130 and
/// its MLflow run ends KILLED; `train --resume` continues that MLflow run to
/// FINISHED, each step once.
#[test]
fn ctrl_c_ends_the_mlflow_run_killed_and_resume_continues_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("killable.yml");
    std::fs::write(&config, KILLABLE).unwrap();
    let out = dir.path().join("runs");
    let run = out.join("killed").join("fomaml-seed5");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_melora"))
        .args(["train", "--config", &config.display().to_string()])
        .args(["--output", &out.display().to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // The Ctrl-C handler is installed before the first step is logged.
    let deadline = Instant::now() + Duration::from_secs(300);
    while metrics_lines(&run.join("metrics.jsonl")).is_empty() {
        assert!(child.try_wait().unwrap().is_none(), "the run ended early");
        assert!(Instant::now() < deadline, "no step logged");
        std::thread::sleep(Duration::from_millis(2));
    }
    let sent = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{status:?}");
    let stopped_at = last_checkpoint(&run).unwrap();
    assert!(stopped_at < 40, "the run was not interrupted");
    let runs = mlflow_runs(&out.join("mlruns"), "killed");
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].1["status"].as_u64(), Some(5), "KILLED");

    let resumed = melora(&["train", "--resume", &run.join("last").display().to_string()]);
    assert!(resumed.status.success(), "{}", text(&resumed.stderr));
    let all: Vec<u64> = (1..=40).collect();
    let steps: Vec<u64> = metrics_lines(&run.join("metrics.jsonl"))
        .iter()
        .map(step_of)
        .collect();
    assert_eq!(steps, all);
    let runs = mlflow_runs(&out.join("mlruns"), "killed");
    assert_eq!(runs.len(), 1, "the resumption continues the MLflow run");
    assert_eq!(runs[0].1["status"].as_u64(), Some(3), "FINISHED");
    assert_eq!(
        mlflow_steps(&runs[0].0.join("metrics/train/query_loss")),
        all
    );
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

/// `adapt` on a trained tiny model: one JSON line per query item with a label from
/// the support set and a probability per label (summing to 1), accuracy over the
/// labelled queries, the adapted adapter and `export`'s folder in PEFT's format; a
/// query label the support set lacks is an error naming it.
#[test]
fn adapt_predicts_a_users_texts_and_export_writes_a_peft_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    let out = dir.path().join("runs");
    let train = melora(&[
        "train",
        "--config",
        &config,
        "--output",
        &out.display().to_string(),
    ]);
    assert!(train.status.success(), "{}", text(&train.stderr));
    let checkpoint = out.join("tiny/fomaml-seed3/best");
    let support = dir.path().join("support.jsonl");
    write(
        &support,
        "{\"text\": \"refund my order\", \"label\": \"billing\"}\n\
         {\"text\": \"charged twice\", \"label\": \"billing\"}\n\
         {\"text\": \"app crashes\", \"label\": \"bug\"}\n\
         {\"text\": \"error on save\", \"label\": \"bug\"}\n",
    );
    let query = dir.path().join("query.csv");
    write(
        &query,
        "text,label\ncharged again,billing\ncrashes on start,\n",
    );
    let predictions = dir.path().join("predictions.jsonl");
    let adapter = dir.path().join("adapted");
    let s = |p: &Path| p.display().to_string();
    let run = melora(&[
        "adapt",
        "--checkpoint",
        &s(&checkpoint),
        "--support",
        &s(&support),
        "--query",
        &s(&query),
        "--output",
        &s(&predictions),
        "--save-adapter",
        &s(&adapter),
    ]);
    let stderr = text(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert!(
        stderr.contains("accuracy on the 1 labelled query items"),
        "{stderr}"
    );
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&predictions)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["item"], "charged again");
    assert_eq!(lines[0]["label"], "billing");
    assert!(lines[1].get("label").is_none());
    for line in &lines {
        let p = line["probabilities"].as_object().unwrap();
        assert_eq!(p.keys().collect::<Vec<_>>(), ["billing", "bug"]);
        let sum: f64 = p.values().map(|v| v.as_f64().unwrap()).sum();
        assert!((sum - 1.0).abs() < 1e-9, "{sum}");
        assert!(p.contains_key(line["prediction"].as_str().unwrap()));
    }
    for file in ["adapter_config.json", "adapter_model.safetensors"] {
        assert!(adapter.join(file).exists(), "{file}");
    }
    let exported = dir.path().join("exported");
    let run = melora(&[
        "export",
        "--checkpoint",
        &s(&checkpoint),
        "--output",
        &s(&exported),
    ]);
    assert!(run.status.success(), "{}", text(&run.stderr));
    let adapter_config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(exported.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(adapter_config["peft_type"], "LORA");
    assert_eq!(adapter_config["r"], 2);
    assert_eq!(
        adapter_config["modules_to_save"],
        serde_json::json!(["classifier"])
    );

    // A query label no support example has.
    write(&query, "text,label\ncharged again,shipping\n");
    let run = melora(&[
        "adapt",
        "--checkpoint",
        &s(&checkpoint),
        "--support",
        &s(&support),
        "--query",
        &s(&query),
    ]);
    let stderr = text(&run.stderr);
    assert!(!run.status.success());
    assert!(
        stderr.contains("`shipping`") && stderr.contains("no support example"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// `adapt` reads images as the checkpoint's training did: a folder of class folders
/// for the support set, PNG files for the queries, of any size (resized).
#[test]
fn adapt_reads_image_folders_for_conv4() {
    adapt_on_image_folders("conv4", "fomaml", "");
}

/// Prototypical networks train on generated images, and their checkpoint scores
/// queries by distance to the support folder's class means.
#[test]
fn protonet_trains_on_images_and_adapts_to_image_folders() {
    adapt_on_image_folders("conv4", "protonet", "");
}

/// The Few-Shot Cosine Transformer (both attentions, with VIC) likewise.
#[test]
fn fsct_trains_on_images_and_adapts_to_image_folders() {
    adapt_on_image_folders("conv4", "fsct_cosine", "");
    adapt_on_image_folders("conv4", "fsct_softmax", "");
}

/// ResNet-12 meta-trains with exact second-order MAML (recompute mode) checkpointed
/// per stage, and Conv6 with ProtoNets; both checkpoints adapt to image folders.
#[test]
fn resnet12_and_conv6_train_and_adapt_to_image_folders() {
    adapt_on_image_folders(
        "resnet12",
        "maml",
        "memory_optimization:\n  checkpointing:\n    enabled: true\n    every: 2\n",
    );
    adapt_on_image_folders("conv6", "protonet", "");
}

/// A ProtoNet checkpoint meta-trained 2-way is evaluated 3-way (it never reads the
/// classification head), into a file of its own beside the run's `evaluation.json`,
/// and so is an FS-CT checkpoint at one shot (its prototype weights are a softmax over
/// one shot, 1 whatever they hold) but not at two, where they are trained per class;
/// MAML's head has one row per class, so its checkpoint refuses, naming the sizes.
#[test]
fn metric_checkpoints_evaluate_at_another_way() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("runs");
    let s = |p: &Path| p.display().to_string();
    for (method, shots) in [
        ("protonet", 1),
        ("fsct_cosine", 1),
        ("fsct_cosine", 2),
        ("fomaml", 1),
    ] {
        let config = dir.path().join(format!("{method}-{shots}.yml"));
        let name = format!("way{shots}");
        write(
            &config,
            &format!(
                "model:\n  name: conv4\nmeta_learning:\n  method: {method}\n  \
                 meta_batch_size: 1\n  num_iterations: 2\ndata:\n  synthetic_task: images\n  \
                 n_way: 2\n  k_shot: {shots}\n  n_query: 1\nevaluation:\n  episodes: 2\n  \
                 eval_every: 2\n  val_episodes: 1\ntracking:\n  experiment_name: {name}\n"
            ),
        );
        let train = melora(&["train", "--config", &s(&config), "--output", &s(&out)]);
        assert!(train.status.success(), "{}", text(&train.stderr));
        let best = out.join(format!("{name}/{method}-seed42/best"));
        let run = melora(&["evaluate", "--checkpoint", &s(&best), "--n-way", "3"]);
        if method == "fsct_cosine" && shots == 2 {
            let err = text(&run.stderr);
            assert!(
                !run.status.success() && err.contains("proto_weight") && err.contains("[3, 2, 1]"),
                "{err}"
            );
        } else if method != "fomaml" {
            assert!(run.status.success(), "{}", text(&run.stderr));
            let written = out.join(format!(
                "{name}/{method}-seed42/evaluation-3way-1shot-1query.json"
            ));
            assert!(written.exists(), "{}", text(&run.stdout));
        } else {
            let err = text(&run.stderr);
            assert!(
                !run.status.success() && err.contains("2 classes") && err.contains("[3, "),
                "{err}"
            );
            assert!(!err.contains("LoRA"), "{err}");
        }
    }
}

/// `evaluate --batch-norm running` scores a backbone's checkpoint with running
/// BatchNorm statistics of training episodes, into a file of its own beside the
/// run's `evaluation.json`; a model without BatchNorm refuses it as a usage error
/// naming the key.
#[test]
fn evaluate_with_running_batch_norm_statistics() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("runs");
    let s = |p: &Path| p.display().to_string();
    let config = dir.path().join("protonet.yml");
    write(
        &config,
        "model:\n  name: conv4\nmeta_learning:\n  method: protonet\n  meta_batch_size: 1\n  \
         num_iterations: 2\ndata:\n  synthetic_task: images\n  n_way: 2\n  k_shot: 1\n  \
         n_query: 2\nevaluation:\n  episodes: 2\n  eval_every: 2\n  val_episodes: 1\n  \
         batch_norm_episodes: 3\ntracking:\n  experiment_name: bn\n",
    );
    let train = melora(&["train", "--config", &s(&config), "--output", &s(&out)]);
    assert!(train.status.success(), "{}", text(&train.stderr));
    let best = out.join("bn/protonet-seed42/best");
    let run = melora(&[
        "evaluate",
        "--checkpoint",
        &s(&best),
        "--batch-norm",
        "running",
    ]);
    assert!(run.status.success(), "{}", text(&run.stderr));
    assert!(out
        .join("bn/protonet-seed42/evaluation-running-bn.json")
        .exists());
    let run = melora(&["evaluate", "--batch-norm", "running", "--episodes", "1"]);
    let err = text(&run.stderr);
    assert_eq!(run.status.code(), Some(2), "{err}");
    assert!(
        err.contains("evaluation.batch_norm") && err.contains("tiny-bert"),
        "{err}"
    );
}

/// Trains `method` on `model` (with the `extra` YAML sections) on generated images,
/// then adapts the checkpoint to a support folder of PNGs and scores a query folder.
fn adapt_on_image_folders(model: &str, method: &str, extra: &str) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("vision.yml");
    write(
        &config,
        &format!(
            "model:\n  name: {model}\nmeta_learning:\n  method: {method}\n  \
             meta_batch_size: 1\n  num_iterations: 2\ndata:\n  synthetic_task: images\n  \
             n_way: 2\n  k_shot: 2\n  n_query: 1\nevaluation:\n  episodes: 1\n  \
             eval_every: 2\n  val_episodes: 1\ntracking:\n  experiment_name: img\n{extra}"
        ),
    );
    let out = dir.path().join("runs");
    let s = |p: &Path| p.display().to_string();
    let train = melora(&["train", "--config", &s(&config), "--output", &s(&out)]);
    assert!(train.status.success(), "{}", text(&train.stderr));
    // 40×40 grey PNGs: a vertical bar for one class, a horizontal bar for the other.
    let png = |path: &Path, vertical: bool| {
        let mut pixels = vec![255u8; 40 * 40];
        for i in 0..40 {
            for j in 17..23 {
                pixels[if vertical { i * 40 + j } else { j * 40 + i }] = 0;
            }
        }
        let file = std::fs::File::create(path).unwrap();
        let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), 40, 40);
        encoder.set_color(png::ColorType::Grayscale);
        encoder.set_depth(png::BitDepth::Eight);
        encoder
            .write_header()
            .unwrap()
            .write_image_data(&pixels)
            .unwrap();
    };
    let support = dir.path().join("support");
    for (class, vertical) in [("vertical", true), ("horizontal", false)] {
        std::fs::create_dir_all(support.join(class)).unwrap();
        png(&support.join(class).join("a.png"), vertical);
        png(&support.join(class).join("b.png"), vertical);
    }
    let query = dir.path().join("query");
    std::fs::create_dir_all(&query).unwrap();
    png(&query.join("1.png"), true);
    png(&query.join("2.png"), false);
    let run = melora(&[
        "adapt",
        "--checkpoint",
        &s(&out.join(format!("img/{method}-seed42/best"))),
        "--support",
        &s(&support),
        "--query",
        &s(&query),
    ]);
    assert!(run.status.success(), "{}", text(&run.stderr));
    let lines: Vec<serde_json::Value> = text(&run.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["item"], "1.png");
    // A folder without class folders cannot be a support set.
    let run = melora(&[
        "adapt",
        "--checkpoint",
        &s(&out.join(format!("img/{method}-seed42/best"))),
        "--support",
        &s(&query),
        "--query",
        &s(&query),
    ]);
    assert!(
        text(&run.stderr).contains("one subfolder per class"),
        "{}",
        text(&run.stderr)
    );
}

/// A colour photograph for the image-folder tests: class `class`'s hue, a bright
/// bar whose orientation alternates by class, and noise from `example`; `width ×
/// height` (not square) so that the reader's resize is exercised. JPEG or PNG by
/// the file's extension.
fn write_photo(path: &Path, class: usize, example: usize, width: u32, height: u32) {
    let hue = [
        [200u8, 40, 40],
        [40, 200, 40],
        [40, 40, 200],
        [200, 200, 40],
    ][class % 4];
    let image = image::RgbImage::from_fn(width, height, |x, y| {
        let noise = ((x * 31 + y * 17 + example as u32 * 7) % 23) as u8;
        let on_bar = if class.is_multiple_of(2) {
            (x * 3 / width) == 1
        } else {
            (y * 3 / height) == 1
        };
        let base = if on_bar { [250, 250, 250] } else { hue };
        image::Rgb(base.map(|v| v.saturating_sub(noise)))
    });
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    image.save(path).unwrap();
}

/// Image-folder data sets in colour, as users have them: one folder per class with a
/// split file (JPEG and PNG mixed, augmented in meta-training), and the
/// miniImagenet layout (`images/` and three CSVs). A metric learner and MAML train on
/// them at 32 px RGB, evaluate, and adapt to a support folder of JPEGs.
#[test]
fn image_folder_data_sets_train_evaluate_and_adapt_in_colour() {
    let dir = tempfile::tempdir().unwrap();
    let s = |p: &Path| p.display().to_string();
    // Class folders, six classes of four images, with a split file.
    let folders = dir.path().join("classes");
    let mut split = String::from("class,split\n");
    for class in 0..6 {
        let name = format!("c{class}");
        for example in 0..4 {
            let ext = if example % 2 == 0 { "jpg" } else { "png" };
            write_photo(
                &folders.join(&name).join(format!("{example}.{ext}")),
                class,
                example,
                44,
                38,
            );
        }
        let which = ["train", "train", "val", "val", "test", "test"][class];
        split.push_str(&format!("{name},{which}\n"));
    }
    std::fs::write(folders.join(".DS_Store"), b"finder").unwrap();
    let split_file = dir.path().join("split.csv");
    std::fs::write(&split_file, split).unwrap();
    // The miniImagenet layout: the same kind of images under images/, three CSVs.
    let mini = dir.path().join("mini");
    for (which, classes) in [("train", 0..2), ("val", 2..4), ("test", 4..6)] {
        let mut csv = String::from("filename,label\n");
        for class in classes {
            for example in 0..4 {
                let file = format!("n0{class}_{example}.jpg");
                write_photo(&mini.join("images").join(&file), class, example, 40, 40);
                csv.push_str(&format!("{file},n0{class}\n"));
            }
        }
        std::fs::write(mini.join(format!("{which}.csv")), csv).unwrap();
    }
    let out = dir.path().join("runs");
    for (method, data) in [
        (
            "protonet",
            format!(
                "  path: {}\n  split_file: {}\n  train_aug: true\n",
                s(&folders),
                s(&split_file)
            ),
        ),
        ("fsct_cosine", format!("  path: {}\n", s(&mini))),
        ("maml", format!("  path: {}\n  train_aug: true\n", s(&mini))),
    ] {
        let config = dir.path().join(format!("{method}.yml"));
        write(
            &config,
            &format!(
                "model:\n  name: conv4\nmeta_learning:\n  method: {method}\n  \
                 meta_batch_size: 1\n  num_iterations: 2\n  inner:\n    lr: 0.1\n\
                 data:\n  source: image_folder\n  image_size: 32\n  n_way: 2\n  k_shot: 2\n  \
                 n_query: 1\n{data}evaluation:\n  episodes: 3\n  eval_every: 2\n  \
                 val_episodes: 1\ntracking:\n  experiment_name: photos-{method}\n"
            ),
        );
        let train = melora(&["train", "--config", &s(&config), "--output", &s(&out)]);
        let stderr = text(&train.stderr);
        assert!(train.status.success(), "{stderr}");
        assert!(
            stderr.contains("image cache: 24 images of 6 classes as 3×36×36 u8"),
            "{stderr}"
        );
        let best = out.join(format!("photos-{method}/{method}-seed42/best"));
        let evaluate = melora(&["evaluate", "--checkpoint", &s(&best)]);
        assert!(evaluate.status.success(), "{}", text(&evaluate.stderr));
        let written = out.join(format!("photos-{method}/{method}-seed42/evaluation.json"));
        let evaluation: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(written).unwrap()).unwrap();
        let classes = evaluation.to_string();
        // Meta-test episodes come from the split's test classes only.
        assert!(
            !classes.contains("\"c0\"") && !classes.contains("\"n00\""),
            "{classes}"
        );
        // Adapt to JPEGs of two new classes (any size), predict a PNG and a JPEG.
        let support = dir.path().join(format!("support-{method}"));
        for (class, name) in [(4, "yellow"), (1, "green")] {
            for example in 0..2 {
                write_photo(
                    &support.join(name).join(format!("{example}.jpeg")),
                    class,
                    example + 10,
                    60,
                    50,
                );
            }
        }
        let query = dir.path().join(format!("query-{method}"));
        write_photo(&query.join("a.png"), 4, 20, 30, 30);
        write_photo(&query.join("b.jpg"), 1, 21, 30, 30);
        let adapt = melora(&[
            "adapt",
            "--checkpoint",
            &s(&best),
            "--support",
            &s(&support),
            "--query",
            &s(&query),
        ]);
        assert!(adapt.status.success(), "{}", text(&adapt.stderr));
        let lines: Vec<serde_json::Value> = text(&adapt.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "{}", text(&adapt.stdout));
        assert_eq!(lines[0]["item"], "a.png");
    }
}

/// ANIL (`meta_learning.inner.adapt: head`): MAML meta-trains Conv4 adapting only the
/// head in its inner loop, evaluates, and records the setting; Reptile with a
/// head-only inner loop is refused (it would never train the backbone), naming why.
#[test]
fn anil_meta_trains_with_a_head_only_inner_loop() {
    let dir = tempfile::tempdir().unwrap();
    let s = |p: &Path| p.display().to_string();
    let config = dir.path().join("anil.yml");
    let yaml = |method: &str| {
        format!(
            "model:\n  name: conv4\nmeta_learning:\n  method: {method}\n  meta_batch_size: 2\n  \
             num_iterations: 2\n  inner:\n    steps: 2\n    lr: 0.3\n    adapt: head\n\
             data:\n  synthetic_task: images\n  n_way: 2\n  k_shot: 2\n  n_query: 1\n\
             evaluation:\n  episodes: 2\n  eval_every: 2\n  val_episodes: 1\n\
             tracking:\n  experiment_name: anil\n"
        )
    };
    write(&config, &yaml("maml"));
    let out = dir.path().join("runs");
    let train = melora(&["train", "--config", &s(&config), "--output", &s(&out)]);
    assert!(train.status.success(), "{}", text(&train.stderr));
    let best = out.join("anil/maml-seed42/best");
    let evaluate = melora(&["evaluate", "--checkpoint", &s(&best)]);
    assert!(evaluate.status.success(), "{}", text(&evaluate.stderr));
    let recorded = std::fs::read_to_string(out.join("anil/maml-seed42/config.yml")).unwrap();
    assert!(recorded.contains("adapt: head"), "{recorded}");
    write(&config, &yaml("reptile"));
    let check = melora(&["config", "--config", &s(&config), "--check"]);
    let stderr = text(&check.stderr);
    assert!(!check.status.success(), "{stderr}");
    assert!(
        stderr.contains("meta_learning.method") && stderr.contains("ANIL"),
        "{stderr}"
    );
}

/// A data set too small to spare validation classes (`data.val_fraction: 0`, as
/// Fashion-MNIST's 6/4 split) meta-trains without validation, keeping the last
/// iterate as `best`; `full` and early stopping, which need validation, refuse it.
#[test]
fn training_without_validation_classes_keeps_the_last_iterate() {
    let dir = tempfile::tempdir().unwrap();
    let s = |p: &Path| p.display().to_string();
    let data = dir.path().join("photos");
    for class in 0..5 {
        for example in 0..3 {
            write_photo(
                &data.join(format!("k{class}/{example}.png")),
                class,
                example,
                20,
                20,
            );
        }
    }
    let config = dir.path().join("noval.yml");
    let yaml = |extra: &str| {
        format!(
            "model:\n  name: conv4\nmeta_learning:\n  method: protonet\n  meta_batch_size: 1\n  \
             num_iterations: 3\ndata:\n  source: image_folder\n  path: {}\n  image_size: 16\n  \
             n_way: 2\n  k_shot: 1\n  n_query: 1\n  train_fraction: 0.6\n  val_fraction: 0.0\n\
             evaluation:\n  episodes: 2\n  eval_every: 2\n{extra}tracking:\n  experiment_name: noval\n",
            s(&data)
        )
    };
    write(&config, &yaml(""));
    let out = dir.path().join("runs");
    let train = melora(&["train", "--config", &s(&config), "--output", &s(&out)]);
    assert!(train.status.success(), "{}", text(&train.stderr));
    let run = out.join("noval/protonet-seed42");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("best/state.json")).unwrap())
            .unwrap();
    assert_eq!(state["iteration"], 3, "{state}");
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert!(!metrics.contains("val/score"), "{metrics}");
    let evaluate = melora(&["evaluate", "--checkpoint", &s(&run.join("best"))]);
    assert!(evaluate.status.success(), "{}", text(&evaluate.stderr));
    let full = melora(&["full", "--config", &s(&config), "--output", &s(&out)]);
    let stderr = text(&full.stderr);
    assert!(
        !full.status.success() && stderr.contains("data.val_fraction"),
        "{stderr}"
    );
    write(&config, &yaml("  early_stopping_patience: 2\n"));
    let check = melora(&["config", "--config", &s(&config), "--check"]);
    let stderr = text(&check.stderr);
    assert!(stderr.contains("early_stopping_patience"), "{stderr}");
}
