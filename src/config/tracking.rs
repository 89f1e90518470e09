//! The `tracking` section: where a run writes its results.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::validate::{invalid, non_empty};
use crate::Result;

/// The `tracking` section. A run writes to `output_dir/experiment_name/run_name/`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrackingConfig {
    /// Folder holding one sub-folder per experiment.
    pub output_dir: PathBuf,
    /// Name of this run's sub-folder: a plain name, not a path.
    pub experiment_name: String,
    /// Name of the run's folder inside the experiment's; `None` names it after the
    /// method and seed (`maml-seed42`).
    pub run_name: Option<String>,
    /// Also write TensorBoard event files.
    pub tensorboard: bool,
    /// Also write an MLflow file store.
    pub mlflow: bool,
}

impl Default for TrackingConfig {
    fn default() -> Self {
        TrackingConfig {
            output_dir: PathBuf::from("runs"),
            experiment_name: "default".to_owned(),
            run_name: None,
            tensorboard: false,
            mlflow: false,
        }
    }
}

impl TrackingConfig {
    pub(crate) fn validate(&self) -> Result<()> {
        if self.output_dir.as_os_str().is_empty() {
            return Err(invalid("tracking.output_dir", "must not be empty"));
        }
        folder_name("tracking.experiment_name", &self.experiment_name)?;
        if let Some(run) = &self.run_name {
            folder_name("tracking.run_name", run)?;
        }
        Ok(())
    }
}

/// A name that becomes one folder under another: a path here would write outside it.
fn folder_name(key: &str, name: &str) -> Result<()> {
    non_empty(key, name)?;
    if name.contains(['/', '\\']) || name == "." || name == ".." {
        return Err(invalid(
            key,
            format!("must be a plain folder name (no `/`, `\\`, `.` or `..`), got `{name}`"),
        ));
    }
    Ok(())
}
