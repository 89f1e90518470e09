//! Training checkpoints: a folder with the trainable parameters
//! (`params.safetensors`), the optimiser's state (`optimizer.safetensors`) and
//! `state.json` (iteration, optimiser steps, what model and adapter they belong to,
//! the resolved configuration). A checkpoint is written whole into a temporary folder
//! and then swapped in, so an interrupted write never leaves a truncated checkpoint in
//! place of a good one.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::optim::{LossScaler, Optimizer};
use crate::tensor::ParamSet;
use crate::{Error, Result};

const PARAMS: &str = "params.safetensors";
const OPTIMIZER: &str = "optimizer.safetensors";
const STATE: &str = "state.json";

/// What a checkpoint records besides tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointState {
    /// Meta-iterations completed.
    pub iteration: usize,
    /// Optimiser steps taken.
    pub optimizer_steps: u64,
    /// Best validation score so far (accuracy, or minus the MSE for regression).
    pub best_val_score: Option<f64>,
    /// Validations since the best one (early stopping's count).
    #[serde(default)]
    pub validations_since_best: usize,
    /// Model name or path, LoRA rank and classes: a checkpoint only loads into the
    /// same shapes.
    pub model: String,
    /// LoRA rank.
    pub lora_rank: usize,
    /// Classes per task.
    pub n_way: usize,
    /// The resolved configuration of the run (YAML).
    pub config: String,
    /// Dynamic loss scaling's state (f16 activations), so that a resumed run
    /// continues with the same scale.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scaler: Option<LossScaler>,
    /// The MLflow run that logged the run (with `tracking.mlflow`), so that a run
    /// resumed from this checkpoint continues it instead of opening a new one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mlflow_run_id: Option<String>,
}

/// The folder a checkpoint for `dir` is written into before it is swapped in:
/// `.<name>.<pid>.partial` beside it.
pub(crate) fn staging_dir(dir: &Path) -> PathBuf {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let parent = dir.parent().unwrap_or(Path::new("."));
    parent.join(format!(".{name}.{}.partial", std::process::id()))
}

/// Writes a checkpoint folder at `dir` (replacing any previous one only once the new
/// one is complete).
pub fn save_checkpoint(
    dir: &Path,
    params: &ParamSet,
    optimizer: &Optimizer,
    state: &CheckpointState,
) -> Result<()> {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let parent = dir.parent().unwrap_or(Path::new("."));
    let staging = staging_dir(dir);
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(|e| Error::io(&staging, e))?;
    params.save(&staging.join(PARAMS))?;
    if let Some((m, v)) = optimizer.moments() {
        let mut moments = ParamSet::new();
        for (n, t) in m.iter() {
            moments.insert(format!("m.{n}"), t.clone())?;
        }
        for (n, t) in v.iter() {
            moments.insert(format!("v.{n}"), t.clone())?;
        }
        moments.save(&staging.join(OPTIMIZER))?;
    }
    let json = serde_json::to_vec_pretty(state).map_err(|e| Error::Format {
        path: staging.join(STATE),
        message: e.to_string(),
    })?;
    crate::io::write_atomic(&staging.join(STATE), &json)?;
    let old = parent.join(format!(".{name}.old"));
    let _ = std::fs::remove_dir_all(&old);
    if dir.exists() {
        std::fs::rename(dir, &old).map_err(|e| Error::io(dir, e))?;
    }
    std::fs::rename(&staging, dir).map_err(|e| Error::io(dir, e))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

/// A loaded checkpoint.
#[derive(Debug)]
pub struct Checkpoint {
    /// The trainable parameters, in the template's order.
    pub params: ParamSet,
    /// Optimiser moments, if it had any.
    pub moments: Option<(ParamSet, ParamSet)>,
    /// The recorded state.
    pub state: CheckpointState,
}

/// The folder to read: `dir`, or the previous version a crash left beside it.
fn readable(dir: &Path) -> PathBuf {
    if dir.join(STATE).exists() {
        return dir.to_path_buf();
    }
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let old = dir
        .parent()
        .unwrap_or(Path::new("."))
        .join(format!(".{name}.old"));
    if old.join(STATE).exists() {
        old
    } else {
        dir.to_path_buf()
    }
}

/// Reads only a checkpoint's recorded state (its configuration among it).
pub fn read_checkpoint_state(dir: &Path) -> Result<CheckpointState> {
    let state_path = readable(dir).join(STATE);
    let text = std::fs::read_to_string(&state_path).map_err(|e| {
        Error::io(
            &state_path,
            std::io::Error::new(
                e.kind(),
                format!(
                    "{e} (is {} a checkpoint folder, such as runs/<experiment>/<run>/best?)",
                    dir.display()
                ),
            ),
        )
    })?;
    serde_json::from_str(&text).map_err(|e| Error::Format {
        path: state_path.clone(),
        message: format!("not a melora checkpoint state: {e}"),
    })
}

/// Reads a checkpoint whose tensors must match `template` (the model's parameters):
/// a checkpoint of another model, rank or number of classes is a clear error.
pub fn load_checkpoint(dir: &Path, template: &ParamSet) -> Result<Checkpoint> {
    let state = read_checkpoint_state(dir)?;
    let dir = readable(dir);
    let params = ParamSet::load_like(&dir.join(PARAMS), template).map_err(|e| {
        Error::Params(format!(
            "the checkpoint in {} does not fit this model (it was written for {}, LoRA rank {}, \
             {} classes): {e}",
            dir.display(),
            state.model,
            state.lora_rank,
            state.n_way
        ))
    })?;
    let moments = if dir.join(OPTIMIZER).exists() {
        let all = ParamSet::load(&dir.join(OPTIMIZER), &candle_core::Device::Cpu)?;
        let pick = |prefix: &str| {
            ParamSet::from_pairs(
                template
                    .names()
                    .map(|n| {
                        (
                            n.to_string(),
                            all.require(&format!("{prefix}.{n}")).cloned(),
                        )
                    })
                    .map(|(n, t)| t.map(|t| (n, t)))
                    .collect::<Result<Vec<_>>>()?,
            )
        };
        Some((pick("m")?, pick("v")?))
    } else {
        None
    };
    Ok(Checkpoint {
        params,
        moments,
        state,
    })
}
