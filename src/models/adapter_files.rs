//! Saving and loading a model's trainable parameters as a PEFT adapter folder:
//! `adapter_model.safetensors` (LoRA tensors under PEFT's names, the head as PEFT's
//! `modules_to_save` under `base_model.model.classifier.*`) and `adapter_config.json`.

use std::path::Path;

use super::{FewShotModel, HEAD_BIAS, HEAD_WEIGHT};
use crate::nn::adapter::{load_adapter, save_adapter};
use crate::nn::lora::PEFT_PREFIX;
use crate::tensor::ParamSet;
use crate::{Error, Result};

/// The head's names inside a ParamSet and in PEFT's saved files.
fn head_names() -> [(String, String); 2] {
    [HEAD_WEIGHT, HEAD_BIAS].map(|n| (n.to_string(), format!("{PEFT_PREFIX}{n}")))
}

fn rename(params: &ParamSet, to_file: bool) -> Result<ParamSet> {
    let names = head_names();
    ParamSet::from_pairs(params.iter().map(|(n, t)| {
        let renamed = names
            .iter()
            .find_map(|(inner, file)| match to_file {
                true if n == inner => Some(file.clone()),
                false if n == file => Some(inner.clone()),
                _ => None,
            })
            .unwrap_or_else(|| n.to_string());
        (renamed, t.clone())
    }))
}

/// Writes `params` of `model` into `dir` as a PEFT adapter, recording
/// `base_model` (a name or path) as `base_model_name_or_path`.
pub fn save_model_adapter(
    dir: &Path,
    model: &dyn FewShotModel,
    params: &ParamSet,
    base_model: Option<&str>,
) -> Result<()> {
    let mut config = model
        .adapter_config()
        .ok_or_else(|| Error::InvalidArgument("the model has no LoRA adapter to save".into()))?;
    config.base_model_name_or_path = base_model.map(str::to_string);
    model.init_params(0)?.check_compatible(params)?;
    save_adapter(dir, &config, &rename(params, true)?)
}

/// Reads an adapter folder for `model`: its configuration must agree with the
/// model's (rank, alpha, targets, layout) and its tensors must have the model's names
/// and shapes; they come back in the model's order and dtype.
pub fn load_model_adapter(dir: &Path, model: &dyn FewShotModel) -> Result<ParamSet> {
    let expected = model.adapter_config().ok_or_else(|| {
        Error::InvalidArgument("the model has no LoRA adapter to load into".into())
    })?;
    let template = model.init_params(0)?;
    let (config, loaded) = load_adapter(
        dir,
        &template
            .iter()
            .next()
            .map(|(_, t)| t.device().clone())
            .unwrap_or(candle_core::Device::Cpu),
    )?;
    let mismatch = |what: &str, found: String, wanted: String| {
        Error::Params(format!(
            "adapter in {} has {what} {found}, the model is configured with {wanted}",
            dir.display()
        ))
    };
    if config.r != expected.r {
        return Err(mismatch(
            "rank",
            config.r.to_string(),
            expected.r.to_string(),
        ));
    }
    if config.lora_alpha != expected.lora_alpha {
        return Err(mismatch(
            "lora_alpha",
            config.lora_alpha.to_string(),
            expected.lora_alpha.to_string(),
        ));
    }
    if config.fan_in_fan_out != expected.fan_in_fan_out {
        return Err(mismatch(
            "fan_in_fan_out",
            config.fan_in_fan_out.to_string(),
            expected.fan_in_fan_out.to_string(),
        ));
    }
    let loaded = rename(&loaded, false)?;
    let mut params = ParamSet::new();
    for (name, t) in template.iter() {
        let found = loaded.get(name).ok_or_else(|| {
            Error::Params(format!(
                "adapter in {} has no tensor `{name}`",
                dir.display()
            ))
        })?;
        if found.dims() != t.dims() {
            return Err(Error::Params(format!(
                "adapter tensor `{name}` has shape {:?}, the model expects {:?}",
                found.dims(),
                t.dims()
            )));
        }
        params.insert(name, found.to_dtype(t.dtype())?)?;
    }
    if let Some(extra) = loaded.names().find(|n| template.get(n).is_none()) {
        return Err(Error::Params(format!(
            "adapter in {} has tensor `{extra}`, which the model does not have (targets {:?} vs {:?})",
            dir.display(),
            config.target_modules,
            expected.target_modules
        )));
    }
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::load::builtin;
    use crate::models::LoraSettings;
    use crate::nn::{LoraInit, LoraSpec};
    use candle_core::DType;

    fn settings(rank: usize) -> LoraSettings {
        LoraSettings {
            spec: LoraSpec {
                rank,
                alpha: 16.0,
                dropout: 0.1,
            },
            target_modules: None,
            init: LoraInit::Normal { seed: 0, std: 0.1 },
        }
    }

    #[test]
    fn round_trip_with_peft_names_and_config() {
        let dir = tempfile::tempdir().unwrap();
        let model = builtin("tiny-gpt2", 1, DType::F32, Some(settings(4)), 3).unwrap();
        let params = model.init_params(5).unwrap();
        save_model_adapter(dir.path(), model.as_ref(), &params, Some("tiny-gpt2")).unwrap();
        let config: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(config["r"], 4);
        assert_eq!(config["fan_in_fan_out"], true);
        assert_eq!(config["target_modules"], serde_json::json!(["c_attn"]));
        assert_eq!(config["base_model_name_or_path"], "tiny-gpt2");
        let raw = ParamSet::load(
            &dir.path().join("adapter_model.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        assert!(raw
            .get("base_model.model.h.0.attn.c_attn.lora_A.weight")
            .is_some());
        assert!(raw.get("base_model.model.classifier.weight").is_some());
        let back = load_model_adapter(dir.path(), model.as_ref()).unwrap();
        back.check_compatible(&params).unwrap();
        let diff = back.sub(&params).unwrap().norm().unwrap();
        assert_eq!(diff, 0.0);
    }

    #[test]
    fn a_mismatched_adapter_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let model = builtin("tiny-bert", 1, DType::F32, Some(settings(4)), 3).unwrap();
        save_model_adapter(
            dir.path(),
            model.as_ref(),
            &model.init_params(0).unwrap(),
            None,
        )
        .unwrap();
        let other = builtin("tiny-bert", 1, DType::F32, Some(settings(8)), 3).unwrap();
        let err = load_model_adapter(dir.path(), other.as_ref())
            .unwrap_err()
            .to_string();
        assert!(err.contains("rank 4") && err.contains("8"), "{err}");
        let no_lora = builtin("tiny-bert", 1, DType::F32, None, 3).unwrap();
        assert!(save_model_adapter(dir.path(), no_lora.as_ref(), &ParamSet::new(), None).is_err());
    }
}
