//! Building a model by name: a built-in tiny model (random, seeded; no download) or a
//! Hugging Face model directory (`config.json` + `model.safetensors`).

use std::path::Path;

use candle_core::{DType, Device};

use super::bert::{Bert, BertConfig};
use super::gpt2::{Gpt2, Gpt2Config};
use super::{FewShotModel, LoraSettings, Weights};
use crate::{Error, Result};

/// Built-in tiny models: names and what they are.
pub const BUILTIN_MODELS: &[(&str, &str)] = &[
    (
        "tiny-bert",
        "BERT/MiniLM-shaped encoder: 2 layers, width 64, 4 heads, FFN 128, vocab 1000",
    ),
    (
        "tiny-gpt2",
        "GPT-2-shaped decoder: 2 layers, width 64, 4 heads, MLP 256, vocab 1000",
    ),
];

/// Model families read from a Hugging Face directory (`model_type` in `config.json`).
pub const SUPPORTED_FAMILIES: &[&str] = &["bert", "gpt2"];

/// A built-in tiny model with seeded random weights and a head for `classes` classes.
pub fn builtin(
    name: &str,
    seed: u64,
    dtype: DType,
    lora: Option<LoraSettings>,
    classes: usize,
) -> Result<Box<dyn FewShotModel>> {
    let weights = Weights::random(seed, dtype, &Device::Cpu);
    match name {
        "tiny-bert" => {
            let config = BertConfig {
                vocab_size: 1000,
                hidden_size: 64,
                num_hidden_layers: 2,
                num_attention_heads: 4,
                intermediate_size: 128,
                max_position_embeddings: 128,
                type_vocab_size: 2,
                layer_norm_eps: 1e-12,
                hidden_act: "gelu".into(),
            };
            Ok(Box::new(Bert::new(config, weights, lora, classes)?))
        }
        "tiny-gpt2" => {
            let config = Gpt2Config {
                vocab_size: 1000,
                n_embd: 64,
                n_layer: 2,
                n_head: 4,
                n_positions: 128,
                n_inner: None,
                layer_norm_epsilon: 1e-5,
                activation_function: "gelu_new".into(),
            };
            Ok(Box::new(Gpt2::new(config, weights, lora, classes)?))
        }
        other => Err(Error::Model(format!(
            "unknown built-in model `{other}`; built-in models: {}",
            BUILTIN_MODELS
                .iter()
                .map(|(n, _)| *n)
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// A pre-trained model from a local Hugging Face directory holding `config.json` and
/// `model.safetensors`, in `dtype`, with LoRA and a head for `classes` classes.
pub fn from_directory(
    dir: &Path,
    dtype: DType,
    lora: Option<LoraSettings>,
    classes: usize,
) -> Result<Box<dyn FewShotModel>> {
    if !dir.is_dir() {
        return Err(Error::Model(format!(
            "model directory {} does not exist (expected config.json and model.safetensors there)",
            dir.display()
        )));
    }
    let config_path = dir.join("config.json");
    let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Format {
        path: config_path.clone(),
        message: format!("not JSON: {e}"),
    })?;
    let family = value
        .get("model_type")
        .and_then(|v| v.as_str())
        .unwrap_or("");
    let weights_path = dir.join("model.safetensors");
    if !weights_path.exists() {
        return Err(Error::Model(format!(
            "{} not found; melora reads safetensors weights only (convert a pytorch_model.bin \
             with `safetensors`' convert script)",
            weights_path.display()
        )));
    }
    let parse_error = |e: serde_json::Error| Error::Format {
        path: config_path.clone(),
        message: format!("not a {family} config: {e}"),
    };
    match family {
        "bert" => {
            let config: BertConfig = serde_json::from_value(value.clone()).map_err(parse_error)?;
            let weights = Weights::from_safetensors(&weights_path, dtype, &Device::Cpu)?;
            Ok(Box::new(Bert::new(config, weights, lora, classes)?))
        }
        "gpt2" => {
            let config: Gpt2Config = serde_json::from_value(value.clone()).map_err(parse_error)?;
            let weights = Weights::from_safetensors(&weights_path, dtype, &Device::Cpu)?;
            Ok(Box::new(Gpt2::new(config, weights, lora, classes)?))
        }
        other => Err(Error::Model(format!(
            "unsupported architecture `{other}` in {}; supported model_type values: {}",
            config_path.display(),
            SUPPORTED_FAMILIES.join(", ")
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Batch;
    use crate::nn::{LoraInit, LoraSpec, Mode};
    use candle_core::Tensor;

    fn lora() -> LoraSettings {
        LoraSettings {
            spec: LoraSpec {
                rank: 4,
                alpha: 8.0,
                dropout: 0.0,
            },
            target_modules: None,
            init: LoraInit::Peft { seed: 0 },
        }
    }

    fn batch() -> Batch {
        let dev = Device::Cpu;
        Batch::from_tokens(
            Tensor::new(&[[5u32, 17, 99, 0], [3, 4, 5, 6]], &dev).unwrap(),
            Tensor::new(&[[1u32, 1, 1, 0], [1, 1, 1, 1]], &dev).unwrap(),
            None,
            Tensor::new(&[0u32, 1], &dev).unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn builtin_models_run_and_are_seeded() {
        for (name, _) in BUILTIN_MODELS {
            let model = builtin(name, 7, DType::F32, Some(lora()), 3).unwrap();
            let params = model.init_params(1).unwrap();
            assert!(
                params.names().any(|n| n.ends_with("lora_A.weight")),
                "{name}"
            );
            let logits = model.logits(&params, &batch(), Mode::Eval).unwrap();
            assert_eq!(logits.dims(), &[2, 3]);
            let again = builtin(name, 7, DType::F32, Some(lora()), 3).unwrap();
            let logits2 = again
                .logits(&again.init_params(1).unwrap(), &batch(), Mode::Eval)
                .unwrap();
            assert_eq!(
                logits.to_vec2::<f32>().unwrap(),
                logits2.to_vec2::<f32>().unwrap(),
                "{name}"
            );
        }
        let err = builtin("tiny-llama", 0, DType::F32, None, 2)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("tiny-bert"), "{err}");
    }

    /// Half-precision loading runs and stays close to f32 (the frozen base and the
    /// adapter in the same dtype; mixed precision proper is the memory engine's).
    #[test]
    fn half_precision_models_run_close_to_f32() {
        for name in ["tiny-bert", "tiny-gpt2"] {
            let reference = builtin(name, 3, DType::F32, Some(lora()), 3).unwrap();
            // Features, not logits: a fresh head's logits are too small to compare.
            let expected = reference
                .features(&reference.init_params(2).unwrap(), &batch(), Mode::Eval)
                .unwrap();
            for dtype in [DType::BF16, DType::F16, DType::F64] {
                let model = builtin(name, 3, dtype, Some(lora()), 3).unwrap();
                let params = model.init_params(2).unwrap();
                assert!(params.iter().all(|(_, t)| t.dtype() == dtype));
                assert_eq!(
                    model.logits(&params, &batch(), Mode::Eval).unwrap().dtype(),
                    dtype
                );
                let features = model.features(&params, &batch(), Mode::Eval).unwrap();
                let diff = (features.to_dtype(DType::F32).unwrap() - &expected)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                let scale = expected
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(
                    scale > 0.5,
                    "{name}: features of order 1 expected, max {scale}"
                );
                let tolerance = if dtype == DType::F64 { 1e-5 } else { 3e-2 };
                assert!(
                    diff / scale < tolerance,
                    "{name} {dtype:?}: max |Δ| {diff} of {scale}"
                );
            }
        }
    }

    /// A directory with Hugging Face names round-trips: written from a built-in model's
    /// weights, read back with the right family, same logits.
    #[test]
    fn reads_a_hugging_face_directory_and_reports_bad_ones() {
        let dir = tempfile::tempdir().unwrap();
        let config = r#"{"model_type": "gpt2", "vocab_size": 50, "n_embd": 8, "n_layer": 1,
            "n_head": 2, "n_positions": 16, "layer_norm_epsilon": 1e-5,
            "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"]}"#;
        std::fs::write(dir.path().join("config.json"), config).unwrap();
        let random = Weights::random(3, DType::F32, &Device::Cpu);
        let mut tensors = std::collections::HashMap::new();
        let mut add = |name: &str, shape: &[usize]| {
            // GPT2LMHeadModel's prefix, which loading must see through.
            tensors.insert(
                format!("transformer.{name}"),
                random.get(name, shape).unwrap(),
            );
        };
        add("wte.weight", &[50, 8]);
        add("wpe.weight", &[16, 8]);
        add("ln_f.weight", &[8]);
        add("ln_f.bias", &[8]);
        for (n, s) in [
            ("ln_1.weight", vec![8]),
            ("ln_1.bias", vec![8]),
            ("ln_2.weight", vec![8]),
            ("ln_2.bias", vec![8]),
            ("attn.c_attn.weight", vec![8, 24]),
            ("attn.c_attn.bias", vec![24]),
            ("attn.c_proj.weight", vec![8, 8]),
            ("attn.c_proj.bias", vec![8]),
            ("mlp.c_fc.weight", vec![8, 32]),
            ("mlp.c_fc.bias", vec![32]),
            ("mlp.c_proj.weight", vec![32, 8]),
            ("mlp.c_proj.bias", vec![8]),
        ] {
            add(&format!("h.0.{n}"), &s);
        }
        candle_core::safetensors::save(&tensors, dir.path().join("model.safetensors")).unwrap();
        let model = from_directory(dir.path(), DType::F64, Some(lora()), 2).unwrap();
        let small = Batch::from_tokens(
            Tensor::new(&[[5u32, 17, 0]], &Device::Cpu).unwrap(),
            Tensor::new(&[[1u32, 1, 0]], &Device::Cpu).unwrap(),
            None,
            Tensor::new(&[1u32], &Device::Cpu).unwrap(),
        )
        .unwrap();
        let logits = model
            .logits(&model.init_params(0).unwrap(), &small, Mode::Eval)
            .unwrap();
        assert_eq!(logits.dims(), &[1, 2]);
        assert_eq!(logits.dtype(), DType::F64);

        let missing = dir.path().join("absent");
        assert!(from_directory(&missing, DType::F32, None, 2)
            .err()
            .unwrap()
            .to_string()
            .contains("does not exist"));
        std::fs::write(dir.path().join("config.json"), r#"{"model_type": "llama"}"#).unwrap();
        let err = from_directory(dir.path(), DType::F32, None, 2)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("unsupported architecture `llama`") && err.contains("bert, gpt2"),
            "{err}"
        );
        std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
        let err = from_directory(dir.path(), DType::F32, None, 2)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("model.safetensors not found"), "{err}");
    }
}
