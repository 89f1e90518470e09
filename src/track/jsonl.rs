//! `metrics.jsonl`: one JSON object per logged step, the run's own record that
//! needs no viewer to read.
//!
//! Each line is `{"step":<u64>,"time":<unix seconds>,"<metric>":<value>,...}`, the
//! metrics in the order they were logged. JSON has no NaN or infinity, so a
//! value that is not finite is written as `null` (and reads back as NaN): the
//! line stays valid JSON for every reader, and the metric stays visible as
//! logged-but-undefined instead of silently disappearing.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::ser::{Serialize, SerializeMap, Serializer};

use crate::io::write_atomic;
use crate::{Error, Result};

/// Keys every line carries besides the metrics, so no metric may use them.
pub(crate) const RESERVED_KEYS: [&str; 2] = ["step", "time"];

/// One line of `metrics.jsonl` as read back by [`read_metrics`].
#[derive(Debug, Clone, PartialEq)]
pub struct MetricsRow {
    /// The step the metrics were logged at.
    pub step: u64,
    /// When they were logged, in seconds since the Unix epoch.
    pub time: f64,
    /// Metric values by name; `NaN` where the logged value was not finite.
    pub values: BTreeMap<String, f64>,
}

/// One line as written: serialized by hand so that `step` and `time` come first
/// and the metrics keep the caller's order.
struct Line<'a> {
    step: u64,
    time: f64,
    metrics: &'a [(&'a str, f64)],
}

impl Serialize for Line<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(2 + self.metrics.len()))?;
        map.serialize_entry("step", &self.step)?;
        map.serialize_entry("time", &self.time)?;
        for &(name, value) in self.metrics {
            map.serialize_entry(name, &value.is_finite().then_some(value))?;
        }
        map.end()
    }
}

/// An open `metrics.jsonl`.
#[derive(Debug)]
pub(crate) struct JsonlWriter {
    path: PathBuf,
    file: File,
}

impl JsonlWriter {
    /// Creates (or truncates) `path`: a run folder holds one run; or, with
    /// `resume_after` = `Some(step)`, continues it (a run resumed from a checkpoint
    /// of `step`): lines of later steps are dropped first (see [`truncate_after`]),
    /// so that the resumed run logs each step once.
    pub(crate) fn create(path: PathBuf, resume_after: Option<u64>) -> Result<Self> {
        let file = match resume_after {
            Some(step) => {
                truncate_after(&path, step)?;
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
            }
            None => File::create(&path),
        }
        .map_err(|e| Error::io(&path, e))?;
        Ok(JsonlWriter { path, file })
    }

    /// Appends one line. The caller has checked that names are distinct and
    /// none is in [`RESERVED_KEYS`].
    pub(crate) fn write(&mut self, step: u64, time: f64, metrics: &[(&str, f64)]) -> Result<()> {
        let line = Line {
            step,
            time,
            metrics,
        };
        let mut text = serde_json::to_string(&line).map_err(|e| Error::Format {
            path: self.path.clone(),
            message: e.to_string(),
        })?;
        text.push('\n');
        // A single unbuffered write per line, so a reader (or a crash) sees whole
        // lines as soon as they are logged.
        self.file
            .write_all(text.as_bytes())
            .map_err(|e| Error::io(&self.path, e))
    }

    /// Syncs the file to disk.
    pub(crate) fn finish(self) -> Result<()> {
        self.file.sync_all().map_err(|e| Error::io(&self.path, e))
    }
}

/// Just the step of a line, for [`truncate_after`].
#[derive(serde::Deserialize)]
struct StepOnly {
    step: u64,
}

/// Drops the lines of `path` whose step is past `step` (what a run logged after
/// the checkpoint it is resumed from), rewriting the file atomically; every line
/// up to the checkpoint is kept byte for byte. A last line without its newline
/// that does not parse was cut short by a crash and is dropped too. A missing
/// file is left missing.
///
/// # Errors
/// [`Error::Io`] if the file cannot be read or rewritten; [`Error::Format`]
/// naming a complete line that is not a metrics object (nothing is rewritten).
pub(crate) fn truncate_after(path: &Path, step: u64) -> Result<()> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(path, e)),
    };
    let mut kept = String::with_capacity(text.len());
    for (index, raw) in text.split_inclusive('\n').enumerate() {
        let line = raw.trim_end_matches(['\n', '\r']);
        if line.trim().is_empty() {
            continue;
        }
        let parsed: std::result::Result<StepOnly, _> = serde_json::from_str(line);
        match parsed {
            Ok(row) if row.step <= step => {
                kept.push_str(line);
                kept.push('\n');
            }
            Ok(_) => {}
            // A torn last write: the record was never complete.
            Err(_) if !raw.ends_with('\n') => {}
            Err(e) => {
                return Err(Error::Format {
                    path: path.to_owned(),
                    message: format!(
                        "line {}: {e}; cannot drop the steps after the checkpoint \
                         (step {step}) from it: repair or delete that line, then resume",
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

/// Reads a `metrics.jsonl` back, one [`MetricsRow`] per line in file order.
///
/// Values round-trip exactly (the JSON is written with the shortest exact
/// representation and parsed with `float_roundtrip`); values written as `null`
/// (they were NaN or infinite) read back as `f64::NAN`. Blank lines are skipped.
///
/// # Errors
/// [`Error::Io`] if the file cannot be read; [`Error::Format`] naming the line
/// that is not such an object.
pub fn read_metrics(path: &Path) -> Result<Vec<MetricsRow>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut rows = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        if raw.trim().is_empty() {
            continue;
        }
        let bad = |message: String| Error::Format {
            path: path.to_owned(),
            message: format!("line {}: {message}", index + 1),
        };
        let mut object: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(raw).map_err(|e| bad(e.to_string()))?;
        let step = object
            .remove("step")
            .and_then(|v| v.as_u64())
            .ok_or_else(|| bad("`step` is missing or not a non-negative integer".into()))?;
        let time = object
            .remove("time")
            .and_then(|v| v.as_f64())
            .ok_or_else(|| bad("`time` is missing or not a number".into()))?;
        let mut values = BTreeMap::new();
        for (name, value) in object {
            let value = match value {
                serde_json::Value::Null => f64::NAN,
                serde_json::Value::Number(n) => n.as_f64().unwrap_or(f64::NAN),
                other => return Err(bad(format!("metric `{name}` is {other}, not a number"))),
            };
            values.insert(name, value);
        }
        rows.push(MetricsRow { step, time, values });
    }
    Ok(rows)
}
