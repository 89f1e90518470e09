//! A transformer's architecture apart from its weights: the family and the
//! `config.json`-style value that sizes it, for a built-in model or a model folder.
//! The memory planner builds the same architecture with fewer layers and random
//! weights to measure it (`plan`).

use std::path::Path;

use candle_core::Device;

use super::load::{build, builtin_config, unsupported, ConfigJson, SUPPORTED_FAMILIES};
use super::{FewShotModel, LoraSettings, ModelPrecision, Weights};
use crate::{Error, Result};

/// A transformer family's configuration value, where it came from, and the key
/// that counts its layers.
#[derive(Debug, Clone)]
pub struct Architecture {
    family: &'static str,
    config: serde_json::Value,
    origin: String,
}

/// The `config.json` key that holds each family's number of layers.
fn layer_key(family: &str) -> &'static str {
    match family {
        "bert" => "num_hidden_layers",
        "distilbert" => "n_layers",
        "gpt2" => "n_layer",
        _ => "num_layers",
    }
}

impl Architecture {
    /// The architecture of a built-in transformer; `None` for the built-in dense
    /// models (`conv4`, `mlp`) and for names that are not built in.
    pub fn builtin(name: &str) -> Option<Self> {
        let (family, config) = builtin_config(name)?;
        Some(Architecture {
            family,
            config,
            origin: name.to_owned(),
        })
    }

    /// The architecture of the configured transformer: `model.path`'s
    /// `config.json`, or the built-in `model.name`; `None` for the dense built-in
    /// models (Conv4, MLP).
    pub fn from_config(config: &crate::config::Config) -> Result<Option<Self>> {
        match &config.model.path {
            Some(dir) => Self::from_directory(dir).map(Some),
            None => Ok(Self::builtin(&config.model.name)),
        }
    }

    /// The architecture a model folder's `config.json` describes.
    pub fn from_directory(dir: &Path) -> Result<Self> {
        let file = ConfigJson::in_dir(dir)?;
        let origin = file.path().display().to_string();
        let kind = file.model_type().to_owned();
        let family = SUPPORTED_FAMILIES
            .iter()
            .copied()
            .find(|f| *f == kind)
            .ok_or_else(|| unsupported(&kind, &origin))?;
        let config = file.into_value();
        Ok(Architecture {
            family,
            config,
            origin,
        })
    }

    /// The model family (`model_type`): bert, distilbert, gpt2 or t5.
    pub fn family(&self) -> &'static str {
        self.family
    }

    /// The number of layers of the stack.
    pub fn layers(&self) -> Result<usize> {
        let key = layer_key(self.family);
        self.config
            .get(key)
            .and_then(serde_json::Value::as_u64)
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| {
                Error::Model(format!(
                    "{} has no layer count `{key}` (a non-negative integer)",
                    self.origin
                ))
            })
    }

    /// The longest sequence its position table covers; `None` for T5, whose
    /// relative positions take any length (or a `config.json` without the key,
    /// which loading the model reports).
    pub fn max_positions(&self) -> Option<usize> {
        let key = match self.family {
            "bert" | "distilbert" => "max_position_embeddings",
            "gpt2" => "n_positions",
            _ => return None,
        };
        self.config
            .get(key)
            .and_then(serde_json::Value::as_u64)
            .and_then(|n| usize::try_from(n).ok())
    }

    /// The same architecture with `layers` layers.
    pub fn with_layers(&self, layers: usize) -> Self {
        let mut reduced = self.clone();
        if let Some(fields) = reduced.config.as_object_mut() {
            fields.insert(layer_key(self.family).into(), layers.into());
        }
        reduced
    }

    /// The model of this architecture with seeded random frozen weights in
    /// `precision` on `device`, LoRA and a head for `classes` classes: the shapes,
    /// dtypes and storage of a loaded model, without its values.
    pub fn build_random(
        &self,
        seed: u64,
        precision: ModelPrecision,
        lora: Option<LoraSettings>,
        classes: usize,
        device: &Device,
    ) -> Result<Box<dyn FewShotModel>> {
        precision.validate()?;
        let weights = Weights::random(seed, precision.frozen, device).with_precision(precision)?;
        build(
            self.family,
            self.config.clone(),
            weights,
            lora,
            classes,
            &self.origin,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_architecture_is_rebuilt_with_fewer_layers() {
        for name in ["tiny-bert", "tiny-distilbert", "tiny-gpt2", "tiny-t5"] {
            let architecture = Architecture::builtin(name).unwrap();
            assert_eq!(architecture.layers().unwrap(), 2, "{name}");
            let one = architecture.with_layers(1);
            assert_eq!(one.layers().unwrap(), 1);
            let model = one
                .build_random(
                    1,
                    ModelPrecision::from(candle_core::DType::F32),
                    None,
                    3,
                    &Device::Cpu,
                )
                .unwrap();
            assert_eq!(model.transformer().unwrap().num_layers(), 1, "{name}");
        }
        assert!(Architecture::builtin("conv4").is_none());
    }

    /// The full-size built-ins have their published models' shapes: the layer
    /// count, and in one layer the width (LoRA of rank 4 on the default targets:
    /// BERT's query and value, 768 → 768; GPT-2's fused c_attn, 1024 → 3072) and
    /// the head.
    #[test]
    fn the_shaped_builtins_have_their_models_shapes() {
        let lora = crate::models::LoraSettings {
            spec: crate::nn::LoraSpec {
                rank: 4,
                alpha: 8.0,
                dropout: 0.0,
            },
            target_modules: None,
            init: crate::nn::LoraInit::Peft { seed: 0 },
        };
        for (name, layers, adapter, width) in [
            ("bert-base-shaped", 12, 2 * (768 * 4 + 4 * 768), 768),
            ("gpt2-medium-shaped", 24, 1024 * 4 + 4 * 3072, 1024),
        ] {
            let architecture = Architecture::builtin(name).unwrap();
            assert_eq!(architecture.layers().unwrap(), layers, "{name}");
            let model = architecture
                .with_layers(1)
                .build_random(
                    1,
                    ModelPrecision::from(candle_core::DType::F32),
                    Some(lora.clone()),
                    3,
                    &Device::Cpu,
                )
                .unwrap();
            let params = model.init_params(1).unwrap();
            assert_eq!(params.numel(), adapter + width * 3 + 3, "{name}");
        }
    }
}
