//! BERT-family encoders (BERT, MiniLM): word + position + token-type embeddings,
//! post-LN transformer layers, masked mean pooling, classification head.

use std::path::Path;

use serde::Deserialize;

use super::attention::check_heads_divide;
use super::load::ConfigJson;
use super::post_ln::{PostLnConfig, PostLnEncoder, PostLnNames, PostLnShape};
use super::{Activation, FamilyConventions, Pooling};
use crate::Result;

/// LoRA targets when the configuration names none (PEFT's default for BERT).
pub const DEFAULT_TARGETS: &[&str] = &["query", "value"];

/// The keys of a Hugging Face `BertConfig` (`config.json`) that the model uses.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct BertConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Width of the hidden states.
    pub hidden_size: usize,
    /// Number of transformer layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    pub num_attention_heads: usize,
    /// Width of the feed-forward layer.
    pub intermediate_size: usize,
    /// Longest sequence the position embeddings cover.
    pub max_position_embeddings: usize,
    /// Number of token types (segments).
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    /// Layer-norm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// Feed-forward activation (`gelu` for BERT and MiniLM).
    #[serde(default = "default_act")]
    pub hidden_act: String,
}

fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_act() -> String {
    "gelu".into()
}

impl BertConfig {
    /// Reads a Hugging Face `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        ConfigJson::typed(path, "BERT")
    }

    /// Refuses a width that the heads do not divide.
    pub(crate) fn validate(&self) -> Result<()> {
        check_heads_divide(
            ("hidden_size", self.hidden_size),
            ("num_attention_heads", self.num_attention_heads),
        )
    }
}

impl PostLnConfig for BertConfig {
    const FAMILY: FamilyConventions = FamilyConventions {
        name: "bert",
        pooling: Pooling::MaskedMean,
        default_targets: DEFAULT_TARGETS,
        fan_in_fan_out: false,
    };
    const LAYER_PREFIX: &'static str = "encoder.layer";
    const LAYER_NAMES: PostLnNames = PostLnNames {
        query: "attention.self.query",
        key: "attention.self.key",
        value: "attention.self.value",
        attention_output: "attention.output.dense",
        attention_norm: "attention.output.LayerNorm",
        intermediate: "intermediate.dense",
        output: "output.dense",
        output_norm: "output.LayerNorm",
    };

    fn shape(&self) -> Result<PostLnShape> {
        self.validate()?;
        Ok(PostLnShape {
            vocab: self.vocab_size,
            width: self.hidden_size,
            layers: self.num_hidden_layers,
            heads: self.num_attention_heads,
            ffn: self.intermediate_size,
            max_positions: self.max_position_embeddings,
            type_vocab: Some(self.type_vocab_size),
            eps: self.layer_norm_eps,
            activation: Activation::from_hf(&self.hidden_act)?,
        })
    }
}

/// A BERT-family encoder (BERT, MiniLM) with LoRA and a classification head on masked
/// mean pooling, built from Hugging Face `BertModel` names.
pub type Bert = PostLnEncoder<BertConfig>;
