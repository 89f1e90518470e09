//! LoRA adapters as files in PEFT's format: `adapter_model.safetensors` (tensors named
//! `base_model.model.<module>.lora_A.weight`, …) and `adapter_config.json`.

use std::path::Path;

use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::tensor::ParamSet;
use crate::{Error, Result};

/// File name of the adapter's tensors.
pub const ADAPTER_WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// File name of the adapter's configuration.
pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";

/// PEFT's `adapter_config.json` for a LoRA adapter (the keys PEFT reads; others that
/// PEFT writes are accepted and ignored on load).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterConfig {
    /// Always `"LORA"`.
    pub peft_type: String,
    /// Rank.
    pub r: usize,
    /// Scale numerator: the update is scaled by `lora_alpha / r`.
    pub lora_alpha: f64,
    /// Dropout on the LoRA branch's input.
    pub lora_dropout: f64,
    /// Module names (suffixes) that carry an adapter, e.g. `["query", "value"]`.
    pub target_modules: Vec<String>,
    /// Whether the frozen weights are stored `[in, out]` (GPT-2's `Conv1D`).
    pub fan_in_fan_out: bool,
    /// The base model the adapter belongs to (a name or a local path).
    pub base_model_name_or_path: Option<String>,
    /// Which biases are trained: melora trains none (`"none"`).
    pub bias: String,
    /// Modules trained in full and saved beside the adapter (e.g. the classifier head).
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// PEFT's task type, if any.
    #[serde(default)]
    pub task_type: Option<String>,
    /// Whether the adapter was saved for inference.
    #[serde(default)]
    pub inference_mode: bool,
}

impl AdapterConfig {
    /// A LoRA adapter configuration with PEFT's conventions for the other keys.
    pub fn lora(
        r: usize,
        lora_alpha: f64,
        lora_dropout: f64,
        target_modules: Vec<String>,
        fan_in_fan_out: bool,
    ) -> Self {
        Self {
            peft_type: "LORA".into(),
            r,
            lora_alpha,
            lora_dropout,
            target_modules,
            fan_in_fan_out,
            base_model_name_or_path: None,
            bias: "none".into(),
            modules_to_save: None,
            task_type: None,
            inference_mode: true,
        }
    }
}

/// Writes `params` and `config` into `dir` as PEFT's two adapter files (each written
/// atomically).
pub fn save_adapter(dir: &Path, config: &AdapterConfig, params: &ParamSet) -> Result<()> {
    let config_path = dir.join(ADAPTER_CONFIG_FILE);
    let json = serde_json::to_vec_pretty(config).map_err(|e| Error::Format {
        path: config_path.clone(),
        message: e.to_string(),
    })?;
    params.save(&dir.join(ADAPTER_WEIGHTS_FILE))?;
    crate::io::write_atomic(&config_path, &json)
}

/// Reads an adapter saved by [`save_adapter`] or by PEFT from `dir`.
pub fn load_adapter(dir: &Path, device: &Device) -> Result<(AdapterConfig, ParamSet)> {
    let config_path = dir.join(ADAPTER_CONFIG_FILE);
    let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
    let config: AdapterConfig = serde_json::from_str(&text).map_err(|e| Error::Format {
        path: config_path.clone(),
        message: format!("not a PEFT adapter config: {e}"),
    })?;
    if config.peft_type != "LORA" {
        return Err(Error::Format {
            path: config_path,
            message: format!(
                "peft_type is `{}`; melora reads LoRA adapters only",
                config.peft_type
            ),
        });
    }
    let params = ParamSet::load(&dir.join(ADAPTER_WEIGHTS_FILE), device)?;
    Ok((config, params))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::gradcheck::random_tensor;

    #[test]
    fn round_trip_with_peft_keys() {
        let dir = std::env::temp_dir().join(format!("melora-adapter-{}", std::process::id()));
        let mut config =
            AdapterConfig::lora(8, 16.0, 0.1, vec!["query".into(), "value".into()], false);
        config.base_model_name_or_path = Some("sentence-transformers/all-MiniLM-L6-v2".into());
        config.modules_to_save = Some(vec!["classifier".into()]);
        let params = ParamSet::from_pairs([(
            "base_model.model.encoder.layer.0.attention.self.query.lora_A.weight",
            random_tensor(&[8, 4], 1, &Device::Cpu).unwrap(),
        )])
        .unwrap();
        save_adapter(&dir, &config, &params).unwrap();
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join(ADAPTER_CONFIG_FILE)).unwrap())
                .unwrap();
        for key in [
            "peft_type",
            "r",
            "lora_alpha",
            "lora_dropout",
            "target_modules",
            "fan_in_fan_out",
            "base_model_name_or_path",
        ] {
            assert!(json.get(key).is_some(), "missing key {key}");
        }
        let (back, loaded) = load_adapter(&dir, &Device::Cpu).unwrap();
        assert_eq!(back, config);
        assert_eq!(loaded.shapes(), params.shapes());
        std::fs::write(dir.join(ADAPTER_CONFIG_FILE), r#"{"peft_type": "IA3"}"#).unwrap();
        let err = load_adapter(&dir, &Device::Cpu).unwrap_err().to_string();
        assert!(err.contains(ADAPTER_CONFIG_FILE), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A config as PEFT writes it, with keys melora does not use.
    #[test]
    fn reads_peft_written_config() {
        let text = r#"{"alpha_pattern": {}, "auto_mapping": null, "base_model_name_or_path": "gpt2",
            "bias": "none", "fan_in_fan_out": true, "inference_mode": true, "init_lora_weights": true,
            "layers_pattern": null, "lora_alpha": 32, "lora_dropout": 0.05, "modules_to_save": null,
            "peft_type": "LORA", "r": 4, "rank_pattern": {}, "revision": null,
            "target_modules": ["c_attn", "c_proj"], "task_type": "CAUSAL_LM", "use_rslora": false}"#;
        let config: AdapterConfig = serde_json::from_str(text).unwrap();
        assert_eq!(config.r, 4);
        assert!(config.fan_in_fan_out);
        assert_eq!(config.lora_alpha, 32.0);
    }
}
