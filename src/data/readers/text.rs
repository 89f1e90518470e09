//! Labelled texts: JSON lines and CSV/TSV files.

use std::io::BufRead;
use std::path::Path;

use super::{at_line, malformed};
use crate::data::Dataset;
use crate::{Error, Result};

/// Names of the text and label fields (JSON lines) or columns (CSV, by header).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextColumns {
    /// Field or column holding the text.
    pub text: String,
    /// Field or column holding the class label.
    pub label: String,
}

impl Default for TextColumns {
    fn default() -> Self {
        Self {
            text: "text".into(),
            label: "label".into(),
        }
    }
}

/// One text of a file, with its label when the file gives one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextItem {
    /// The text.
    pub text: String,
    /// Its class label (`None` where the file has none and none is required).
    pub label: Option<String>,
}

/// Reads JSON lines `{"text": ..., "label": ...}` (field names from `columns`; a label
/// may be a string or a number); blank lines are skipped.
pub fn read_text_jsonl(path: &Path, columns: &TextColumns) -> Result<Dataset<String>> {
    grouped(read_jsonl_items(path, columns, true)?)
}

/// Reads a CSV file with a header row (tab-separated if the name ends in `.tsv`),
/// taking the text and label from the columns named in `columns`.
pub fn read_text_csv(path: &Path, columns: &TextColumns) -> Result<Dataset<String>> {
    grouped(read_csv_items(path, columns, true)?)
}

/// The texts of a JSON-lines file (`.jsonl`, `.json`) or a CSV/TSV file (any other
/// name), in file order, with their labels; `require_labels: false` accepts texts
/// without one (unlabelled queries).
pub fn read_text_items(
    path: &Path,
    columns: &TextColumns,
    require_labels: bool,
) -> Result<Vec<TextItem>> {
    let jsonl = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("jsonl") || e.eq_ignore_ascii_case("json"));
    if jsonl {
        read_jsonl_items(path, columns, require_labels)
    } else {
        read_csv_items(path, columns, require_labels)
    }
}

/// Labelled items grouped by label (every item has one: they were required).
fn grouped(items: Vec<TextItem>) -> Result<Dataset<String>> {
    Ok(Dataset::from_labelled(
        items
            .into_iter()
            .map(|item| (item.label.unwrap_or_default(), item.text)),
    ))
}

fn read_jsonl_items(
    path: &Path,
    columns: &TextColumns,
    require_labels: bool,
) -> Result<Vec<TextItem>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut items = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line_no = i as u64 + 1;
        let line = line.map_err(|e| at_line(path, line_no, e))?;
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value =
            serde_json::from_str(&line).map_err(|e| at_line(path, line_no, e))?;
        let text = value
            .get(&columns.text)
            .and_then(|v| v.as_str())
            .ok_or_else(|| at_line(path, line_no, format!("no string field `{}`", columns.text)))?;
        let label = match value.get(&columns.label) {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(v @ serde_json::Value::Number(_)) | Some(v @ serde_json::Value::Bool(_)) => {
                Some(v.to_string())
            }
            None | Some(serde_json::Value::Null) if !require_labels => None,
            _ => {
                return Err(at_line(
                    path,
                    line_no,
                    format!("no string or number field `{}`", columns.label),
                ))
            }
        };
        items.push(TextItem {
            text: text.to_string(),
            label,
        });
    }
    if items.is_empty() {
        return Err(malformed(path, "no examples"));
    }
    Ok(items)
}

fn read_csv_items(
    path: &Path,
    columns: &TextColumns,
    require_labels: bool,
) -> Result<Vec<TextItem>> {
    let mut reader = csv_reader(path)?;
    let headers = reader
        .headers()
        .map_err(|e| malformed(path, format!("cannot read the header row: {e}")))?
        .clone();
    let position = |name: &str| headers.iter().position(|h| h.trim() == name);
    let missing = |name: &str| {
        malformed(
            path,
            format!(
                "no column `{name}` in the header (columns: {})",
                headers.iter().collect::<Vec<_>>().join(", ")
            ),
        )
    };
    let text_col = position(&columns.text).ok_or_else(|| missing(&columns.text))?;
    let label_col = match position(&columns.label) {
        Some(c) => Some(c),
        None if !require_labels => None,
        None => return Err(missing(&columns.label)),
    };
    let mut items = Vec::new();
    for record in reader.records() {
        let record = record.map_err(|e| csv_error(path, e))?;
        let line = record.position().map_or(0, |p| p.line());
        let field = |c: usize, name: &str| {
            record
                .get(c)
                .ok_or_else(|| at_line(path, line, format!("no value in column `{name}`")))
        };
        let label = match label_col {
            Some(c) => {
                let label = field(c, &columns.label)?.trim();
                match (label.is_empty(), require_labels) {
                    (true, true) => {
                        return Err(at_line(path, line, format!("empty `{}`", columns.label)))
                    }
                    (true, false) => None,
                    (false, _) => Some(label.to_string()),
                }
            }
            None => None,
        };
        items.push(TextItem {
            text: field(text_col, &columns.text)?.to_string(),
            label,
        });
    }
    if items.is_empty() {
        return Err(malformed(path, "no examples"));
    }
    Ok(items)
}

/// A CSV reader of `path` with headers; tab-delimited for `.tsv`.
pub(crate) fn csv_reader(path: &Path) -> Result<csv::Reader<std::fs::File>> {
    let tab = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("tsv"));
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    Ok(csv::ReaderBuilder::new()
        .delimiter(if tab { b'\t' } else { b',' })
        .has_headers(true)
        .from_reader(file))
}

/// A csv error as a format error naming the file and line.
pub(crate) fn csv_error(path: &Path, e: csv::Error) -> Error {
    match e.position() {
        Some(p) => at_line(path, p.line(), e),
        None => malformed(path, e.to_string()),
    }
}
