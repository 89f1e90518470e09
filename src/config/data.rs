//! The `data` section: where tasks come from and their shape.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::choice::choice_enum;
use super::validate::{at_least, invalid};
use crate::Result;

choice_enum! {
    /// Where the examples of the tasks come from.
    pub enum DataSource {
        /// Generated tasks; needs no files.
        Synthetic = "synthetic",
        /// JSON lines of labelled texts.
        Jsonl = "jsonl",
        /// CSV of labelled texts.
        Csv = "csv",
        /// WordNet definitions grouped by lexicographer class; without a
        /// path, the system's WordNet installation.
        Wordnet = "wordnet",
        /// Omniglot character images (the original zip archives).
        Omniglot = "omniglot",
        /// Images in IDX files (MNIST, Fashion-MNIST).
        Idx = "idx",
        /// Numeric feature table (CSV) with a label column.
        Tabular = "tabular",
    }
    default = Synthetic;
}

impl DataSource {
    fn needs_path(self) -> bool {
        !matches!(self, DataSource::Synthetic | DataSource::Wordnet)
    }
}

/// The `data` section.
///
/// Each task (episode) has `n_way` classes, with `k_shot` support and
/// `n_query` query examples per class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// Where the examples come from.
    pub source: DataSource,
    /// File or directory of the data; required by every source but
    /// `synthetic` and `wordnet`.
    pub path: Option<PathBuf>,
    /// Classes per task (at least 2).
    pub n_way: usize,
    /// Support examples per class (at least 1).
    pub k_shot: usize,
    /// Query examples per class (at least 1).
    pub n_query: usize,
    /// Use synthetic tasks whatever the source, e.g. for a quick check.
    pub synthetic_only: bool,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            source: DataSource::Synthetic,
            path: None,
            n_way: 5,
            k_shot: 5,
            n_query: 5,
            synthetic_only: false,
        }
    }
}

impl DataConfig {
    pub(crate) fn validate(&self) -> Result<()> {
        at_least("data.n_way", self.n_way, 2)?;
        at_least("data.k_shot", self.k_shot, 1)?;
        at_least("data.n_query", self.n_query, 1)?;
        if !self.synthetic_only && self.source.needs_path() && self.path.is_none() {
            return Err(invalid(
                "data.path",
                format!(
                    "required when data.source is `{}`; set it, or use data.source: synthetic",
                    self.source
                ),
            ));
        }
        Ok(())
    }
}
