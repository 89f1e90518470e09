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
    /// Creates (or truncates) `path`: a run folder holds one run; or, when
    /// `append`, continues it (a resumed run).
    pub(crate) fn create(path: PathBuf, append: bool) -> Result<Self> {
        let file = if append {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
        } else {
            File::create(&path)
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
