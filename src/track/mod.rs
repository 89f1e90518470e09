//! Run tracking: every run writes what it did.
//!
//! A [`RunTracker`] owns one run folder, `output_dir/<experiment>/<run>/`:
//!
//! | file | what it holds |
//! |---|---|
//! | `config.yml` | the resolved configuration the run used (written atomically) |
//! | `metrics.jsonl` | one line `{"step":..,"time":..,"<metric>":<value>,..}` per logged step; read it with [`read_metrics`] |
//! | `events.out.tfevents.<secs>.<host>` | with [`TrackerOptions::tensorboard`]: the same scalars for `tensorboard --logdir output_dir` |
//!
//! With [`TrackerOptions::mlflow`] the run is also written to an MLflow file store
//! at `output_dir/mlruns/`, for `mlflow ui --backend-store-uri output_dir/mlruns`
//! (MLflow 3 reads file stores only with `MLFLOW_ALLOW_FILE_STORE=true`).
//!
//! Neither TensorBoard nor MLflow is a dependency: both formats are written
//! directly, and the tests parse them back. Metric values that are NaN or
//! infinite do not fail a run: they are written as `null` in `metrics.jsonl`
//! (JSON has no NaN) and left out of TensorBoard and MLflow, whose plots would
//! otherwise be scaled to infinity.
//!
//! Whole files (`config.yml`, MLflow's `meta.yaml`, params and tags) are written
//! atomically, so a crash never leaves one truncated; appended streams
//! (`metrics.jsonl`, the event file, MLflow metric files) get one unbuffered
//! write per record, so a crash loses at most the record being written.
//!
//! A run resumed from a checkpoint ([`TrackerOptions::resume`]) continues the
//! same records: each stream is first rewritten (atomically) without what was
//! logged after the checkpoint's step, a record a crash cut short included, so
//! that every step appears once; the MLflow run recorded in the checkpoint is
//! continued rather than a new one opened. [`RunTracker::finish`] records how the
//! run ended ([`RunEnd`]).

mod jsonl;
mod mlflow;
mod tensorboard;

#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

pub use jsonl::{read_metrics, MetricsRow};

use crate::io::write_atomic;
use crate::{Error, Result};
use jsonl::JsonlWriter;
use mlflow::MlflowRun;
use tensorboard::EventWriter;

/// Which outputs a run writes besides `config.yml` and `metrics.jsonl`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrackerOptions {
    /// Write a TensorBoard event file in the run folder.
    pub tensorboard: bool,
    /// Write the run to an MLflow file store at `output_dir/mlruns/`.
    pub mlflow: bool,
    /// Continue a run resumed from a checkpoint instead of replacing its records:
    /// `metrics.jsonl` and the event files keep every step up to
    /// [`Resume::step`] and lose the later ones (which the resumed run logs
    /// again, so each step appears once), and the MLflow run
    /// [`Resume::mlflow_run_id`] is continued with its later metric points
    /// dropped alike. Where that MLflow run cannot be found (the store was
    /// deleted, or the checkpoint recorded none) a new one is opened, with a
    /// warning on standard error.
    pub resume: Option<Resume>,
}

/// Where a resumed run continues: what [`TrackerOptions::resume`] needs from the
/// checkpoint it resumes from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resume {
    /// The checkpoint's step (iterations completed): records of later steps are
    /// dropped.
    pub step: u64,
    /// The MLflow run the checkpoint was written by ([`RunTracker::mlflow_run_id`]).
    pub mlflow_run_id: Option<String>,
}

/// How a run ended, as [`RunTracker::finish`] records it (MLflow's run status).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunEnd {
    /// It ran to its end (early stopping included): FINISHED.
    Finished,
    /// An error stopped it: FAILED.
    Failed,
    /// It was stopped on request (Ctrl-C), to be resumed: KILLED.
    Killed,
}

/// The outputs of one run. Call [`RunTracker::finish`] at the end; a tracker
/// dropped without it leaves its files complete up to the last [`RunTracker::log`],
/// but MLflow shows the run as still running (as it does for a crashed run).
#[derive(Debug)]
pub struct RunTracker {
    dir: PathBuf,
    metrics: JsonlWriter,
    tensorboard: Option<EventWriter>,
    mlflow: Option<MlflowRun>,
}

impl RunTracker {
    /// Creates `output_dir/experiment/run/`, writes `config.yml` (the resolved
    /// configuration text `config_yaml`) atomically and opens `metrics.jsonl`;
    /// if enabled, also opens a TensorBoard event file there and creates the run
    /// in the MLflow store `output_dir/mlruns/` with `params` as its parameters.
    ///
    /// `experiment` and `run` must be plain folder names. An existing run folder
    /// of the same name is reused: its `metrics.jsonl` and event files are
    /// replaced, so that one folder never mixes two runs' curves (MLflow keeps
    /// every run, each under its own id) — unless [`TrackerOptions::resume`]
    /// continues them.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a name that is not a plain folder name or a
    /// parameter key MLflow cannot store; [`Error::Io`] naming the path that could
    /// not be created or written; when resuming, [`Error::Format`] naming a
    /// record file that does not parse (it is left unchanged).
    pub fn create(
        output_dir: &Path,
        experiment: &str,
        run: &str,
        config_yaml: &str,
        params: &[(String, String)],
        options: TrackerOptions,
    ) -> Result<Self> {
        check_folder_name("experiment", experiment)?;
        check_folder_name("run", run)?;
        if options.mlflow {
            MlflowRun::check_param_names(params)?;
        }
        let dir = output_dir.join(experiment).join(run);
        std::fs::create_dir_all(&dir).map_err(|e| {
            Error::io(
                &dir,
                with_hint(
                    e,
                    "cannot create the run folder; point `tracking.output_dir` \
                     (or --output) at a writable folder",
                ),
            )
        })?;
        write_atomic(&dir.join("config.yml"), config_yaml.as_bytes())?;
        let resume = options.resume.as_ref();
        let step = resume.map(|r| r.step);
        let metrics = JsonlWriter::create(dir.join("metrics.jsonl"), step)?;
        let (wall_time, now_ms) = now();
        let tensorboard = match (options.tensorboard, step) {
            (false, _) => None,
            (true, None) => Some(EventWriter::create(&dir, wall_time)?),
            (true, Some(step)) => Some(EventWriter::resume(&dir, wall_time, step)?),
        };
        let mlflow = if options.mlflow {
            let mlruns = output_dir.join("mlruns");
            let continued = match resume {
                Some(Resume {
                    step,
                    mlflow_run_id: Some(id),
                }) => {
                    let found = MlflowRun::resume(&mlruns, id, *step, config_yaml)?;
                    if found.is_none() {
                        eprintln!(
                            "warning: MLflow run {id}, which the checkpoint was written by, \
                             is not in {} (deleted?); recording the resumed run as a new \
                             MLflow run",
                            mlruns.display()
                        );
                    }
                    found
                }
                Some(Resume {
                    mlflow_run_id: None,
                    ..
                }) => {
                    eprintln!(
                        "warning: the checkpoint records no MLflow run (MLflow was off, or \
                         an older melora wrote it); recording the resumed run as a new \
                         MLflow run"
                    );
                    None
                }
                None => None,
            };
            match continued {
                Some(run) => Some(run),
                None => Some(MlflowRun::create(
                    &mlruns,
                    experiment,
                    run,
                    config_yaml,
                    params,
                    now_ms,
                )?),
            }
        } else {
            None
        };
        Ok(RunTracker {
            dir,
            metrics,
            tensorboard,
            mlflow,
        })
    }

    /// The run folder, `output_dir/experiment/run`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The id of the run in the MLflow store, when MLflow is on: record it with a
    /// checkpoint, so that a run resumed from it continues this MLflow run
    /// ([`Resume::mlflow_run_id`]).
    pub fn mlflow_run_id(&self) -> Option<&str> {
        self.mlflow.as_ref().map(MlflowRun::run_id)
    }

    /// Records `metrics` at `step`: one line in `metrics.jsonl` (written through
    /// at once), one scalar summary per metric in TensorBoard and one line per
    /// metric in MLflow's `metrics/<name>`. NaN and infinite values become `null`
    /// in `metrics.jsonl` and are skipped elsewhere.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] (before anything is written) for an empty or
    /// repeated metric name, for `step` or `time` (the keys every JSONL line
    /// already has), or, when MLflow is on, for a name MLflow cannot store;
    /// [`Error::Io`] if a file cannot be written.
    pub fn log(&mut self, step: u64, metrics: &[(&str, f64)]) -> Result<()> {
        check_metric_names(metrics)?;
        if self.mlflow.is_some() {
            MlflowRun::check_metric_names(metrics)?;
        }
        let (wall_time, now_ms) = now();
        self.metrics.write(step, wall_time, metrics)?;
        if let Some(events) = &mut self.tensorboard {
            events.write_scalars(step, wall_time, metrics)?;
        }
        if let Some(run) = &mut self.mlflow {
            run.log(step, now_ms, metrics)?;
        }
        Ok(())
    }

    /// Ends the run: every file synced to disk, and the MLflow run marked with
    /// how it ended (`end`: FINISHED, FAILED or KILLED) and its end time.
    ///
    /// # Errors
    /// [`Error::Io`] naming the file that could not be synced or written.
    pub fn finish(self, end: RunEnd) -> Result<()> {
        let (_, now_ms) = now();
        // Each output is ended even if another fails; the first error is returned.
        let metrics = self.metrics.finish();
        let events = self.tensorboard.map_or(Ok(()), EventWriter::finish);
        let mlflow = self.mlflow.map_or(Ok(()), |run| run.finish(end, now_ms));
        metrics.and(events).and(mlflow)
    }
}

/// The current time as seconds (TensorBoard, `metrics.jsonl`) and milliseconds
/// (MLflow) since the Unix epoch; a clock before 1970 counts as the epoch rather
/// than failing a run.
fn now() -> (f64, u64) {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    (since.as_secs_f64(), since.as_millis() as u64)
}

/// Experiment and run names each become one folder; a path there would write
/// outside `output_dir`.
fn check_folder_name(kind: &str, name: &str) -> Result<()> {
    if name.is_empty() || name.contains(['/', '\\']) || name == "." || name == ".." {
        return Err(Error::InvalidArgument(format!(
            "{kind} name must be a plain folder name (no `/`, `\\`, `.` or `..`), got `{name}`"
        )));
    }
    Ok(())
}

/// Metric names become JSON keys next to `step` and `time`, TensorBoard tags and
/// MLflow file names: one step naming a metric twice, or naming it like a
/// JSONL key, would be ambiguous in at least one of them.
fn check_metric_names(metrics: &[(&str, f64)]) -> Result<()> {
    for (index, &(name, _)) in metrics.iter().enumerate() {
        if name.is_empty() {
            return Err(Error::InvalidArgument(
                "metric name must not be empty".to_owned(),
            ));
        }
        if jsonl::RESERVED_KEYS.contains(&name) {
            return Err(Error::InvalidArgument(format!(
                "metric name `{name}` is reserved (every metrics.jsonl line has it); \
                 rename the metric"
            )));
        }
        if metrics[..index].iter().any(|&(other, _)| other == name) {
            return Err(Error::InvalidArgument(format!(
                "metric `{name}` is logged twice in one step; log each metric once per step"
            )));
        }
    }
    Ok(())
}

/// `e` with what the user can do about it appended, keeping its kind.
fn with_hint(e: std::io::Error, hint: &str) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("{e}; {hint}"))
}
