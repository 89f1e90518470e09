//! `melora plan` and `melora profile`, run as a user would: on the shipped
//! quickstart configuration and on tiny inline ones, and with bad input, which must
//! give a one-line error and status 2, never a panic.

use std::path::Path;
use std::process::Output;

mod common;

use common::{melora, text};

/// The shipped quickstart, found from the crate root (tests run there).
fn quickstart() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("configs/quickstart.yml")
        .display()
        .to_string()
}

/// A tiny FOMAML run on the built-in tiny GPT-2 with checkpointing, so that
/// `profile` takes a second.
const TINY: &str = "seed: 3
model:
  name: tiny-gpt2
lora:
  rank: 2
meta_learning:
  method: fomaml
  meta_batch_size: 2
  inner:
    steps: 1
data:
  n_way: 3
  k_shot: 2
  n_query: 2
memory_optimization:
  checkpointing:
    enabled: true
";

fn write(dir: &Path, name: &str, yaml: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, yaml).unwrap();
    path.display().to_string()
}

/// Checks a failure: status 2, one line starting `error:` that contains `needle`,
/// and no panic.
fn assert_user_error(out: &Output, needle: &str) {
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.starts_with("error: ") && err.contains(needle), "{err}");
}

#[test]
fn plan_prints_the_breakdown_and_the_comparison() {
    let out = melora(&["plan", "--config", &quickstart()]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    for part in [
        "frozen weights",
        "trainable parameters",
        "gradients",
        "optimizer state",
        "activations",
        "temporary buffers",
        "**total (peak)**",
    ] {
        assert!(stdout.contains(part), "no `{part}` in:\n{stdout}");
    }
    // The configured method heads the breakdown; the comparison has one row per
    // default method.
    assert!(stdout.contains("Predicted peak of maml (recompute) on tiny-bert"));
    for method in [
        "| maml (full graph) |",
        "| fomaml |",
        "| reptile |",
        "| melora (gauss newton) |",
    ] {
        assert!(stdout.contains(method), "no row `{method}` in:\n{stdout}");
    }
}

#[test]
fn plan_takes_methods_a_budget_and_json() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(dir.path(), "tiny.yml", TINY);
    let out = melora(&[
        "plan",
        "--config",
        &config,
        "--methods",
        "maml,finetune,melora-block_diagonal",
        "--memory-budget",
        "1GiB",
    ]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        stdout.contains("checkpointing the inputs of layers 0, 1"),
        "{stdout}"
    );
    assert!(
        stdout.contains("This configuration fits in 1.00 GiB"),
        "{stdout}"
    );
    for row in [
        "| maml (recompute) |",
        "| finetune |",
        "| melora (block diagonal) |",
    ] {
        assert!(stdout.contains(row), "no row `{row}` in:\n{stdout}");
    }
    assert!(stdout.contains(" yes |"), "{stdout}");

    let out = melora(&["plan", "--config", &config, "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let peak = json["plan"]["peak_bytes"].as_u64().unwrap();
    let parts = &json["plan"]["breakdown"];
    let sum: u64 = [
        "frozen_weights",
        "trainable",
        "gradients",
        "optimizer_state",
        "activations",
        "data",
        "temporaries",
    ]
    .iter()
    .map(|k| parts[k].as_u64().unwrap())
    .sum();
    assert!(sum <= peak && peak > 0, "{json}");
    assert_eq!(json["plan"]["variant"], "fomaml");
    assert_eq!(json["plan"]["checkpoint_layers"], serde_json::json!([0, 1]));
    assert_eq!(json["comparison"].as_array().unwrap().len(), 4);
}

/// On text the plan is measured on the heaviest task of the whole run; where the
/// data cannot be read it says so and assumes every sequence at `max_length`,
/// which never predicts less.
#[test]
fn plan_measures_text_on_the_runs_heaviest_task() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(dir.path(), "tiny.yml", TINY);
    let out = melora(&["plan", "--config", &config, "--method", "fomaml", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let plan = &json["plan"];
    // The default 1000 meta-iterations of two tasks.
    assert_eq!(plan["heaviest_task"]["tasks_read"], 2000, "{json}");
    assert!(plan["data_note"].is_null(), "{json}");
    let observed = plan["peak_bytes"].as_u64().unwrap();

    let missing = dir.path().join("missing.jsonl");
    let unreadable = write(
        dir.path(),
        "missing.yml",
        &TINY.replace(
            "data:\n",
            &format!("data:\n  source: jsonl\n  path: {}\n", missing.display()),
        ),
    );
    let out = melora(&[
        "plan",
        "--config",
        &unreadable,
        "--method",
        "fomaml",
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let plan = &json["plan"];
    assert!(plan["heaviest_task"].is_null(), "{json}");
    let note = plan["data_note"].as_str().unwrap();
    assert!(
        note.contains("could not be read") && note.contains("missing.jsonl"),
        "{note}"
    );
    assert!(plan["peak_bytes"].as_u64().unwrap() >= observed, "{json}");
    let out = melora(&["plan", "--config", &unreadable, "--method", "fomaml"]);
    assert!(text(&out.stdout).contains("could not be read"));
}

/// A budget that nothing fits: the plan is still printed, with the smallest feasible
/// budget, and the status is 2 (as `train` exits), also with `--json`.
#[test]
fn plan_exits_with_status_2_when_nothing_fits_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(dir.path(), "tiny.yml", TINY);
    let out = melora(&["plan", "--config", &config, "--memory-budget", "1KiB"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("nothing fits"), "{stdout}");
    assert!(stdout.contains("| **total (peak)** |"), "{stdout}");
    let stderr = text(&out.stderr);
    assert!(
        stderr.starts_with("error: nothing fits") && stderr.contains("smallest feasible budget"),
        "{stderr}"
    );
    let out = melora(&[
        "plan",
        "--config",
        &config,
        "--memory-budget",
        "1KiB",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["fits"], false);
    let out = melora(&[
        "plan",
        "--config",
        &config,
        "--memory-budget",
        "1GiB",
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["fits"], true);
}

/// `--memory-budget auto` is the memory free where the run keeps its tensors: on
/// the CPU what the kernel reports available, at most the machine's memory.
#[test]
fn plan_takes_the_free_memory_as_an_auto_budget() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(dir.path(), "tiny.yml", TINY);
    let out = melora(&[
        "plan",
        "--config",
        &config,
        "--memory-budget",
        "auto",
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let budget = json["memory_budget_bytes"].as_u64().unwrap();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let total_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    assert!(budget > 0 && budget <= total_kib * 1024, "{json}");
    assert_eq!(json["fits"], true, "{json}");
    assert_eq!(json["plan"]["device"], "cpu", "{json}");
}

/// Planning on a GPU measures the GPU: a CPU-only build says how to get a CUDA
/// build (a CUDA build without a GPU, that the device cannot be opened).
#[test]
fn plan_on_a_gpu_needs_a_device_it_can_open() {
    let quick = quickstart();
    let out = melora(&["plan", "--config", &quick, "--device", "cuda"]);
    assert_user_error(&out, "--device cpu");
}

#[test]
fn plan_refuses_bad_input_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.yml").display().to_string();
    assert_user_error(&melora(&["plan", "--config", &missing]), "missing.yml");
    let quick = quickstart();
    assert_user_error(
        &melora(&["plan", "--config", &quick, "--methods", "matchingnet"]),
        "unknown method `matchingnet`",
    );
    assert_user_error(
        &melora(&["plan", "--config", &quick, "--memory-budget", "lots"]),
        "--memory-budget",
    );
    // Configurations training would refuse, refused before anything runs.
    let cases = [
        (
            "mlp-checkpointed.yml",
            "model:\n  name: mlp\ndata:\n  synthetic_task: sinusoid\n\
             memory_optimization:\n  checkpointing:\n    enabled: true\n",
            "this model has neither",
        ),
        (
            "conv4-no-such-stage.yml",
            "model:\n  name: conv4\ndata:\n  synthetic_task: images\n\
             memory_optimization:\n  checkpointing:\n    enabled: true\n    layers: [4]\n",
            "layer 4",
        ),
        (
            "no-such-layer.yml",
            "model:\n  name: tiny-bert\nmemory_optimization:\n  checkpointing:\n    \
             enabled: true\n    layers: [7]\n",
            "names layer 7",
        ),
        (
            "sinusoid-bert.yml",
            "model:\n  name: tiny-bert\ndata:\n  synthetic_task: sinusoid\n",
            "use model.name: mlp",
        ),
        (
            "too-long.yml",
            "model:\n  name: tiny-bert\n  max_length: 100000000000\ndata:\n  source: jsonl\n  \
             path: texts.jsonl\n",
            "more than the model's 128 positions",
        ),
        (
            "too-large.yml",
            "model:\n  name: tiny-t5\n  max_length: 100000000000\ndata:\n  source: jsonl\n  \
             path: texts.jsonl\n",
            "more memory than this machine has",
        ),
        (
            "no-model.yml",
            "model:\n  path: /nonexistent/melora-model\n",
            "config.json",
        ),
        (
            "bad-key.yml",
            "meta_learning:\n  inner:\n    steps: 0\n",
            "inner.steps",
        ),
    ];
    for (name, yaml, needle) in cases {
        let path = write(dir.path(), name, yaml);
        assert_user_error(&melora(&["plan", "--config", &path]), needle);
    }
}

/// `profile --json` of `config`: (predicted, measured) peak heap bytes.
fn profile_peaks(config: &str) -> (f64, f64, serde_json::Value) {
    let out = melora(&["profile", "--config", config, "--iterations", "2", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let predicted = json["plan"]["peak_bytes"].as_f64().unwrap();
    let measured = json["measured_peak_bytes"].as_f64().unwrap();
    (predicted, measured, json)
}

#[test]
fn profile_measures_beside_the_prediction() {
    let dir = tempfile::tempdir().unwrap();
    // Sequences of one length (the generator's shortest is 8 tokens), the planner's
    // assumption: the prediction is within 15%.
    let fixed = write(
        dir.path(),
        "fixed.yml",
        &TINY.replace(
            "  name: tiny-gpt2\n",
            "  name: tiny-gpt2\n  max_length: 8\n",
        ),
    );
    let (predicted, measured, json) = profile_peaks(&fixed);
    let error = (predicted - measured).abs() / measured;
    assert!(error < 0.15, "predicted {predicted}, measured {measured}");
    assert!(json["peak_rss_bytes"].as_u64().unwrap() > 0);
    assert_eq!(json["seconds"].as_array().unwrap().len(), 2);
    assert!(json["median_seconds"].as_f64().unwrap() > 0.0);
    // Sequences of 8 to 32 tokens: the planner measures on the heaviest task the
    // profile reads (packing computes the real tokens only, so that is where the run
    // peaks), also within 15%; sizing every sequence at the longest instead is an
    // upper bound, looser here.
    let config = write(dir.path(), "tiny.yml", TINY);
    let (predicted, measured, json) = profile_peaks(&config);
    let error = (predicted - measured).abs() / measured;
    assert!(error < 0.15, "predicted {predicted}, measured {measured}");
    let heaviest = &json["plan"]["heaviest_task"];
    assert_eq!(heaviest["split"], "train", "{json}");
    // Two meta-iterations of two tasks.
    assert_eq!(heaviest["tasks_read"], 4, "{json}");
    assert!(
        heaviest["longest_sequence"].as_u64().unwrap() <= 32,
        "{json}"
    );

    // The table, here for a baseline (test episodes, not meta-iterations).
    let out = melora(&[
        "profile",
        "--config",
        &config,
        "--method",
        "finetune",
        "--iterations",
        "1",
    ]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    for row in [
        "| peak heap (counting allocator) |",
        "| peak RSS of the process |",
        "| seconds per test episode (median) |",
    ] {
        assert!(stdout.contains(row), "no row `{row}` in:\n{stdout}");
    }
}

#[test]
fn profile_refuses_bad_input_with_one_line() {
    let quick = quickstart();
    assert_user_error(
        &melora(&["profile", "--config", &quick, "--iterations", "0"]),
        "--iterations must be at least 1",
    );
    assert_user_error(
        &melora(&["profile", "--config", &quick, "--iterations", "many"]),
        "many",
    );
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "conv4.yml",
        "model:\n  name: conv4\ndata:\n  synthetic_task: images\n  image_size: 12\n",
    );
    assert_user_error(&melora(&["profile", "--config", &path]), "at least 16");
}

/// With a budget, `profile` measures the configuration `train` would run: below the
/// plain prediction it chooses a more frugal one; below every configuration it
/// refuses, status 2.
#[test]
fn profile_follows_a_memory_budget() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(dir.path(), "tiny.yml", TINY);
    let planned = melora(&["plan", "--config", &config, "--method", "maml", "--json"]);
    assert!(planned.status.success(), "{}", text(&planned.stderr));
    let json: serde_json::Value = serde_json::from_slice(&planned.stdout).unwrap();
    let peak = json["plan"]["peak_bytes"].as_u64().unwrap();
    let budget = (peak * 9 / 10).to_string();
    let out = melora(&[
        "profile",
        "--config",
        &config,
        "--method",
        "maml",
        "--iterations",
        "1",
        "--json",
        "--memory-budget",
        &budget,
    ]);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("too large") && stderr.contains("chosen: "),
        "{stderr}"
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let predicted = json["plan"]["peak_bytes"].as_u64().unwrap();
    assert!(
        predicted <= peak * 9 / 10,
        "profiled the plain configuration"
    );

    assert_user_error(
        &melora(&["profile", "--config", &config, "--memory-budget", "1KiB"]),
        "smallest predicted peak is",
    );
}
