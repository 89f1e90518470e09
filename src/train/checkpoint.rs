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
    let state: CheckpointState = serde_json::from_str(&text).map_err(|e| Error::Format {
        path: state_path.clone(),
        message: format!("not a melora checkpoint state: {e}"),
    })?;
    state.validate(&state_path)?;
    Ok(state)
}

impl CheckpointState {
    /// The counts agree with one another: at most one optimiser step, one skipped
    /// (loss-scale overflow) step and one validation per completed iteration. A file
    /// that breaks this was not written by melora, and its counts would overflow later.
    fn validate(&self, path: &Path) -> Result<()> {
        let iteration = self.iteration;
        let damaged = |what: String| Error::Format {
            path: path.to_path_buf(),
            message: format!(
                "{what}, more than the {iteration} completed iterations allow: the file is \
                 damaged; resume from another checkpoint (best or last) or start afresh"
            ),
        };
        if u64::try_from(iteration).map_or(true, |i| self.optimizer_steps > i) {
            return Err(damaged(format!(
                "optimizer_steps is {}",
                self.optimizer_steps
            )));
        }
        if self.validations_since_best > iteration {
            return Err(damaged(format!(
                "validations_since_best is {}",
                self.validations_since_best
            )));
        }
        if let Some(scaler) = &self.loss_scaler {
            if scaler.skipped_steps() > iteration {
                return Err(damaged(format!(
                    "the loss scaler skipped {} steps",
                    scaler.skipped_steps()
                )));
            }
        }
        Ok(())
    }
}

/// Reads a checkpoint whose tensors must match `template` (the model's parameters):
/// a checkpoint of another model, rank or number of classes is a clear error.
pub fn load_checkpoint(dir: &Path, template: &ParamSet) -> Result<Checkpoint> {
    let state = read_checkpoint_state(dir)?;
    let params = read_params(dir, &state, template, &[])?;
    let dir = readable(dir);
    let optimizer_path = dir.join(OPTIMIZER);
    let moments = if optimizer_path.exists() {
        let all = ParamSet::load(&optimizer_path, &template.device())?;
        // Each moment has its parameter's shape (and is used in its dtype).
        let pick = |prefix: &str| -> Result<ParamSet> {
            let mut moment = ParamSet::new();
            for (name, t) in template.iter() {
                let key = format!("{prefix}.{name}");
                let found = all.get(&key).ok_or_else(|| Error::Format {
                    path: optimizer_path.clone(),
                    message: format!("no tensor `{key}` (the optimiser state of `{name}`)"),
                })?;
                if found.dims() != t.dims() {
                    return Err(Error::Format {
                        path: optimizer_path.clone(),
                        message: format!(
                            "`{key}` has shape {:?}, but its parameter `{name}` has {:?}",
                            found.dims(),
                            t.dims()
                        ),
                    });
                }
                moment.insert(name, found.to_dtype(t.dtype())?)?;
            }
            Ok(moment)
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

/// A checkpoint's parameters, checked against `template` except the tensors named
/// in `replaced`, which are `template`'s own: a learner that never reads the
/// classification head (ProtoNets) evaluates a checkpoint meta-trained at another
/// number of classes with the head of this one.
pub(crate) fn load_checkpoint_params(
    dir: &Path,
    template: &ParamSet,
    replaced: &[&str],
) -> Result<ParamSet> {
    let state = read_checkpoint_state(dir)?;
    read_params(dir, &state, template, replaced)
}

fn read_params(
    dir: &Path,
    state: &CheckpointState,
    template: &ParamSet,
    replaced: &[&str],
) -> Result<ParamSet> {
    let dir = readable(dir);
    let kept = |set: &ParamSet| {
        ParamSet::from_pairs(
            set.iter()
                .filter(|(name, _)| !replaced.contains(name))
                .map(|(name, t)| (name.to_string(), t.clone())),
        )
    };
    // A missing or unreadable file keeps its kind (Io, Format naming the file); only
    // tensors of other names or shapes mean another model.
    let params_path = dir.join(PARAMS);
    let loaded = kept(&ParamSet::load(&params_path, &template.device())?)?
        .conformed_to(&kept(template)?, &params_path)
        .map_err(|e| {
            // The vision backbones and the MLP train every parameter, without LoRA.
            let adapted =
                crate::models::Backbone::from_name(&state.model).is_none() && state.model != "mlp";
            let lora = if adapted {
                format!(", LoRA rank {}", state.lora_rank)
            } else {
                String::new()
            };
            Error::Params(format!(
                "the checkpoint in {} does not fit this model (it was written for {}{lora}, \
                 {} classes): {e}",
                dir.display(),
                state.model,
                state.n_way
            ))
        })?;
    // In the template's order, with the replaced tensors from the template.
    ParamSet::from_pairs(template.iter().map(|(name, t)| {
        let t = loaded.get(name).unwrap_or(t);
        (name.to_string(), t.clone())
    }))
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;
    use crate::optim::OptimizerKind;

    fn params() -> ParamSet {
        let t =
            |v: &[f32], shape: (usize, usize)| Tensor::from_slice(v, shape, &Device::Cpu).unwrap();
        ParamSet::from_pairs([
            ("a", t(&[1.0, 2.0, 3.0, 4.0], (2, 2))),
            ("b", t(&[0.5, -0.5], (1, 2))),
        ])
        .unwrap()
    }

    /// A checkpoint after two AdamW steps (so with moments) in `dir/ck`.
    fn written(dir: &Path) -> PathBuf {
        let p = params();
        let mut optimizer = Optimizer::new(OptimizerKind::adamw(0.0));
        let p = optimizer.step(&p, &p, 0.1).unwrap();
        let p = optimizer.step(&p, &p, 0.1).unwrap();
        let state = CheckpointState {
            iteration: 3,
            optimizer_steps: 2,
            best_val_score: Some(0.5),
            validations_since_best: 1,
            model: "tiny".into(),
            lora_rank: 2,
            n_way: 2,
            config: "seed: 1\n".into(),
            loss_scaler: Some(LossScaler::new(1024.0, 4).unwrap()),
            mlflow_run_id: None,
        };
        let ck = dir.join("ck");
        save_checkpoint(&ck, &p, &optimizer, &state).unwrap();
        ck
    }

    /// `state.json` of `ck` with `field` set to the JSON `value`.
    fn set_state(ck: &Path, field: &str, value: serde_json::Value) {
        let path = ck.join(STATE);
        let mut json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let (outer, inner) = field.split_once('.').unwrap_or((field, ""));
        if inner.is_empty() {
            json[outer] = value;
        } else {
            json[outer][inner] = value;
        }
        std::fs::write(&path, serde_json::to_vec(&json).unwrap()).unwrap();
    }

    fn format_error_naming(result: Result<Checkpoint>, file: &str) -> String {
        match result {
            Err(e @ Error::Format { .. }) => {
                let text = e.to_string();
                assert!(text.contains(file), "{text}");
                text
            }
            other => panic!("expected a format error naming {file}, got {other:?}"),
        }
    }

    #[test]
    fn an_intact_checkpoint_loads() {
        let dir = tempfile::tempdir().unwrap();
        let ck = written(dir.path());
        let loaded = load_checkpoint(&ck, &params()).unwrap();
        assert_eq!(loaded.state.iteration, 3);
        assert!(loaded.moments.is_some());
    }

    /// Counts that no run writes used to overflow later (`step += 1`,
    /// `stale += 1`, `start × meta_batch`) or wrap (`step as i32`).
    #[test]
    fn state_counts_beyond_the_iterations_are_format_errors() {
        let dir = tempfile::tempdir().unwrap();
        for (field, value, expected) in [
            (
                "optimizer_steps",
                serde_json::json!(u64::MAX),
                "optimizer_steps",
            ),
            ("optimizer_steps", serde_json::json!(4), "optimizer_steps"),
            (
                "validations_since_best",
                serde_json::json!(usize::MAX),
                "validations_since_best",
            ),
            (
                "loss_scaler.skipped_steps",
                serde_json::json!(usize::MAX),
                "skipped",
            ),
        ] {
            let ck = written(dir.path());
            set_state(&ck, field, value);
            let text = format_error_naming(load_checkpoint(&ck, &params()), "state.json");
            assert!(
                text.contains(expected) && text.contains("damaged"),
                "{text}"
            );
        }
    }

    #[test]
    fn a_loss_scale_of_zero_negative_or_below_the_minimum_is_a_format_error() {
        let dir = tempfile::tempdir().unwrap();
        for (field, value) in [
            ("loss_scaler.scale", serde_json::json!(0.0)),
            ("loss_scaler.scale", serde_json::json!(-1024.0)),
            ("loss_scaler.scale", serde_json::json!(0.25)),
            ("loss_scaler.scale", serde_json::Value::Null),
            ("loss_scaler.growth_interval", serde_json::json!(0)),
            ("loss_scaler.good_steps", serde_json::json!(usize::MAX)),
        ] {
            let ck = written(dir.path());
            set_state(&ck, field, value.clone());
            let text = format_error_naming(load_checkpoint(&ck, &params()), "state.json");
            // serde names a wrong type itself; the scaler's checks name the scaler.
            assert!(
                text.contains("loss scaler") || value.is_null(),
                "{field} = {value}: {text}"
            );
            assert!(read_checkpoint_state(&ck).is_err());
        }
    }

    #[test]
    fn truncated_or_corrupt_tensor_files_are_format_errors_naming_them() {
        let dir = tempfile::tempdir().unwrap();
        for file in [PARAMS, OPTIMIZER] {
            for cut in [0, 7, 8, 20, 100] {
                let ck = written(dir.path());
                let bytes = std::fs::read(ck.join(file)).unwrap();
                std::fs::write(ck.join(file), &bytes[..cut.min(bytes.len() - 1)]).unwrap();
                format_error_naming(load_checkpoint(&ck, &params()), file);
            }
        }
        // A state.json that is not JSON, or misses a field.
        let ck = written(dir.path());
        std::fs::write(ck.join(STATE), b"{\"iteration\": 3,").unwrap();
        format_error_naming(load_checkpoint(&ck, &params()), "state.json");
        std::fs::write(ck.join(STATE), b"{\"iteration\": 3}").unwrap();
        format_error_naming(load_checkpoint(&ck, &params()), "state.json");
        // No params.safetensors: an I/O error naming it.
        let ck = written(dir.path());
        std::fs::remove_file(ck.join(PARAMS)).unwrap();
        let err = load_checkpoint(&ck, &params()).unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "{err:?}");
        assert!(err.to_string().contains(PARAMS), "{err}");
    }

    /// Optimiser moments of another shape used to load and fail only at the first
    /// step, as a mismatch not naming the file.
    #[test]
    fn optimizer_moments_of_another_shape_are_format_errors() {
        let dir = tempfile::tempdir().unwrap();
        let ck = written(dir.path());
        let wrong = ParamSet::from_pairs([
            (
                "m.a",
                Tensor::zeros((2, 2), candle_core::DType::F32, &Device::Cpu).unwrap(),
            ),
            (
                "m.b",
                Tensor::zeros((2, 1), candle_core::DType::F32, &Device::Cpu).unwrap(),
            ),
            (
                "v.a",
                Tensor::zeros((2, 2), candle_core::DType::F32, &Device::Cpu).unwrap(),
            ),
            (
                "v.b",
                Tensor::zeros((1, 2), candle_core::DType::F32, &Device::Cpu).unwrap(),
            ),
        ])
        .unwrap();
        wrong.save(&ck.join(OPTIMIZER)).unwrap();
        let text = format_error_naming(load_checkpoint(&ck, &params()), OPTIMIZER);
        assert!(text.contains("`m.b` has shape [2, 1]"), "{text}");
        let missing = ParamSet::from_pairs([(
            "m.a",
            Tensor::zeros((2, 2), candle_core::DType::F32, &Device::Cpu).unwrap(),
        )])
        .unwrap();
        missing.save(&ck.join(OPTIMIZER)).unwrap();
        let text = format_error_naming(load_checkpoint(&ck, &params()), OPTIMIZER);
        assert!(text.contains("no tensor `m.b`"), "{text}");
    }
}
