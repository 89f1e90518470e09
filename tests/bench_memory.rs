//! `melora bench memory`, run as a user would, on a subset of the reduced grid: the
//! schema of `memory.json` (one row per combination, measured figures), the Markdown
//! summary and the plot; points the configuration refuses are skipped with a note, and
//! a point that fails records its error without stopping the others.

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::Value;

mod common;

use common::{melora, text};

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

const ROW_FIELDS: [&str; 10] = [
    "method",
    "mode",
    "k",
    "checkpointing",
    "precision",
    "peak_bytes",
    "rss_bytes",
    "predicted_bytes",
    "seconds_per_iter",
    "error",
];

#[test]
fn quick_subset_writes_the_schema_markdown_and_plot() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("results");
    let output = melora(&[
        "bench",
        "memory",
        "--quick",
        "--methods",
        "maml-full_graph,maml,fomaml",
        "--k",
        "1,2",
        "--output",
        out.to_str().unwrap(),
    ]);
    let stderr = text(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains("[12/12] fomaml, K=2, checkpointing on, f32: peak "),
        "{stderr}"
    );

    let json = read_json(&out.join("memory.json"));
    for key in ["model", "machine", "date", "rows", "skipped", "summary"] {
        assert!(json.get(key).is_some(), "no `{key}` in {json}");
    }
    assert_eq!(json["model"]["name"], "tiny-bert");
    assert_eq!(json["model"]["sequence_length"], 32);
    assert!(json["date"].as_str().unwrap().ends_with('Z'));
    assert!(json["machine"]["logical_cpus"].as_u64().unwrap() >= 1);

    let rows = json["rows"].as_array().unwrap();
    let mut seen = BTreeSet::new();
    for row in rows {
        for field in ROW_FIELDS {
            assert!(row.get(field).is_some(), "no `{field}` in {row}");
        }
        assert_eq!(row["error"], Value::Null, "{row}");
        assert!(row["peak_bytes"].as_u64().unwrap() > 0, "{row}");
        assert!(row["rss_bytes"].as_u64().unwrap() > 0, "{row}");
        assert!(row["seconds_per_iter"].as_f64().unwrap() > 0.0, "{row}");
        // The planner models f32 with and without checkpointing.
        assert!(row["predicted_bytes"].as_u64().unwrap() > 0, "{row}");
        assert_eq!(row["precision"], "f32");
        assert!(row["checkpointing"].is_boolean());
        // The whole process's peak includes the model and what the step added to it.
        assert!(
            row["peak_bytes"].as_u64() > row["baseline_bytes"].as_u64(),
            "{row}"
        );
        let mode = row["mode"].as_str().map(str::to_string);
        match row["method"].as_str().unwrap() {
            "maml" => assert!(matches!(mode.as_deref(), Some("full_graph" | "recompute"))),
            "fomaml" => assert_eq!(mode, None),
            other => panic!("unexpected method {other}"),
        }
        let key = (
            row["method"].as_str().unwrap().to_string(),
            mode,
            row["k"].as_u64().unwrap(),
            row["checkpointing"].as_bool().unwrap(),
        );
        assert!(seen.insert(key), "two rows for one combination: {row}");
    }
    assert_eq!(rows.len(), 3 * 2 * 2, "one row per combination");
    assert_eq!(seen.len(), 12);

    // Full-graph MAML keeps every inner step's graph; recompute-MAML does not.
    let peak = |mode: &str, k: u64| {
        rows.iter()
            .find(|r| r["mode"] == mode && r["k"] == k && r["checkpointing"] == false)
            .unwrap()["peak_bytes"]
            .as_u64()
            .unwrap()
    };
    assert!(peak("full_graph", 2) > peak("recompute", 2));
    let acceptance = json["summary"]["acceptance"].as_array().unwrap();
    assert_eq!(acceptance.len(), 2, "checkpointing off and on");
    assert_eq!(acceptance[0]["k"], 2);

    let md = std::fs::read_to_string(out.join("memory.md")).unwrap();
    assert!(
        md.contains("| method | mode | K | checkpointing | precision |"),
        "{md}"
    );
    assert!(md.contains("## Against full-graph MAML"), "{md}");
    assert!(md.contains("recompute-MAML at K=2 uses"), "{md}");
    assert!(text(&output.stdout).contains("## Acceptance"));
    for png in ["memory.png", "memory-f32-checkpointing.png"] {
        let bytes = std::fs::read(out.join(png)).unwrap();
        assert!(bytes.starts_with(b"\x89PNG"), "{png} is not a PNG");
    }
}

#[test]
fn refused_points_are_skipped_and_failed_points_recorded() {
    let dir = tempfile::tempdir().unwrap();
    // f16 with checkpointing is refused by the configuration: skipped, nothing run.
    let out = dir.path().join("skipped");
    let output = melora(&[
        "bench",
        "memory",
        "--quick",
        "--methods",
        "fomaml",
        "--k",
        "1",
        "--precision",
        "f16",
        "--checkpointing",
        "on",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let json = read_json(&out.join("memory.json"));
    assert_eq!(json["rows"].as_array().unwrap().len(), 0);
    let skipped = &json["skipped"][0];
    assert_eq!(skipped["precision"], "f16");
    assert!(
        skipped["reason"]
            .as_str()
            .unwrap()
            .contains("checkpointing"),
        "{skipped}"
    );

    // A model folder of an unsupported family: the point fails with the loader's
    // message, the results are still written, and the status is 1.
    let model = dir.path().join("llama");
    std::fs::create_dir_all(&model).unwrap();
    std::fs::write(model.join("config.json"), r#"{"model_type": "llama"}"#).unwrap();
    let out = dir.path().join("failed");
    let output = melora(&[
        "bench",
        "memory",
        "--quick",
        "--model-dir",
        model.to_str().unwrap(),
        "--methods",
        "reptile",
        "--k",
        "1",
        "--checkpointing",
        "off",
        "--output",
        out.to_str().unwrap(),
    ]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("1 of 1 measured points failed"), "{stderr}");
    let json = read_json(&out.join("memory.json"));
    let row = &json["rows"][0];
    assert!(row["error"].as_str().unwrap().contains("llama"), "{row}");
    assert_eq!(row["peak_bytes"], Value::Null);
    assert_eq!(json["model"]["family"], "llama");
}

#[test]
fn bad_arguments_exit_with_status_2() {
    for args in [
        &["bench", "memory", "--quick", "--k", "0"][..],
        &["bench", "memory", "--quick", "--iterations", "0"],
        &["bench", "memory", "--quick", "--methods", "maml-halfway"],
        &["bench", "memory", "--model-dir", "/nonexistent/model"],
        &["bench", "memory", "--model", "conv4"],
    ] {
        let output = melora(args);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}",
            text(&output.stderr)
        );
    }
}

#[test]
fn resume_measures_a_grid_in_pieces() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pieces");
    let piece = |method: &str, extra: &[&str]| {
        let mut args = vec![
            "bench",
            "memory",
            "--quick",
            "--methods",
            method,
            "--k",
            "1",
            "--checkpointing",
            "off",
            "--output",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        if !extra.contains(&"--iterations") {
            args.extend_from_slice(&["--iterations", "1"]);
        }
        melora(&args)
    };
    let first = piece("reptile", &[]);
    assert!(first.status.success(), "{}", text(&first.stderr));
    let before = read_json(&out.join("memory.json"));

    let second = piece("fomaml,reptile", &["--resume"]);
    let stderr = text(&second.stderr);
    assert!(second.status.success(), "{stderr}");
    assert!(
        stderr.contains("reptile, K=1, checkpointing off, f32: measured before, kept"),
        "{stderr}"
    );
    let json = read_json(&out.join("memory.json"));
    let rows = json["rows"].as_array().unwrap();
    let methods: Vec<&str> = rows.iter().map(|r| r["method"].as_str().unwrap()).collect();
    assert_eq!(methods, ["fomaml", "reptile"], "grid order");
    assert_eq!(rows[1], before["rows"][0], "the earlier row as it was");
    assert_eq!(json["date"], before["date"]);
    assert_eq!(json["points"], 2);
    assert!(std::fs::read_to_string(out.join("memory.md"))
        .unwrap()
        .contains("| fomaml |"));

    // Figures that would not compare are refused, and the file is left alone.
    let other = piece("fomaml", &["--resume", "--iterations", "2"]);
    let stderr = text(&other.stderr);
    assert_eq!(other.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--resume: cannot add to") && stderr.contains("--iterations 1"),
        "{stderr}"
    );
    assert_eq!(read_json(&out.join("memory.json")), json);

    std::fs::write(out.join("memory.json"), "{ not json").unwrap();
    let corrupt = piece("fomaml", &["--resume"]);
    let stderr = text(&corrupt.stderr);
    assert_eq!(corrupt.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("memory.json"), "{stderr}");
}

/// `bench fsct-memory` on Conv4 at 28 px (the scenario's task shape, generated RGB
/// image folder): the plain, checkpointed and bf16 rows are planned and measured,
/// the planner within 15%, checkpointing below plain, bf16 activations under 70% of
/// it; a setting melora refuses is a row
/// that says why; a row over `--measure-up-to` is planned only; bad flags are
/// usage errors.
#[test]
fn fsct_memory_scenario_plans_measures_and_reports_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("results");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "bench",
            "fsct-memory",
            "--backbones",
            "conv4",
            "--sizes",
            "28",
            "--output",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        melora(&args)
    };
    let output = run(&["--settings", "plain,checkpointing,bf16,micro-batches"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let json = read_json(&out.join("fsct-memory.json"));
    let rows = json["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 4);
    let measured = |row: &Value| row["measured_bytes"].as_f64().unwrap();
    for row in &rows[..3] {
        let error = (row["predicted_bytes"].as_f64().unwrap() - measured(row)) / measured(row);
        assert!(error.abs() <= 0.15, "{row}");
        assert!(row["dataset_bytes"].as_u64().unwrap() > 0, "{row}");
    }
    assert!(measured(&rows[1]) < measured(&rows[0]), "{rows:?}");
    // bf16 activations: measured 156 against 287 MiB.
    assert!(measured(&rows[2]) < 0.7 * measured(&rows[0]), "{rows:?}");
    let refused = rows[3]["refused"].as_str().unwrap();
    assert!(refused.contains("micro_batch"), "{refused}");
    let md = std::fs::read_to_string(out.join("fsct-memory.md")).unwrap();
    assert!(md.contains("| conv4 | 28×28 | checkpointing |"), "{md}");

    let output = run(&["--settings", "plain", "--measure-up-to", "1MiB"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let json = read_json(&out.join("fsct-memory.json"));
    let row = &json["rows"][0];
    assert!(row["measured_bytes"].is_null(), "{row}");
    assert!(row["not_measured"]
        .as_str()
        .unwrap()
        .contains("predicted above"));

    for bad in [
        &["--settings", "amp"][..],
        &["--backbones", "bert"][..],
        &["--measure-up-to", "lots"][..],
    ] {
        let output = run(bad);
        assert_eq!(output.status.code(), Some(2), "{bad:?}");
        assert!(!text(&output.stderr).contains("panicked"));
    }
}
