//! The `model` section: which network to adapt and how to read it.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::choice::choice_enum;
use super::validate::{at_least, non_empty};
use crate::Result;

choice_enum! {
    /// Floating-point type of the model's weights and computations.
    pub enum DType {
        /// 32-bit float.
        F32 = "f32",
        /// 64-bit float, for exact comparisons with reference values.
        F64 = "f64",
        /// bfloat16.
        Bf16 = "bf16",
        /// IEEE half precision.
        F16 = "f16",
    }
    default = F32;
}

choice_enum! {
    /// Storage of the frozen base's matrices.
    pub enum Quantization {
        /// Dense, in `model.dtype` (or `memory_optimization.precision`).
        None = "none",
        /// Linear weights and token-embedding tables in int8 with one scale per
        /// output channel, dequantized one layer at a time (QLoRA-style; the
        /// adapters stay in full precision). About a quarter of the f32 bytes;
        /// transformers only.
        Int8 = "int8",
    }
    default = None;
}

choice_enum! {
    /// How the classification head starts.
    pub enum HeadInit {
        /// The model's own: zero for the transformers' heads, `N(0, 0.02²)` for
        /// the vision backbones' and the MLP's.
        Model = "model",
        /// `W = 0`, `b = 0`: every class starts equal, and the first inner step
        /// acts as a nearest-centroid rule on the support features (the "zeroing
        /// trick" of Kao et al., 2022).
        Zero = "zero",
        /// `W ~ N(0, 1)`, `b = 0`, seeded: the head of MAML's reference code
        /// (Finn et al.'s TensorFlow `random_normal`, learn2learn's `normal_()`).
        Normal = "normal",
    }
    default = Model;
}

/// The `model` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// A built-in model (`tiny-bert`, `tiny-distilbert`, `tiny-gpt2`, `tiny-t5`,
    /// `minilm-shaped`, `bert-base-shaped`, `gpt2-medium-shaped`, the vision backbones
    /// `conv4`, `conv6`, `resnet12`, `resnet18`,
    /// `resnet34`, and `mlp`) or, with [`path`](Self::path), the Hugging Face
    /// family of a local model directory.
    pub name: String,
    /// Local Hugging Face model directory (`config.json`, safetensors weights,
    /// `tokenizer.json`); `None` for built-in models.
    pub path: Option<PathBuf>,
    /// Sequences are truncated or padded to this many tokens.
    pub max_length: usize,
    /// Type of the weights and computations; with mixed precision
    /// (`memory_optimization.precision` bf16 or f16) the type of the trainable
    /// tensors only, which must then be f32.
    pub dtype: DType,
    /// Storage of the frozen matrices.
    pub quantization: Quantization,
    /// How the classification head starts.
    pub head_init: HeadInit,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            name: "tiny-bert".to_owned(),
            path: None,
            max_length: 32,
            dtype: DType::F32,
            quantization: Quantization::None,
            head_init: HeadInit::Model,
        }
    }
}

impl ModelConfig {
    pub(crate) fn validate(&self) -> Result<()> {
        non_empty("model.name", &self.name)?;
        at_least("model.max_length", self.max_length, 1)
    }
}
