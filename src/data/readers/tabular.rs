//! Tabular data: a CSV with a header, one label column and feature columns, numeric
//! or categorical, possibly with missing values.

use std::collections::BTreeSet;
use std::path::Path;

use super::malformed;
use super::text::{csv_error, csv_reader};
use crate::data::Dataset;
use crate::Result;

/// A table as a data set of feature rows grouped by the label column.
#[derive(Debug, Clone)]
pub struct Tabular {
    /// Feature rows by class; `NaN` marks a missing numeric value.
    pub dataset: Dataset<Vec<f32>>,
    /// Name of each feature: a numeric column's name, or `column=value` for each
    /// category of a one-hot-encoded categorical column.
    pub features: Vec<String>,
}

/// Whether a cell is a missing value: empty, `NA`, `N/A`, `NaN`, `null` or `?`.
fn is_missing(cell: &str) -> bool {
    let c = cell.trim();
    c.is_empty() || ["na", "n/a", "nan", "null", "?"].contains(&c.to_ascii_lowercase().as_str())
}

/// Reads a CSV (tab-separated for `.tsv`) whose `label_column` is the class. A column
/// whose present values all parse as numbers is numeric (missing values become
/// `NaN`, imputed when standardised); any other column is categorical, one-hot
/// encoded over its values in sorted order (a missing value is all zeros).
/// Standardisation is left to episode batching, fitted on each support set only.
pub fn read_tabular(path: &Path, label_column: &str) -> Result<Tabular> {
    let mut reader = csv_reader(path)?;
    let headers: Vec<String> = reader
        .headers()
        .map_err(|e| malformed(path, format!("cannot read the header row: {e}")))?
        .iter()
        .map(|h| h.trim().to_string())
        .collect();
    let label = headers
        .iter()
        .position(|h| h == label_column)
        .ok_or_else(|| {
            malformed(
                path,
                format!(
                    "no label column `{label_column}` in the header (columns: {})",
                    headers.join(", ")
                ),
            )
        })?;
    let mut records = Vec::new();
    for record in reader.records() {
        let record = record.map_err(|e| csv_error(path, e))?;
        let line = record.position().map_or(0, |p| p.line());
        let cells: Vec<String> = record.iter().map(|c| c.trim().to_string()).collect();
        if is_missing(&cells[label]) {
            return Err(super::at_line(
                path,
                line,
                format!("missing label in `{label_column}`"),
            ));
        }
        records.push(cells);
    }
    if records.is_empty() {
        return Err(malformed(path, "no rows"));
    }
    // Per feature column: None if numeric, else its sorted categories.
    let kinds: Vec<(usize, Option<Vec<String>>)> = (0..headers.len())
        .filter(|&c| c != label)
        .map(|c| {
            let present = records.iter().map(|r| &r[c]).filter(|v| !is_missing(v));
            if present.clone().all(|v| v.parse::<f64>().is_ok()) {
                (c, None)
            } else {
                let categories: BTreeSet<&String> = present.collect();
                (c, Some(categories.into_iter().cloned().collect()))
            }
        })
        .collect();
    let mut features = Vec::new();
    for (c, kind) in &kinds {
        match kind {
            None => features.push(headers[*c].clone()),
            Some(cats) => features.extend(cats.iter().map(|v| format!("{}={v}", headers[*c]))),
        }
    }
    let pairs = records.iter().map(|r| {
        let mut row = Vec::with_capacity(features.len());
        for (c, kind) in &kinds {
            let cell = &r[*c];
            match kind {
                None if is_missing(cell) => row.push(f32::NAN),
                None => row.push(cell.parse::<f64>().unwrap_or(f64::NAN) as f32),
                Some(cats) => row.extend(cats.iter().map(|v| f32::from(u8::from(v == cell)))),
            }
        }
        (r[label].clone(), row)
    });
    Ok(Tabular {
        dataset: Dataset::from_labelled(pairs.collect::<Vec<_>>()),
        features,
    })
}
