//! An MLflow file store (the layout `mlflow ui --backend-store-uri <dir>/mlruns`
//! reads), written directly so that no MLflow client or server is needed.
//!
//! ```text
//! mlruns/0/meta.yaml                                 "Default", as MLflow creates it
//! mlruns/.trash/                                     where MLflow moves deleted experiments
//! mlruns/<experiment_id>/meta.yaml
//! mlruns/<experiment_id>/<run_id>/meta.yaml
//! mlruns/<experiment_id>/<run_id>/params/<key>       value text, no newline
//! mlruns/<experiment_id>/<run_id>/metrics/<key>      "<timestamp_ms> <value> <step>" per line
//! mlruns/<experiment_id>/<run_id>/tags/mlflow.runName (and mlflow.user, mlflow.source.*)
//! mlruns/<experiment_id>/<run_id>/artifacts/config.yml
//! ```
//!
//! Field names and encodings follow MLflow's `FileStore`: `experiment_id` is a
//! string, `status` is the `RunStatus` integer, `source_type` is `LOCAL` (4), and
//! `tags: []` stays in the run's `meta.yaml` for old readers. Keys containing `/`
//! become sub-folders, as MLflow does.
//!
//! Experiment ids: an experiment whose `meta.yaml` already carries the name is
//! reused; otherwise the new one takes the next integer after the largest numeric
//! id present. A store created here starts with MLflow's "Default" experiment 0,
//! as MLflow's own `FileStore` does, so MLflow clients that fall back to
//! experiment 0 work on it too.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use serde::{Deserialize, Serialize};

use super::RunEnd;
use crate::io::write_atomic;
use crate::{Error, Result};

/// MLflow's `RunStatus` values.
const STATUS_RUNNING: u32 = 1;
const STATUS_FINISHED: u32 = 3;
const STATUS_FAILED: u32 = 4;
const STATUS_KILLED: u32 = 5;
/// MLflow's `SourceType.LOCAL`.
const SOURCE_LOCAL: u32 = 4;
/// MLflow's limit on metric, parameter and tag key length.
const MAX_KEY_LENGTH: usize = 250;

/// `mlruns/<experiment_id>/meta.yaml`, fields in the (sorted) order MLflow writes.
#[derive(Serialize)]
struct ExperimentMeta {
    artifact_location: String,
    creation_time: u64,
    experiment_id: String,
    last_update_time: u64,
    lifecycle_stage: &'static str,
    name: String,
}

/// `mlruns/<experiment_id>/<run_id>/meta.yaml`, fields in the order MLflow writes.
#[derive(Debug, Serialize, Deserialize)]
struct RunMeta {
    artifact_uri: String,
    deleted_time: Option<u64>,
    end_time: Option<u64>,
    entry_point_name: String,
    experiment_id: String,
    lifecycle_stage: String,
    run_id: String,
    run_name: String,
    run_uuid: String,
    source_name: String,
    source_type: u32,
    source_version: String,
    start_time: u64,
    status: u32,
    tags: Vec<String>,
    user_id: String,
}

/// One run in the store.
#[derive(Debug)]
pub(crate) struct MlflowRun {
    dir: PathBuf,
    meta: RunMeta,
}

impl MlflowRun {
    /// Creates the run (and the store and its experiment if new) under `mlruns`,
    /// with status RUNNING, its parameters, its tags and `config_yaml` as the
    /// artifact `config.yml`.
    pub(crate) fn create(
        mlruns: &Path,
        experiment: &str,
        run_name: &str,
        config_yaml: &str,
        params: &[(String, String)],
        now_ms: u64,
    ) -> Result<Self> {
        Self::check_param_names(params)?;
        let new_store = !mlruns.exists();
        std::fs::create_dir_all(mlruns).map_err(|e| Error::io(mlruns, e))?;
        // Absolute, because MLflow resolves artifact URIs independently of the
        // directory the viewer was started in.
        let mlruns_abs = std::fs::canonicalize(mlruns).map_err(|e| Error::io(mlruns, e))?;
        if new_store {
            write_experiment(mlruns, &mlruns_abs, "0", "Default", now_ms)?;
        }
        let trash = mlruns.join(".trash");
        std::fs::create_dir_all(&trash).map_err(|e| Error::io(&trash, e))?;
        let (experiment_id, artifact_location) =
            experiment_id(mlruns, &mlruns_abs, experiment, now_ms)?;

        let run_id = new_run_id();
        let dir = mlruns.join(&experiment_id).join(&run_id);
        for sub in ["params", "metrics", "tags", "artifacts"] {
            let path = dir.join(sub);
            std::fs::create_dir_all(&path).map_err(|e| Error::io(&path, e))?;
        }
        let user = std::env::var("USER").unwrap_or_else(|_| "unknown".to_owned());
        let meta = RunMeta {
            // Where MLflow itself would put the run's artifacts: under the
            // experiment's location, which for a store made here is this folder.
            artifact_uri: format!(
                "{}/{run_id}/artifacts",
                artifact_location.trim_end_matches('/')
            ),
            deleted_time: None,
            end_time: None,
            entry_point_name: String::new(),
            experiment_id,
            lifecycle_stage: "active".to_owned(),
            run_id: run_id.clone(),
            run_name: run_name.to_owned(),
            run_uuid: run_id,
            source_name: String::new(),
            source_type: SOURCE_LOCAL,
            source_version: String::new(),
            start_time: now_ms,
            status: STATUS_RUNNING,
            tags: Vec::new(),
            user_id: user.clone(),
        };
        let run = MlflowRun { dir, meta };
        for (key, value) in params {
            write_atomic(&run.dir.join("params").join(key), value.as_bytes())?;
        }
        for (tag, value) in [
            ("mlflow.runName", run_name),
            ("mlflow.user", user.as_str()),
            ("mlflow.source.type", "LOCAL"),
            ("mlflow.source.name", "melora"),
        ] {
            write_atomic(&run.dir.join("tags").join(tag), value.as_bytes())?;
        }
        write_atomic(
            &run.dir.join("artifacts/config.yml"),
            config_yaml.as_bytes(),
        )?;
        run.write_meta()?;
        Ok(run)
    }

    /// Reopens the run `run_id` of the store `mlruns` to continue it from a
    /// checkpoint of `step`: status RUNNING again, no end time, `config_yaml` as
    /// its `config.yml` artifact, and every metric line of a later step dropped
    /// (see [`truncate_metric_file`]); parameters and tags stay as recorded.
    /// `Ok(None)` when the store holds no such active run (deleted, or the store
    /// is gone), for the caller to start a new one.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a run id that is not one; [`Error::Format`]
    /// for a `meta.yaml` or metric file that does not parse; [`Error::Io`].
    pub(crate) fn resume(
        mlruns: &Path,
        run_id: &str,
        step: u64,
        config_yaml: &str,
    ) -> Result<Option<Self>> {
        if run_id.is_empty() || !run_id.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(Error::InvalidArgument(format!(
                "`{run_id}` is not an MLflow run id (the checkpoint's state.json records \
                 it as `mlflow_run_id`); remove that entry to record a new MLflow run"
            )));
        }
        let Some(dir) = find_run(mlruns, run_id)? else {
            return Ok(None);
        };
        let path = dir.join("meta.yaml");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let mut meta: RunMeta = serde_norway::from_str(&text).map_err(|e| Error::Format {
            path: path.clone(),
            message: format!("not an MLflow run's meta.yaml: {e}"),
        })?;
        if meta.lifecycle_stage != "active" {
            return Ok(None);
        }
        let metrics = dir.join("metrics");
        if metrics.is_dir() {
            truncate_metric_files(&metrics, step)?;
        }
        meta.status = STATUS_RUNNING;
        meta.end_time = None;
        let run = MlflowRun { dir, meta };
        write_atomic(
            &run.dir.join("artifacts/config.yml"),
            config_yaml.as_bytes(),
        )?;
        run.write_meta()?;
        Ok(Some(run))
    }

    /// The run's id (its folder name).
    pub(crate) fn run_id(&self) -> &str {
        &self.meta.run_id
    }

    /// Checks that every parameter key can be an MLflow key and none repeats,
    /// before anything of the run is written.
    pub(crate) fn check_param_names(params: &[(String, String)]) -> Result<()> {
        for (index, (key, _)) in params.iter().enumerate() {
            check_key("parameter", key)?;
            if params[..index].iter().any(|(other, _)| other == key) {
                return Err(Error::InvalidArgument(format!(
                    "MLflow parameter `{key}` is given twice; MLflow keeps one value per key"
                )));
            }
        }
        Ok(())
    }

    /// Checks that every metric name can be an MLflow key, before anything of the
    /// step is written.
    pub(crate) fn check_metric_names(metrics: &[(&str, f64)]) -> Result<()> {
        metrics
            .iter()
            .try_for_each(|(name, _)| check_key("metric", name))
    }

    /// Appends one line per finite metric to `metrics/<name>`. NaN and infinity are
    /// skipped, as for TensorBoard: `metrics.jsonl` records them, and a plot with a
    /// gap reads better than one scaled to infinity.
    pub(crate) fn log(&mut self, step: u64, now_ms: u64, metrics: &[(&str, f64)]) -> Result<()> {
        for &(name, value) in metrics {
            if !value.is_finite() {
                continue;
            }
            let path = self.dir.join("metrics").join(name);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
            }
            let mut file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|e| Error::io(&path, e))?;
            // `{:?}` is the shortest text that parses back to the same f64, with an
            // exponent for very large or small values (`1e300`, not 301 digits);
            // Python's `float()` reads both forms.
            file.write_all(format!("{now_ms} {value:?} {step}\n").as_bytes())
                .map_err(|e| Error::io(&path, e))?;
        }
        Ok(())
    }

    /// Marks the run FINISHED, FAILED or KILLED with its end time.
    pub(crate) fn finish(mut self, end: RunEnd, now_ms: u64) -> Result<()> {
        self.meta.status = match end {
            RunEnd::Finished => STATUS_FINISHED,
            RunEnd::Failed => STATUS_FAILED,
            RunEnd::Killed => STATUS_KILLED,
        };
        self.meta.end_time = Some(now_ms);
        self.write_meta()
    }

    fn write_meta(&self) -> Result<()> {
        write_yaml(&self.dir.join("meta.yaml"), &self.meta)
    }
}

/// The folder of run `run_id` in any experiment of the store `mlruns` (MLflow
/// keeps deleted experiments in `.trash`, whose runs are not continued).
fn find_run(mlruns: &Path, run_id: &str) -> Result<Option<PathBuf>> {
    let entries = match std::fs::read_dir(mlruns) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(mlruns, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(mlruns, e))?;
        if entry.file_name() == ".trash" {
            continue;
        }
        let dir = entry.path().join(run_id);
        if dir.join("meta.yaml").is_file() {
            return Ok(Some(dir));
        }
    }
    Ok(None)
}

/// [`truncate_metric_file`] on every metric file under `dir` (keys with `/` are
/// sub-folders); temporary files of an atomic write (`.<name>.<pid>.tmp`) are
/// not metrics and are left alone.
fn truncate_metric_files(dir: &Path, step: u64) -> Result<()> {
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let path = entry.path();
        let kind = entry.file_type().map_err(|e| Error::io(&path, e))?;
        if kind.is_dir() {
            truncate_metric_files(&path, step)?;
        } else if kind.is_file() && !entry.file_name().to_string_lossy().starts_with('.') {
            truncate_metric_file(&path, step)?;
        }
    }
    Ok(())
}

/// Drops the lines (`<timestamp> <value> <step>`) of a metric file whose step is
/// past `step`, rewriting it atomically; earlier lines are kept byte for byte. A
/// last line without its newline was cut short by a crash (each line is written
/// whole, newline included) and is dropped too: its step may be cut short as well.
///
/// # Errors
/// [`Error::Io`]; [`Error::Format`] naming a complete line that is not a metric
/// point (nothing is rewritten).
fn truncate_metric_file(path: &Path, step: u64) -> Result<()> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut kept = String::with_capacity(text.len());
    for (index, raw) in text.split_inclusive('\n').enumerate() {
        let line = raw.trim_end_matches(['\n', '\r']);
        if line.trim().is_empty() || !raw.ends_with('\n') {
            continue;
        }
        let parts: Vec<&str> = line.split(' ').collect();
        let point_step = match parts[..] {
            [time, value, point_step]
                if time.parse::<u64>().is_ok() && value.parse::<f64>().is_ok() =>
            {
                point_step.parse::<u64>().ok()
            }
            _ => None,
        };
        match point_step {
            Some(s) if s <= step => {
                kept.push_str(line);
                kept.push('\n');
            }
            Some(_) => {}
            None => {
                return Err(Error::Format {
                    path: path.to_owned(),
                    message: format!(
                        "line {}: `{line}` is not `<timestamp> <value> <step>`; cannot drop \
                         the steps after the checkpoint (step {step}) from it: repair or \
                         delete that line, then resume",
                        index + 1
                    ),
                })
            }
        }
    }
    if kept != text {
        write_atomic(path, kept.as_bytes())?;
    }
    Ok(())
}

/// Serializes `value` to `path` atomically: a crash never leaves a truncated
/// `meta.yaml`, which MLflow would report as a malformed experiment or run.
fn write_yaml(path: &Path, value: &impl Serialize) -> Result<()> {
    let text = serde_norway::to_string(value).map_err(|e| Error::Format {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    write_atomic(path, text.as_bytes())
}

/// Writes `mlruns/<id>/meta.yaml` for a new active experiment whose artifacts
/// live beside its runs, as MLflow's default artifact root does.
fn write_experiment(
    mlruns: &Path,
    mlruns_abs: &Path,
    id: &str,
    name: &str,
    now_ms: u64,
) -> Result<String> {
    let artifact_location = format!("{}/{id}", file_uri(mlruns_abs));
    let meta = ExperimentMeta {
        artifact_location: artifact_location.clone(),
        creation_time: now_ms,
        experiment_id: id.to_owned(),
        last_update_time: now_ms,
        lifecycle_stage: "active",
        name: name.to_owned(),
    };
    write_yaml(&mlruns.join(id).join("meta.yaml"), &meta)?;
    Ok(artifact_location)
}

/// The id and artifact location of the experiment named `name`, creating it if
/// no `meta.yaml` under `mlruns` carries that name.
fn experiment_id(
    mlruns: &Path,
    mlruns_abs: &Path,
    name: &str,
    now_ms: u64,
) -> Result<(String, String)> {
    let entries = std::fs::read_dir(mlruns).map_err(|e| Error::io(mlruns, e))?;
    let mut largest = 0u64;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(mlruns, e))?;
        let dir_name = entry.file_name().to_string_lossy().into_owned();
        if let Ok(id) = dir_name.parse::<u64>() {
            largest = largest.max(id);
        }
        // Unreadable or foreign meta files are not ours to judge; skip them.
        let Ok(text) = std::fs::read_to_string(entry.path().join("meta.yaml")) else {
            continue;
        };
        let Ok(meta) = serde_norway::from_str::<serde_norway::Value>(&text) else {
            continue;
        };
        if meta.get("name").and_then(|n| n.as_str()) == Some(name) {
            // MLflow trusts the folder name over the recorded id (it ignores an
            // experiment whose two disagree), so the folder name is the id.
            let location = meta
                .get("artifact_location")
                .and_then(|l| l.as_str())
                .map(str::to_owned)
                .unwrap_or_else(|| format!("{}/{dir_name}", file_uri(mlruns_abs)));
            return Ok((dir_name, location));
        }
    }
    // `create_dir` (not `create_dir_all`) claims an id atomically, so two runs
    // creating experiments at once take different ids.
    let mut id = largest + 1;
    loop {
        let dir = mlruns.join(id.to_string());
        match std::fs::create_dir(&dir) {
            Ok(()) => break,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => id += 1,
            Err(e) => return Err(Error::io(&dir, e)),
        }
    }
    let id = id.to_string();
    let location = write_experiment(mlruns, mlruns_abs, &id, name, now_ms)?;
    Ok((id, location))
}

/// `file://` URI of an absolute path, percent-encoding what a URI cannot hold
/// (MLflow decodes it back to the path).
fn file_uri(path: &Path) -> String {
    let text = path.to_string_lossy();
    let mut uri = String::from("file://");
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~/".contains(&byte) {
            uri.push(byte as char);
        } else {
            uri.push_str(&format!("%{byte:02X}"));
        }
    }
    uri
}

/// A 32-hex-digit run id (MLflow's run id format): nanoseconds since the epoch,
/// a per-process counter and the process id, so ids differ across runs of one
/// process and across processes.
fn new_run_id() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{nanos:016x}{count:08x}{:08x}", std::process::id())
}

/// MLflow keys become file paths: allow the characters MLflow allows on every
/// platform (alphanumerics, `_ - . /` and space) and refuse what MLflow's
/// validator refuses as a path that is not unique or leaves the run's folder.
fn check_key(kind: &str, key: &str) -> Result<()> {
    let allowed = key
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ' ' | '/'));
    let escapes = key.starts_with('/')
        || key.starts_with("..")
        || key
            .split('/')
            .any(|part| part.is_empty() || part == "." || part == "..");
    if key.is_empty() || key.len() > MAX_KEY_LENGTH || !allowed || escapes {
        return Err(Error::InvalidArgument(format!(
            "MLflow {kind} name `{key}`: use at most {MAX_KEY_LENGTH} letters, digits, \
             `_ - . /` and spaces, as a relative path without empty, `.` or `..` parts"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_ids_are_32_hex_and_distinct() {
        let a = new_run_id();
        let b = new_run_id();
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn keys_that_leave_the_folder_are_refused() {
        assert!(check_key("metric", "loss/train").is_ok());
        assert!(check_key("metric", "query accuracy").is_ok());
        assert!(check_key("metric", "lora.rank").is_ok());
        let long = "x".repeat(MAX_KEY_LENGTH + 1);
        for bad in [
            "",
            "/abs",
            "../up",
            "..up",
            "a/../b",
            "a//b",
            "a/",
            "a/.",
            "semi;colon",
            &long,
        ] {
            assert!(check_key("metric", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn file_uris_escape_what_a_uri_cannot_hold() {
        assert_eq!(
            file_uri(Path::new("/tmp/my runs/100%")),
            "file:///tmp/my%20runs/100%25"
        );
    }
}
