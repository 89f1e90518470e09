//! Building a model by name: a built-in tiny model (random, seeded; no download) or a
//! Hugging Face model directory (`config.json` + `model.safetensors`). Both go
//! through one path: a family name, a `config.json`-style value and the weights.

use std::path::{Path, PathBuf};

use candle_core::Device;
use serde::de::DeserializeOwned;
use serde_json::json;

use super::bert::Bert;
use super::convnet::ConvNetConfig;
use super::distilbert::DistilBert;
use super::gpt2::Gpt2;
use super::mlp::Mlp;
use super::t5::T5Encoder;
use super::vision::ImageShape;
use super::{FewShotModel, LoraSettings, ModelPrecision, Weights};
use crate::config::Backbone;
use crate::{Error, Result};

/// Built-in models: name, description.
pub const BUILTIN_MODELS: &[(&str, &str)] = &[
    (
        "tiny-bert",
        "BERT/MiniLM-shaped encoder: 2 layers, width 64, 4 heads, FFN 128, vocab 1000",
    ),
    (
        "tiny-distilbert",
        "DistilBERT-shaped encoder: 2 layers, width 64, 4 heads, FFN 128, vocab 1000",
    ),
    (
        "tiny-gpt2",
        "GPT-2-shaped decoder: 2 layers, width 64, 4 heads, MLP 256, vocab 1000",
    ),
    (
        "tiny-t5",
        "T5 encoder: 2 layers, width 64, 4 heads of 16, gated-GELU FFN 128, vocab 1000",
    ),
    (
        "minilm-shaped",
        "all-MiniLM-L6-v2's architecture with random weights (for memory and speed \
         measurements): 6 layers, width 384, 12 heads, FFN 1536, vocab 30522, 512 positions",
    ),
    (
        "bert-base-shaped",
        "BERT-base's architecture with random weights (for GPU memory and speed \
         measurements): 12 layers, width 768, 12 heads, FFN 3072, vocab 30522, 512 positions",
    ),
    (
        "gpt2-medium-shaped",
        "GPT-2 medium's architecture with random weights (for GPU memory and speed \
         measurements): 24 layers, width 1024, 16 heads, MLP 4096, vocab 50257, 1024 \
         positions",
    ),
    (
        "conv4",
        "Conv4 for images of data.image_size pixels (28 by default, at least 16): 4 blocks \
         of 3×3 convolution, BatchNorm, ReLU and 2×2 max-pooling, 64 channels (all \
         parameters trainable)",
    ),
    (
        "conv6",
        "Conv6: Conv4 with two more blocks that keep the size (at least 16 pixels)",
    ),
    (
        "resnet12",
        "ResNet-12, the few-shot standard: 4 residual blocks of 64, 160, 320, 640 channels \
         with leaky ReLU and 2×2 max-pooling, global average pooling (at least 16 pixels)",
    ),
    (
        "resnet18",
        "ResNet-18: 7×7/2 stem, 4 stages of 2 basic blocks of 64-128-256-512 channels, \
         global average pooling (torchvision's parameter names)",
    ),
    (
        "resnet34",
        "ResNet-34: ResNet-18 with stages of 3, 4, 6, 3 blocks (the FS-CT reference \
         project's backbone)",
    ),
    (
        "mlp",
        "MAML's sinusoid network: one input per feature (1 for the sinusoid, the table's \
         width for tabular data), 2 hidden layers of 40 with ReLU, one output per class (1 \
         for regression); all parameters trainable",
    ),
];

/// Inputs of the built-in `mlp` (the sinusoid's x).
pub(crate) const MLP_INPUTS: usize = 1;
/// Hidden widths of the built-in `mlp` (MAML's sinusoid network).
pub(crate) const MLP_HIDDEN: &[usize] = &[40, 40];

/// Model families read from a Hugging Face directory (`model_type` in `config.json`).
pub const SUPPORTED_FAMILIES: &[&str] = &["bert", "distilbert", "gpt2", "t5"];

/// The `config.json` of a built-in transformer, with its family.
pub(crate) fn builtin_config(name: &str) -> Option<(&'static str, serde_json::Value)> {
    Some(match name {
        "tiny-bert" => (
            "bert",
            json!({"vocab_size": 1000, "hidden_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "intermediate_size": 128, "max_position_embeddings": 128}),
        ),
        "tiny-distilbert" => (
            "distilbert",
            json!({"vocab_size": 1000, "dim": 64, "n_layers": 2,
            "n_heads": 4, "hidden_dim": 128, "max_position_embeddings": 128}),
        ),
        "tiny-gpt2" => (
            "gpt2",
            json!({"vocab_size": 1000, "n_embd": 64, "n_layer": 2, "n_head": 4,
            "n_positions": 128}),
        ),
        "tiny-t5" => (
            "t5",
            json!({"vocab_size": 1000, "d_model": 64, "d_kv": 16, "d_ff": 128,
            "num_layers": 2, "num_heads": 4, "feed_forward_proj": "gated-gelu"}),
        ),
        "minilm-shaped" => (
            "bert",
            json!({"vocab_size": 30522, "hidden_size": 384, "num_hidden_layers": 6,
            "num_attention_heads": 12, "intermediate_size": 1536,
            "max_position_embeddings": 512}),
        ),
        "bert-base-shaped" => (
            "bert",
            json!({"vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12,
            "num_attention_heads": 12, "intermediate_size": 3072,
            "max_position_embeddings": 512}),
        ),
        "gpt2-medium-shaped" => (
            "gpt2",
            json!({"vocab_size": 50257, "n_embd": 1024, "n_layer": 24, "n_head": 16,
            "n_positions": 1024}),
        ),
        _ => return None,
    })
}

pub(crate) fn unsupported(family: &str, origin: &str) -> Error {
    Error::Model(format!(
        "unsupported architecture `{family}` in {origin}; supported model_type values: {}",
        SUPPORTED_FAMILIES.join(", ")
    ))
}

/// The name of the file in a Hugging Face model folder that describes the model.
pub const CONFIG_FILE: &str = "config.json";

/// A model folder's `config.json`, read as JSON. It is the one reader of that file
/// (the families' typed configs read through [`ConfigJson::typed`]), so that a
/// missing file or one that does not parse is reported the same way everywhere,
/// naming the file.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigJson {
    path: PathBuf,
    value: serde_json::Value,
}

impl ConfigJson {
    /// The `config.json` of the model folder `dir`.
    pub fn in_dir(dir: &Path) -> Result<Self> {
        Self::read(&dir.join(CONFIG_FILE))
    }

    /// The `config.json`-style file at `path`: an I/O error naming it when it cannot
    /// be read, a format error naming it when it is not JSON.
    pub fn read(path: &Path) -> Result<Self> {
        Ok(Self {
            path: path.to_path_buf(),
            value: read_json(path, |e| format!("not JSON: {e}"))?,
        })
    }

    /// The file at `path` as one family's typed config `T` (`family` names it in the
    /// error: "not a BERT config: …").
    pub fn typed<T: DeserializeOwned>(path: &Path, family: &str) -> Result<T> {
        read_json(path, |e| format!("not a {family} config: {e}"))
    }

    /// Where the file was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The `model_type` key (the family), empty when absent or not a string, which no
    /// family matches.
    pub fn model_type(&self) -> &str {
        self.value
            .get("model_type")
            .and_then(|v| v.as_str())
            .unwrap_or("")
    }

    /// The whole file's value.
    pub fn value(&self) -> &serde_json::Value {
        &self.value
    }

    /// The whole file's value, owned.
    pub fn into_value(self) -> serde_json::Value {
        self.value
    }
}

/// The JSON file at `path` as a `T`; `describe` words the format error of a file that
/// does not parse as one.
fn read_json<T: DeserializeOwned>(
    path: &Path,
    describe: impl FnOnce(serde_json::Error) -> String,
) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Format {
        path: path.into(),
        message: describe(e),
    })
}

/// A transformer of `family` from its `config.json` value and weights.
pub(crate) fn build(
    family: &str,
    config: serde_json::Value,
    weights: Weights,
    lora: Option<LoraSettings>,
    classes: usize,
    origin: &str,
) -> Result<Box<dyn FewShotModel>> {
    /// The model `new` makes of `config` parsed as the family's typed config `C`.
    fn boxed<C: DeserializeOwned, M: FewShotModel + 'static>(
        (family, origin): (&str, &str),
        config: serde_json::Value,
        new: impl FnOnce(C) -> Result<M>,
    ) -> Result<Box<dyn FewShotModel>> {
        let config = serde_json::from_value(config)
            .map_err(|e| Error::Model(format!("{origin} is not a valid {family} config: {e}")))?;
        Ok(Box::new(new(config)?))
    }
    let names = (family, origin);
    match family {
        "bert" => boxed(names, config, |c| Bert::new(c, weights, lora, classes)),
        "distilbert" => boxed(names, config, |c| {
            DistilBert::new(c, weights, lora, classes)
        }),
        "gpt2" => boxed(names, config, |c| Gpt2::new(c, weights, lora, classes)),
        "t5" => boxed(names, config, |c| T5Encoder::new(c, weights, lora, classes)),
        other => Err(unsupported(other, origin)),
    }
}

/// Input sizes of the built-in models that read dense inputs; transformers ignore
/// them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BuiltinInputs {
    /// Side of the vision backbones' square images (28 for Omniglot and MNIST).
    pub image_size: usize,
    /// Colour channels of their images (1 grey, 3 RGB).
    pub image_channels: usize,
    /// Features of each row the `mlp` reads (1: the sinusoid's x).
    pub features: usize,
}

impl Default for BuiltinInputs {
    fn default() -> Self {
        Self {
            image_size: ConvNetConfig::default().image_size,
            image_channels: ConvNetConfig::default().in_channels,
            features: MLP_INPUTS,
        }
    }
}

/// A built-in model with seeded random weights and a head for `classes` classes
/// (`lora` is ignored by `conv4` and `mlp`, whose parameters are all trainable), in
/// `precision`: a dtype for everything, or a [`ModelPrecision`] (mixed precision,
/// int8 base). `conv4` reads 28×28 images and `mlp` one input; see
/// [`builtin_with_inputs`] for other sizes.
pub fn builtin(
    name: &str,
    seed: u64,
    precision: impl Into<ModelPrecision>,
    lora: Option<LoraSettings>,
    classes: usize,
) -> Result<Box<dyn FewShotModel>> {
    builtin_with_inputs(
        name,
        seed,
        precision,
        lora,
        classes,
        BuiltinInputs::default(),
    )
}

/// [`builtin`] with `conv4`'s image size and the `mlp`'s input width given.
pub fn builtin_with_inputs(
    name: &str,
    seed: u64,
    precision: impl Into<ModelPrecision>,
    lora: Option<LoraSettings>,
    classes: usize,
    inputs: BuiltinInputs,
) -> Result<Box<dyn FewShotModel>> {
    builtin_on(name, seed, precision, lora, classes, inputs, &Device::Cpu)
}

/// [`builtin_with_inputs`] with every tensor made on `device` (the same seeded
/// values on every device).
pub fn builtin_on(
    name: &str,
    seed: u64,
    precision: impl Into<ModelPrecision>,
    lora: Option<LoraSettings>,
    classes: usize,
    inputs: BuiltinInputs,
    device: &Device,
) -> Result<Box<dyn FewShotModel>> {
    let precision = precision.into();
    precision.validate()?;
    let backbone = Backbone::from_name(name);
    if let Some(backbone) = backbone {
        let shape = ImageShape {
            channels: inputs.image_channels,
            side: inputs.image_size,
        };
        return backbone.build(shape, classes, precision, device);
    }
    if name == "mlp" && precision.is_mixed() {
        return Err(Error::Model(format!(
            "{name} has no frozen base (every parameter is trained): mixed precision and \
             int8 storage apply to transformers and vision backbones; use \
             memory_optimization.precision: f32 and model.quantization: none with {name}"
        )));
    }
    if name == "mlp" {
        return Ok(Box::new(Mlp::new(
            inputs.features,
            MLP_HIDDEN,
            classes,
            precision.frozen,
            device,
        )?));
    }
    let Some((family, config)) = builtin_config(name) else {
        return Err(Error::Model(format!(
            "unknown built-in model `{name}`; built-in models: {}",
            BUILTIN_MODELS
                .iter()
                .map(|(n, _)| *n)
                .collect::<Vec<_>>()
                .join(", ")
        )));
    };
    let weights = Weights::random(seed, precision.frozen, device).with_precision(precision)?;
    build(family, config, weights, lora, classes, name)
}

/// A pre-trained model from a local Hugging Face directory holding `config.json` and
/// `model.safetensors`, in `precision` (a dtype, or a [`ModelPrecision`]), with LoRA
/// and a head for `classes` classes.
pub fn from_directory(
    dir: &Path,
    precision: impl Into<ModelPrecision>,
    lora: Option<LoraSettings>,
    classes: usize,
) -> Result<Box<dyn FewShotModel>> {
    from_directory_on(dir, precision, lora, classes, &Device::Cpu)
}

/// [`from_directory`] with the weights read onto `device`.
pub fn from_directory_on(
    dir: &Path,
    precision: impl Into<ModelPrecision>,
    lora: Option<LoraSettings>,
    classes: usize,
    device: &Device,
) -> Result<Box<dyn FewShotModel>> {
    let precision = precision.into();
    precision.validate()?;
    if !dir.is_dir() {
        return Err(Error::Model(format!(
            "model directory {} does not exist (expected config.json and model.safetensors there)",
            dir.display()
        )));
    }
    let config = ConfigJson::in_dir(dir)?;
    let family = config.model_type().to_string();
    let origin = config.path().display().to_string();
    if !SUPPORTED_FAMILIES.contains(&family.as_str()) {
        return Err(unsupported(&family, &origin));
    }
    let weights_path = dir.join("model.safetensors");
    if !weights_path.exists() {
        return Err(Error::Model(format!(
            "{} not found; melora reads safetensors weights only (convert a pytorch_model.bin \
             with `safetensors`' convert script)",
            weights_path.display()
        )));
    }
    let weights = Weights::from_safetensors(&weights_path, precision.frozen, device)?
        .with_precision(precision)?;
    build(
        &family,
        config.into_value(),
        weights,
        lora,
        classes,
        &origin,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Batch;
    use crate::nn::{LoraInit, LoraSpec, Mode};
    use candle_core::{DType, Tensor};

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
        for (name, _) in BUILTIN_MODELS
            .iter()
            // The *-shaped models are the tiny ones' families at full size: too slow
            // here (their shapes are checked by the planner's test below).
            .filter(|(n, _)| {
                Backbone::from_name(n).is_none() && *n != "mlp" && !n.ends_with("-shaped")
            })
        {
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

    /// The MiniLM-shaped built-in has all-MiniLM-L6-v2's shapes: with rank-4 LoRA on
    /// query and value, 6 layers × 2 adapters × (384·4 + 4·384) trainable values, plus
    /// a 384 → 3 head; features are 384 wide.
    #[test]
    fn minilm_shaped_has_minilm_shapes() {
        let model = builtin("minilm-shaped", 7, DType::F32, Some(lora()), 3).unwrap();
        let params = model.init_params(1).unwrap();
        assert_eq!(params.numel(), 6 * 2 * (384 * 4 + 4 * 384) + 384 * 3 + 3);
        let features = model.features(&params, &batch(), Mode::Eval).unwrap();
        assert_eq!(features.dims(), &[2, 384]);
    }

    /// Half-precision loading runs and stays close to f32 (the frozen base and the
    /// adapter in the same dtype; mixed precision proper is the memory engine's).
    #[test]
    fn half_precision_models_run_close_to_f32() {
        for name in ["tiny-bert", "tiny-distilbert", "tiny-gpt2", "tiny-t5"] {
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
                let max_abs =
                    |t: Tensor| -> f32 { t.abs().unwrap().max_all().unwrap().to_scalar().unwrap() };
                let diff = max_abs((features.to_dtype(DType::F32).unwrap() - &expected).unwrap());
                let scale = max_abs(expected.clone());
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
            err.contains("unsupported architecture `llama`")
                && err.contains("bert, distilbert, gpt2, t5"),
            "{err}"
        );
        std::fs::write(dir.path().join("config.json"), config).unwrap();
        std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
        let err = from_directory(dir.path(), DType::F32, None, 2)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("model.safetensors not found"), "{err}");
    }
}
