//! The `tracking` section: where a run writes its results.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::validate::{invalid, non_empty};
use crate::Result;

/// The `tracking` section. A run writes to `output_dir/experiment_name/`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrackingConfig {
    /// Folder holding one sub-folder per experiment.
    pub output_dir: PathBuf,
    /// Name of this run's sub-folder: a plain name, not a path.
    pub experiment_name: String,
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
        let name = &self.experiment_name;
        non_empty("tracking.experiment_name", name)?;
        // The name becomes one folder under output_dir; a path here would
        // write outside it.
        if name.contains(['/', '\\']) || name == "." || name == ".." {
            return Err(invalid(
                "tracking.experiment_name",
                format!("must be a plain folder name (no `/`, `\\`, `.` or `..`), got `{name}`"),
            ));
        }
        Ok(())
    }
}
