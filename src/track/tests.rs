//! Writes runs and parses every output back with independent readers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::tensorboard::masked_crc32c;
use super::*;

const CONFIG: &str = "seed: 7\nlora:\n  rank: 4\n";

fn both() -> TrackerOptions {
    TrackerOptions {
        tensorboard: true,
        mlflow: true,
        resume: None,
    }
}

fn params() -> Vec<(String, String)> {
    vec![
        ("lora.rank".to_owned(), "4".to_owned()),
        ("meta_learning.method".to_owned(), "melora".to_owned()),
    ]
}

/// The steps logged by [`write_run`]: values chosen to need every bit of an `f64`,
/// plus a NaN and one finite `f64` that is infinite as `f32`.
fn logged() -> Vec<(u64, Vec<(&'static str, f64)>)> {
    vec![
        (0, vec![("loss", 0.1 + 0.2), ("accuracy", 1.0 / 3.0)]),
        (
            5,
            vec![("loss", std::f64::consts::PI), ("accuracy", f64::NAN)],
        ),
        (10, vec![("loss", 1e300), ("accuracy", -2.5e-8)]),
    ]
}

fn write_run(output: &Path, experiment: &str, run: &str, end: RunEnd) -> PathBuf {
    let mut tracker = RunTracker::create(output, experiment, run, CONFIG, &params(), both())
        .expect("create tracker");
    assert_eq!(tracker.dir(), output.join(experiment).join(run));
    for (step, metrics) in logged() {
        tracker.log(step, &metrics).expect("log");
    }
    let dir = tracker.dir().to_owned();
    tracker.finish(end).expect("finish");
    dir
}

#[test]
fn metrics_jsonl_round_trips_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = write_run(tmp.path(), "exp", "run-1", RunEnd::Finished);
    assert_eq!(
        std::fs::read_to_string(dir.join("config.yml")).unwrap(),
        CONFIG
    );

    let rows = read_metrics(&dir.join("metrics.jsonl")).unwrap();
    let expected = logged();
    assert_eq!(rows.len(), expected.len());
    for (row, (want_step, want)) in rows.iter().zip(&expected) {
        assert_eq!(row.step, *want_step);
        assert!(row.time > 1.0e9, "{}", row.time);
        assert_eq!(row.values.len(), want.len());
        for (name, value) in want {
            let got = row.values[*name];
            if value.is_nan() {
                assert!(got.is_nan(), "{name} at {want_step}");
            } else {
                assert_eq!(got.to_bits(), value.to_bits(), "{name} at {want_step}");
            }
        }
    }
    assert!(rows.windows(2).all(|w| w[0].time <= w[1].time));

    // Each line is one flat JSON object, `step` and `time` first, metrics in the
    // order logged, NaN stored as null.
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let second = text.lines().nth(1).unwrap();
    assert!(second.starts_with("{\"step\":5,\"time\":"), "{second}");
    assert!(
        second.ends_with(",\"loss\":3.141592653589793,\"accuracy\":null}"),
        "{second}"
    );
    let value: serde_json::Value = serde_json::from_str(second).unwrap();
    assert!(value["accuracy"].is_null());
    assert_eq!(value["step"], 5);
}

/// Reads a protobuf varint at `*pos`.
fn read_varint(data: &[u8], pos: &mut usize) -> u64 {
    let mut value = 0u64;
    let mut shift = 0;
    loop {
        let byte = data[*pos];
        *pos += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return value;
        }
        shift += 7;
    }
}

/// One protobuf field: number and raw payload (varint value or bytes).
enum Field<'a> {
    Varint(u64),
    Fixed64([u8; 8]),
    Fixed32([u8; 4]),
    Bytes(&'a [u8]),
}

fn fields(data: &[u8]) -> Vec<(u64, Field<'_>)> {
    let mut pos = 0;
    let mut out = Vec::new();
    while pos < data.len() {
        let key = read_varint(data, &mut pos);
        let field = match key & 7 {
            0 => Field::Varint(read_varint(data, &mut pos)),
            1 => {
                pos += 8;
                Field::Fixed64(data[pos - 8..pos].try_into().unwrap())
            }
            2 => {
                let len = read_varint(data, &mut pos) as usize;
                pos += len;
                Field::Bytes(&data[pos - len..pos])
            }
            5 => {
                pos += 4;
                Field::Fixed32(data[pos - 4..pos].try_into().unwrap())
            }
            wire => panic!("unexpected wire type {wire}"),
        };
        out.push((key >> 3, field));
    }
    assert_eq!(pos, data.len(), "message overruns its bytes");
    out
}

#[derive(Debug, Default)]
struct Event {
    wall_time: f64,
    step: i64,
    file_version: Option<String>,
    values: Vec<(String, f32)>,
}

fn decode_event(data: &[u8]) -> Event {
    let mut event = Event::default();
    for (number, field) in fields(data) {
        match (number, field) {
            (1, Field::Fixed64(b)) => event.wall_time = f64::from_le_bytes(b),
            (2, Field::Varint(v)) => event.step = v as i64,
            (3, Field::Bytes(b)) => {
                event.file_version = Some(String::from_utf8(b.to_vec()).unwrap())
            }
            (5, Field::Bytes(summary)) => {
                for (number, value) in fields(summary) {
                    let (1, Field::Bytes(value)) = (number, value) else {
                        panic!("summary field {number} is not a value message");
                    };
                    let (mut tag, mut simple) = (None, None);
                    for (number, field) in fields(value) {
                        match (number, field) {
                            (1, Field::Bytes(b)) => {
                                tag = Some(String::from_utf8(b.to_vec()).unwrap())
                            }
                            (2, Field::Fixed32(b)) => simple = Some(f32::from_le_bytes(b)),
                            (n, _) => panic!("unexpected value field {n}"),
                        }
                    }
                    event.values.push((tag.unwrap(), simple.unwrap()));
                }
            }
            (n, _) => panic!("unexpected event field {n}"),
        }
    }
    event
}

/// Reads every record of a TFRecord file, checking both CRCs of each.
fn read_records(path: &Path) -> Vec<Vec<u8>> {
    let bytes = std::fs::read(path).unwrap();
    let mut pos = 0;
    let mut records = Vec::new();
    while pos < bytes.len() {
        let len_bytes = &bytes[pos..pos + 8];
        let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
        let len_crc = u32::from_le_bytes(bytes[pos + 8..pos + 12].try_into().unwrap());
        assert_eq!(len_crc, masked_crc32c(len_bytes), "length CRC");
        let data = &bytes[pos + 12..pos + 12 + len];
        let data_crc =
            u32::from_le_bytes(bytes[pos + 12 + len..pos + 16 + len].try_into().unwrap());
        assert_eq!(data_crc, masked_crc32c(data), "data CRC");
        records.push(data.to_vec());
        pos += 16 + len;
    }
    records
}

fn event_file(dir: &Path) -> PathBuf {
    let files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("events.out.tfevents.")
        })
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    // events.out.tfevents.<unix secs>.<host>
    let name = files[0].file_name().unwrap().to_string_lossy().into_owned();
    let rest = name.strip_prefix("events.out.tfevents.").unwrap();
    let (secs, host) = rest.split_once('.').unwrap();
    assert!(secs.parse::<u64>().unwrap() > 1_000_000_000, "{name}");
    assert!(!host.is_empty(), "{name}");
    files[0].clone()
}

#[test]
fn tensorboard_event_file_decodes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = write_run(tmp.path(), "exp", "run-1", RunEnd::Finished);
    let events: Vec<Event> = read_records(&event_file(&dir))
        .iter()
        .map(|r| decode_event(r))
        .collect();

    assert_eq!(events[0].file_version.as_deref(), Some("brain.Event:2"));
    assert!(events[0].values.is_empty());
    assert!(events[0].wall_time > 1.0e9);

    let scalars = &events[1..];
    assert_eq!(scalars.len(), logged().len());
    for (event, (step, metrics)) in scalars.iter().zip(logged()) {
        assert_eq!(event.step, step as i64);
        assert!(event.file_version.is_none());
        assert!(event.wall_time >= events[0].wall_time);
        let want: Vec<(String, f32)> = metrics
            .iter()
            .map(|&(name, value)| (name.to_owned(), value as f32))
            .filter(|(_, value)| value.is_finite())
            .collect();
        assert_eq!(event.values, want, "step {step}");
    }
    // NaN (step 5) and 1e300 (infinite as f32, step 10) are left out.
    assert_eq!(scalars[1].values.len(), 1);
    assert_eq!(scalars[2].values, [("accuracy".to_owned(), -2.5e-8f32)]);
}

fn yaml(path: &Path) -> serde_norway::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_norway::from_str(&text).unwrap()
}

fn run_dirs(experiment_dir: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(experiment_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    dirs
}

#[test]
fn mlflow_file_store_layout() {
    let tmp = tempfile::tempdir().unwrap();
    write_run(tmp.path(), "exp", "run-1", RunEnd::Finished);
    let mlruns = tmp.path().join("mlruns");

    // A new store starts like MLflow's own: the Default experiment 0 and .trash.
    let default = yaml(&mlruns.join("0/meta.yaml"));
    assert_eq!(default["experiment_id"].as_str(), Some("0"));
    assert_eq!(default["name"].as_str(), Some("Default"));
    assert!(mlruns.join(".trash").is_dir());

    let experiment = yaml(&mlruns.join("1/meta.yaml"));
    assert_eq!(experiment["experiment_id"].as_str(), Some("1"));
    assert_eq!(experiment["name"].as_str(), Some("exp"));
    assert_eq!(experiment["lifecycle_stage"].as_str(), Some("active"));
    let location = experiment["artifact_location"].as_str().unwrap();
    assert!(
        location.starts_with("file:///") && location.ends_with("/mlruns/1"),
        "{location}"
    );
    assert!(experiment["creation_time"].as_u64().is_some());
    assert!(experiment["last_update_time"].as_u64().is_some());

    let runs = run_dirs(&mlruns.join("1"));
    assert_eq!(runs.len(), 1);
    let run = &runs[0];
    let run_id = run.file_name().unwrap().to_string_lossy().into_owned();
    assert_eq!(run_id.len(), 32);
    let meta = yaml(&run.join("meta.yaml"));
    assert_eq!(meta["run_id"].as_str(), Some(run_id.as_str()));
    assert_eq!(meta["run_uuid"].as_str(), Some(run_id.as_str()));
    assert_eq!(meta["run_name"].as_str(), Some("run-1"));
    assert_eq!(meta["experiment_id"].as_str(), Some("1"));
    assert_eq!(meta["status"].as_u64(), Some(3));
    assert_eq!(meta["source_type"].as_u64(), Some(4));
    assert_eq!(meta["lifecycle_stage"].as_str(), Some("active"));
    assert_eq!(meta["entry_point_name"].as_str(), Some(""));
    assert_eq!(meta["source_name"].as_str(), Some(""));
    assert_eq!(meta["source_version"].as_str(), Some(""));
    assert!(meta["tags"].as_sequence().unwrap().is_empty());
    assert!(meta["deleted_time"].is_null());
    assert!(meta["user_id"].as_str().is_some());
    let start = meta["start_time"].as_u64().unwrap();
    let end = meta["end_time"].as_u64().unwrap();
    assert!(end >= start);
    assert!(meta["artifact_uri"]
        .as_str()
        .unwrap()
        .ends_with(&format!("/mlruns/1/{run_id}/artifacts")));

    for (key, value) in params() {
        assert_eq!(
            std::fs::read_to_string(run.join("params").join(key)).unwrap(),
            value
        );
    }
    assert_eq!(
        std::fs::read_to_string(run.join("tags/mlflow.runName")).unwrap(),
        "run-1"
    );
    assert_eq!(
        std::fs::read_to_string(run.join("tags/mlflow.source.type")).unwrap(),
        "LOCAL"
    );
    assert_eq!(
        std::fs::read_to_string(run.join("artifacts/config.yml")).unwrap(),
        CONFIG
    );

    let mut want: BTreeMap<&str, Vec<(f64, u64)>> = BTreeMap::new();
    for (step, metrics) in logged() {
        for (name, value) in metrics {
            if value.is_finite() {
                want.entry(name).or_default().push((value, step));
            }
        }
    }
    for (name, points) in want {
        let text = std::fs::read_to_string(run.join("metrics").join(name)).unwrap();
        let got: Vec<(f64, u64)> = text
            .lines()
            .map(|line| {
                let parts: Vec<&str> = line.split(' ').collect();
                assert_eq!(parts.len(), 3, "{line}");
                let timestamp: u64 = parts[0].parse().unwrap();
                assert!(timestamp >= start && timestamp <= end, "{line}");
                (parts[1].parse().unwrap(), parts[2].parse().unwrap())
            })
            .collect();
        // Exact: the text is the shortest representation of the same f64.
        assert_eq!(got, points, "{name}");
    }
}

#[test]
fn mlflow_reuses_experiments_by_name_and_records_how_runs_ended() {
    let tmp = tempfile::tempdir().unwrap();
    write_run(tmp.path(), "exp", "a", RunEnd::Finished);
    write_run(tmp.path(), "other", "b", RunEnd::Finished);
    write_run(tmp.path(), "exp", "c", RunEnd::Failed);
    write_run(tmp.path(), "exp", "d", RunEnd::Killed);
    let mlruns = tmp.path().join("mlruns");
    assert_eq!(
        yaml(&mlruns.join("2/meta.yaml"))["name"].as_str(),
        Some("other")
    );
    let runs = run_dirs(&mlruns.join("1"));
    assert_eq!(runs.len(), 3);
    let statuses: BTreeMap<String, u64> = runs
        .iter()
        .map(|run| {
            let meta = yaml(&run.join("meta.yaml"));
            (
                meta["run_name"].as_str().unwrap().to_owned(),
                meta["status"].as_u64().unwrap(),
            )
        })
        .collect();
    // MLflow's RunStatus: FINISHED, FAILED, KILLED.
    assert_eq!(statuses["a"], 3);
    assert_eq!(statuses["c"], 4);
    assert_eq!(statuses["d"], 5);
}

#[test]
fn a_running_run_is_marked_running_and_files_are_readable() {
    let tmp = tempfile::tempdir().unwrap();
    let mut tracker = RunTracker::create(tmp.path(), "exp", "live", CONFIG, &[], both()).unwrap();
    tracker.log(1, &[("loss", 2.0)]).unwrap();
    // Lines are written through at once, so a run can be watched while it goes.
    let rows = read_metrics(&tracker.dir().join("metrics.jsonl")).unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].step, 1);
    assert_eq!(rows[0].values, BTreeMap::from([("loss".to_owned(), 2.0)]));
    let run = run_dirs(&tmp.path().join("mlruns/1")).remove(0);
    let meta = yaml(&run.join("meta.yaml"));
    assert_eq!(meta["status"].as_u64(), Some(1));
    assert!(meta["end_time"].is_null());
    tracker.finish(RunEnd::Finished).unwrap();
}

#[test]
fn jsonl_only_writes_no_other_outputs() {
    let tmp = tempfile::tempdir().unwrap();
    let mut tracker = RunTracker::create(
        tmp.path(),
        "exp",
        "plain",
        CONFIG,
        &params(),
        TrackerOptions::default(),
    )
    .unwrap();
    tracker.log(0, &[("loss", f64::INFINITY)]).unwrap();
    let dir = tracker.dir().to_owned();
    tracker.finish(RunEnd::Finished).unwrap();
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["config.yml", "metrics.jsonl"]);
    assert!(!tmp.path().join("mlruns").exists());
    assert!(read_metrics(&dir.join("metrics.jsonl")).unwrap()[0].values["loss"].is_nan());
}

#[test]
fn unwritable_output_dir_names_the_path() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("a-file");
    std::fs::write(&file, "not a folder").unwrap();
    let output = file.join("runs");
    let err = RunTracker::create(&output, "exp", "r", CONFIG, &[], both()).unwrap_err();
    match &err {
        Error::Io { path, .. } => assert!(path.starts_with(&output), "{}", path.display()),
        other => panic!("expected Error::Io, got {other:?}"),
    }
    assert!(
        err.to_string().contains(&output.display().to_string()),
        "{err}"
    );
    // ...and what to do about it.
    assert!(err.to_string().contains("writable"), "{err}");
}

#[test]
fn invalid_names_are_refused_before_writing() {
    let tmp = tempfile::tempdir().unwrap();
    for (experiment, run) in [("../up", "r"), ("exp", ""), ("exp", "a/b"), (".", "r")] {
        let err = RunTracker::create(tmp.path(), experiment, run, CONFIG, &[], both()).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    }
    let bad_param = [("../escape".to_owned(), "x".to_owned())];
    let err = RunTracker::create(tmp.path(), "exp", "r", CONFIG, &bad_param, both()).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");

    let mut tracker = RunTracker::create(tmp.path(), "exp", "ok", CONFIG, &[], both()).unwrap();
    let err = tracker
        .log(0, &[("loss", 1.0), ("../bad", 2.0)])
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    // Nothing of the refused step was written.
    assert!(read_metrics(&tracker.dir().join("metrics.jsonl"))
        .unwrap()
        .is_empty());
    tracker.finish(RunEnd::Finished).unwrap();
}

#[test]
fn read_metrics_reports_malformed_lines() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("metrics.jsonl");
    let good = "{\"step\":0,\"time\":1.0,\"loss\":0.5}\n";
    for (bad, what) in [
        ("not json", "line 2"),
        ("{\"time\":1.0}", "`step`"),
        ("{\"step\":-1,\"time\":1.0}", "`step`"),
        ("{\"step\":1}", "`time`"),
        ("{\"step\":1,\"time\":1.0,\"loss\":\"high\"}", "`loss`"),
    ] {
        std::fs::write(&path, format!("{good}{bad}\n")).unwrap();
        let err = read_metrics(&path).unwrap_err();
        assert!(matches!(err, Error::Format { .. }), "{err}");
        let message = err.to_string();
        assert!(
            message.contains("line 2") && message.contains(what),
            "{message}"
        );
    }
    std::fs::write(&path, format!("{good}\n{good}")).unwrap();
    assert_eq!(read_metrics(&path).unwrap().len(), 2);
}

#[test]
fn reserved_repeated_and_empty_metric_names_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let mut tracker = RunTracker::create(
        tmp.path(),
        "exp",
        "r",
        CONFIG,
        &[],
        TrackerOptions::default(),
    )
    .unwrap();
    for metrics in [
        vec![("step", 1.0)],
        vec![("time", 1.0)],
        vec![("loss", 1.0), ("loss", 2.0)],
        vec![("", 1.0)],
    ] {
        let err = tracker.log(0, &metrics).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    }
    assert!(read_metrics(&tracker.dir().join("metrics.jsonl"))
        .unwrap()
        .is_empty());
    tracker.finish(RunEnd::Finished).unwrap();
}

#[test]
fn repeated_params_are_refused_for_mlflow() {
    let tmp = tempfile::tempdir().unwrap();
    let twice = [
        ("lr".to_owned(), "1".to_owned()),
        ("lr".to_owned(), "2".to_owned()),
    ];
    let err = RunTracker::create(tmp.path(), "exp", "r", CONFIG, &twice, both()).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
}

#[test]
fn slashed_metric_names_become_mlflow_subfolders() {
    let tmp = tempfile::tempdir().unwrap();
    let mut tracker = RunTracker::create(tmp.path(), "exp", "r", CONFIG, &[], both()).unwrap();
    tracker.log(3, &[("loss/train", 0.25)]).unwrap();
    tracker.finish(RunEnd::Finished).unwrap();
    let run = run_dirs(&tmp.path().join("mlruns/1")).remove(0);
    let text = std::fs::read_to_string(run.join("metrics/loss/train")).unwrap();
    assert!(text.ends_with(" 0.25 3\n"), "{text}");
}

#[test]
fn rerunning_into_a_run_folder_replaces_its_records() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("exp/again");
    std::fs::create_dir_all(&dir).unwrap();
    // An event file of an earlier run with another timestamp in its name.
    std::fs::write(dir.join("events.out.tfevents.1000000000.oldhost"), b"old").unwrap();
    std::fs::write(dir.join("keep.txt"), b"not ours").unwrap();
    write_run(tmp.path(), "exp", "again", RunEnd::Finished);
    write_run(tmp.path(), "exp", "again", RunEnd::Finished);
    // One event file (asserted inside) holding one run's events.
    let records = read_records(&event_file(&dir));
    assert_eq!(records.len(), 1 + logged().len());
    assert_eq!(
        read_metrics(&dir.join("metrics.jsonl")).unwrap().len(),
        logged().len()
    );
    assert!(dir.join("keep.txt").exists());
    // MLflow keeps both runs, under one experiment.
    assert_eq!(run_dirs(&tmp.path().join("mlruns/1")).len(), 2);
}

/// Whether `python3` can import `module`: the Python cross-checks below need it
/// and are skipped (with a note) where it is missing, because CI does not
/// install Python packages.
fn python_has(module: &str) -> bool {
    std::process::Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .output()
        .map(|out| out.status.success())
        .unwrap_or(false)
}

fn run_python(script: &str, args: &[&Path]) -> String {
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "python failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Reads the event file with TensorBoard's own reader.
#[test]
#[ignore = "needs Python's tensorboard package: pip install tensorboard"]
fn tensorboard_reads_the_event_file() {
    if !python_has("tensorboard") {
        eprintln!("skipped: python3 cannot import tensorboard");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = write_run(tmp.path(), "exp", "run-1", RunEnd::Finished);
    let script = r#"
import sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
acc = EventAccumulator(sys.argv[1])
acc.Reload()
for tag in sorted(acc.Tags()["scalars"]):
    for e in acc.Scalars(tag):
        print(tag, e.step, repr(e.value))
"#;
    let output = run_python(script, &[&dir]);
    let got: Vec<(String, i64, f32)> = output
        .lines()
        .map(|line| {
            let parts: Vec<&str> = line.split(' ').collect();
            (
                parts[0].to_owned(),
                parts[1].parse().unwrap(),
                parts[2].parse::<f64>().unwrap() as f32,
            )
        })
        .collect();
    let mut want: Vec<(String, i64, f32)> = logged()
        .into_iter()
        .flat_map(|(step, metrics)| {
            metrics
                .into_iter()
                .map(move |(name, value)| (name.to_owned(), step as i64, value as f32))
        })
        .filter(|(_, _, value)| value.is_finite())
        .collect();
    want.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)));
    assert_eq!(got, want);
}

/// Reads the store with MLflow's own `FileStore` (what `mlflow ui` serves).
#[test]
#[ignore = "needs Python's mlflow package: pip install mlflow-skinny"]
fn mlflow_reads_the_file_store() {
    if !python_has("mlflow") {
        eprintln!("skipped: python3 cannot import mlflow");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    write_run(tmp.path(), "exp", "run-1", RunEnd::Finished);
    write_run(tmp.path(), "exp", "run-2", RunEnd::Failed);
    let script = r#"
import os, sys
os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
from mlflow.store.tracking.file_store import FileStore
from mlflow.entities import ViewType
store = FileStore(sys.argv[1])
names = sorted(e.name for e in store.search_experiments(view_type=ViewType.ALL))
print("experiments", ",".join(names))
exp = store.get_experiment_by_name("exp")
runs = store.search_runs([exp.experiment_id], None, ViewType.ALL)
for run in sorted(runs, key=lambda r: r.info.run_name):
    print("run", run.info.run_name, run.info.status, run.info.experiment_id)
    print("params", sorted(run.data.params.items()))
    for key in sorted(run.data.metrics):
        for m in store.get_metric_history(run.info.run_id, key):
            print("metric", key, m.step, repr(m.value))
"#;
    let output = run_python(script, &[&tmp.path().join("mlruns")]);
    let lines: Vec<&str> = output.lines().collect();
    assert_eq!(lines[0], "experiments Default,exp", "{output}");
    // Metric lines are compared as numbers: Python prints `1e+300` where Rust
    // prints `1e300`.
    let mut got = Vec::new();
    for line in &lines[1..] {
        match line.split(' ').collect::<Vec<_>>()[..] {
            ["metric", key, step, value] => got.push(format!(
                "metric {key} {step} {}",
                value.parse::<f64>().unwrap().to_bits()
            )),
            _ => got.push((*line).to_owned()),
        }
    }
    let params = "params [('lora.rank', '4'), ('meta_learning.method', 'melora')]";
    let mut want = Vec::new();
    for (name, status) in [("run-1", "FINISHED"), ("run-2", "FAILED")] {
        want.push(format!("run {name} {status} 1"));
        want.push(params.to_owned());
        for metric in ["accuracy", "loss"] {
            for (step, metrics) in logged() {
                for (key, value) in metrics {
                    if key == metric && value.is_finite() {
                        want.push(format!("metric {key} {step} {}", value.to_bits()));
                    }
                }
            }
        }
    }
    assert_eq!(got, want, "{output}");
}

/// MLflow metric points of `name` in `run`: (value, step) per line.
fn mlflow_points(run: &Path, name: &str) -> Vec<(f64, u64)> {
    std::fs::read_to_string(run.join("metrics").join(name))
        .unwrap()
        .lines()
        .map(|line| {
            let parts: Vec<&str> = line.split(' ').collect();
            (parts[1].parse().unwrap(), parts[2].parse().unwrap())
        })
        .collect()
}

/// The steps of the scalar events in the one event file of `dir`.
fn event_steps(dir: &Path) -> Vec<i64> {
    read_records(&event_file(dir))
        .iter()
        .map(|r| decode_event(r))
        .filter(|e| e.file_version.is_none())
        .map(|e| e.step)
        .collect()
}

/// A run that logged steps 1..=5 and was killed (a record of each stream cut
/// short), resumed from its checkpoint of step 3: every stream holds steps 1..=3
/// as first written and 4..=6 as logged again, each once, and the same MLflow
/// run goes on to FINISHED.
#[test]
fn a_resumed_run_drops_what_was_logged_after_its_checkpoint() {
    use std::io::Write;
    let tmp = tempfile::tempdir().unwrap();
    let mut first =
        RunTracker::create(tmp.path(), "exp", "run", CONFIG, &params(), both()).unwrap();
    for step in 1..=5 {
        first.log(step, &[("loss", step as f64)]).unwrap();
    }
    let run_id = first.mlflow_run_id().unwrap().to_owned();
    let dir = first.dir().to_owned();
    drop(first); // killed: never finished
    let mlflow_run = run_dirs(&tmp.path().join("mlruns/1")).remove(0);
    assert_eq!(mlflow_run.file_name().unwrap().to_string_lossy(), run_id);
    let before = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let before_events = read_records(&event_file(&dir));
    // What a kill in the middle of a write leaves at the end of each stream.
    let append = |path: &Path, bytes: &[u8]| {
        let mut file = std::fs::OpenOptions::new().append(true).open(path).unwrap();
        file.write_all(bytes).unwrap();
    };
    append(&dir.join("metrics.jsonl"), b"{\"step\":6,\"ti");
    append(&event_file(&dir), &[42, 0, 0, 0, 0, 0, 0, 0, 1, 2]);
    // Cut inside the step (say 12): it reads as step 1, yet is no record of it.
    append(&mlflow_run.join("metrics/loss"), b"1700000000000 7.5 1");

    let resumed = TrackerOptions {
        resume: Some(Resume {
            step: 3,
            mlflow_run_id: Some(run_id.clone()),
        }),
        ..both()
    };
    let mut second =
        RunTracker::create(tmp.path(), "exp", "run", CONFIG, &params(), resumed).unwrap();
    assert_eq!(second.mlflow_run_id(), Some(run_id.as_str()));
    // Running again until it ends.
    let meta = yaml(&mlflow_run.join("meta.yaml"));
    assert_eq!(meta["status"].as_u64(), Some(1));
    for step in 4..=6 {
        second.log(step, &[("loss", 10.0 * step as f64)]).unwrap();
    }
    second.finish(RunEnd::Finished).unwrap();

    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let kept: String = before.lines().take(3).map(|l| format!("{l}\n")).collect();
    assert!(text.starts_with(&kept), "steps 1..=3 rewritten:\n{text}");
    let rows = read_metrics(&dir.join("metrics.jsonl")).unwrap();
    let got: Vec<(u64, f64)> = rows.iter().map(|r| (r.step, r.values["loss"])).collect();
    let want = [
        (1, 1.0),
        (2, 2.0),
        (3, 3.0),
        (4, 40.0),
        (5, 50.0),
        (6, 60.0),
    ];
    assert_eq!(got, want);

    // One event file (asserted inside), continued: its first records as they were.
    assert_eq!(event_steps(&dir), [1, 2, 3, 4, 5, 6]);
    let after_events = read_records(&event_file(&dir));
    assert_eq!(after_events[..4], before_events[..4]);
    assert_eq!(
        after_events
            .iter()
            .filter(|r| decode_event(r).file_version.is_some())
            .count(),
        1
    );

    assert_eq!(run_dirs(&tmp.path().join("mlruns/1")).len(), 1);
    let meta = yaml(&mlflow_run.join("meta.yaml"));
    assert_eq!(meta["status"].as_u64(), Some(3));
    assert!(meta["end_time"].as_u64().is_some());
    let points: Vec<(f64, u64)> = want.iter().map(|&(s, v)| (v, s)).collect();
    assert_eq!(mlflow_points(&mlflow_run, "loss"), points);
}

/// Resuming when the MLflow run cannot be continued (the store deleted, or no
/// run recorded) opens a new MLflow run; the other records are still cut back.
#[test]
fn resuming_without_the_recorded_mlflow_run_opens_a_new_one() {
    let tmp = tempfile::tempdir().unwrap();
    let mut first =
        RunTracker::create(tmp.path(), "exp", "run", CONFIG, &params(), both()).unwrap();
    first.log(1, &[("loss", 1.0)]).unwrap();
    first.log(2, &[("loss", 2.0)]).unwrap();
    let run_id = first.mlflow_run_id().unwrap().to_owned();
    first.finish(RunEnd::Killed).unwrap();
    std::fs::remove_dir_all(tmp.path().join("mlruns")).unwrap();
    for recorded in [Some(run_id.clone()), None] {
        let resumed = TrackerOptions {
            resume: Some(Resume {
                step: 1,
                mlflow_run_id: recorded,
            }),
            ..both()
        };
        let mut second =
            RunTracker::create(tmp.path(), "exp", "run", CONFIG, &params(), resumed).unwrap();
        let new_id = second.mlflow_run_id().unwrap().to_owned();
        assert_ne!(new_id, run_id);
        second.log(2, &[("loss", 4.0)]).unwrap();
        let dir = second.dir().to_owned();
        second.finish(RunEnd::Finished).unwrap();
        let steps: Vec<u64> = read_metrics(&dir.join("metrics.jsonl"))
            .unwrap()
            .iter()
            .map(|r| r.step)
            .collect();
        assert_eq!(steps, [1, 2]);
        let run = tmp.path().join("mlruns/1").join(&new_id);
        assert_eq!(yaml(&run.join("meta.yaml"))["status"].as_u64(), Some(3));
        assert_eq!(mlflow_points(&run, "loss"), [(4.0, 2)]);
    }
}

/// A complete record that does not parse is not silently dropped on resume: the
/// error names the file and line, and the file is left as it was.
#[test]
fn a_corrupt_record_is_refused_on_resume_and_left_unchanged() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("exp/run");
    std::fs::create_dir_all(&dir).unwrap();
    let text = "{\"step\":1,\"time\":1.0,\"loss\":1}\nnot json\n{\"step\":2,\"time\":2.0}\n";
    std::fs::write(dir.join("metrics.jsonl"), text).unwrap();
    let resumed = TrackerOptions {
        resume: Some(Resume {
            step: 1,
            mlflow_run_id: None,
        }),
        ..TrackerOptions::default()
    };
    let err = RunTracker::create(tmp.path(), "exp", "run", CONFIG, &[], resumed).unwrap_err();
    assert!(matches!(err, Error::Format { .. }), "{err}");
    let message = err.to_string();
    assert!(
        message.contains("metrics.jsonl") && message.contains("line 2"),
        "{message}"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap(),
        text
    );
}
