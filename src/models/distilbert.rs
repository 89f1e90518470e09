//! DistilBERT encoders: word + position embeddings (no token types), post-LN
//! transformer layers, masked mean pooling, classification head.

use std::path::Path;

use serde::Deserialize;

use super::attention::check_heads_divide;
use super::load::ConfigJson;
use super::post_ln::{PostLnConfig, PostLnEncoder, PostLnNames, PostLnShape};
use super::{Activation, FamilyConventions, Pooling};
use crate::Result;

/// LoRA targets when the configuration names none (PEFT's default for DistilBERT).
pub const DEFAULT_TARGETS: &[&str] = &["q_lin", "v_lin"];

/// DistilBERT's layer norms use a fixed epsilon (not a config key).
const LAYER_NORM_EPS: f64 = 1e-12;

/// The keys of a Hugging Face `DistilBertConfig` (`config.json`) that the model uses.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct DistilBertConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Width of the hidden states.
    pub dim: usize,
    /// Number of transformer layers.
    pub n_layers: usize,
    /// Attention heads per layer.
    pub n_heads: usize,
    /// Width of the feed-forward layer.
    pub hidden_dim: usize,
    /// Longest sequence the position embeddings cover.
    pub max_position_embeddings: usize,
    /// Feed-forward activation (`gelu` for DistilBERT).
    #[serde(default = "default_act")]
    pub activation: String,
}

fn default_act() -> String {
    "gelu".into()
}

impl DistilBertConfig {
    /// Reads a Hugging Face `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        ConfigJson::typed(path, "DistilBERT")
    }

    /// Refuses a width that the heads do not divide.
    pub(crate) fn validate(&self) -> Result<()> {
        check_heads_divide(("dim", self.dim), ("n_heads", self.n_heads))
    }
}

impl PostLnConfig for DistilBertConfig {
    const FAMILY: FamilyConventions = FamilyConventions {
        name: "distilbert",
        pooling: Pooling::MaskedMean,
        default_targets: DEFAULT_TARGETS,
        fan_in_fan_out: false,
    };
    const LAYER_PREFIX: &'static str = "transformer.layer";
    const LAYER_NAMES: PostLnNames = PostLnNames {
        query: "attention.q_lin",
        key: "attention.k_lin",
        value: "attention.v_lin",
        attention_output: "attention.out_lin",
        attention_norm: "sa_layer_norm",
        intermediate: "ffn.lin1",
        output: "ffn.lin2",
        output_norm: "output_layer_norm",
    };

    fn shape(&self) -> Result<PostLnShape> {
        self.validate()?;
        Ok(PostLnShape {
            vocab: self.vocab_size,
            width: self.dim,
            layers: self.n_layers,
            heads: self.n_heads,
            ffn: self.hidden_dim,
            max_positions: self.max_position_embeddings,
            type_vocab: None,
            eps: LAYER_NORM_EPS,
            activation: Activation::from_hf(&self.activation)?,
        })
    }
}

/// A DistilBERT encoder with LoRA and a classification head on masked mean pooling,
/// built from Hugging Face `DistilBertModel` names.
pub type DistilBert = PostLnEncoder<DistilBertConfig>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::test_support::{
        check_logits_ignore_padding, check_loss_derivatives, lora, RandomWeights,
    };
    use crate::models::FewShotModel;

    const CLASSES: usize = 3;

    fn config() -> DistilBertConfig {
        serde_json::from_str(
            r#"{"vocab_size": 11, "dim": 8, "n_layers": 2, "n_heads": 2,
                "hidden_dim": 12, "max_position_embeddings": 6}"#,
        )
        .unwrap()
    }

    fn random_weights(config: &DistilBertConfig) -> RandomWeights {
        let (h, ff) = (config.dim, config.hidden_dim);
        let mut w = RandomWeights::default();
        w.add("embeddings.word_embeddings.weight", &[config.vocab_size, h]);
        w.add(
            "embeddings.position_embeddings.weight",
            &[config.max_position_embeddings, h],
        );
        w.add_gain("embeddings.LayerNorm.weight", h);
        w.add("embeddings.LayerNorm.bias", &[h]);
        for l in 0..config.n_layers {
            let p = format!("transformer.layer.{l}");
            for lin in ["q_lin", "k_lin", "v_lin", "out_lin"] {
                w.add(&format!("{p}.attention.{lin}.weight"), &[h, h]);
                w.add(&format!("{p}.attention.{lin}.bias"), &[h]);
            }
            w.add(&format!("{p}.ffn.lin1.weight"), &[ff, h]);
            w.add(&format!("{p}.ffn.lin1.bias"), &[ff]);
            w.add(&format!("{p}.ffn.lin2.weight"), &[h, ff]);
            w.add(&format!("{p}.ffn.lin2.bias"), &[h]);
            for norm in ["sa_layer_norm", "output_layer_norm"] {
                w.add_gain(&format!("{p}.{norm}.weight"), h);
                w.add(&format!("{p}.{norm}.bias"), &[h]);
            }
        }
        w
    }

    fn model() -> DistilBert {
        let dir = tempfile::tempdir().unwrap();
        let weights = random_weights(&config()).save_and_load(&dir);
        DistilBert::new(config(), weights, Some(lora(None)), CLASSES).unwrap()
    }

    #[test]
    fn logits_have_batch_by_classes_shape_and_ignore_padding() {
        check_logits_ignore_padding(&model(), CLASSES, "distilbert");
    }

    #[test]
    fn default_lora_targets_are_q_lin_and_v_lin() {
        let params = model().init_params(0).unwrap();
        for layer in 0..2 {
            for lin in ["q_lin", "v_lin"] {
                for ab in ["lora_A", "lora_B"] {
                    let name = format!(
                        "base_model.model.transformer.layer.{layer}.attention.{lin}.{ab}.weight"
                    );
                    assert!(params.get(&name).is_some(), "{name}");
                }
            }
        }
        assert!(params.names().all(|n| !n.contains("k_lin")));
        let dir = tempfile::tempdir().unwrap();
        let weights = random_weights(&config()).save_and_load(&dir);
        let err = DistilBert::new(
            config(),
            weights,
            Some(lora(Some(vec!["query".into()]))),
            CLASSES,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("`query` matches no module of distilbert") && err.contains("q_lin"),
            "{err}"
        );
    }

    #[test]
    fn loss_derivatives_match_finite_differences() {
        check_loss_derivatives(
            &model(),
            &[
                "base_model.model.transformer.layer.0.attention.q_lin.lora_A.weight",
                "base_model.model.transformer.layer.1.attention.v_lin.lora_B.weight",
            ],
        );
    }

    #[test]
    fn missing_weight_is_an_error_naming_it() {
        let mut w = random_weights(&config());
        w.remove("transformer.layer.1.ffn.lin2.bias");
        let dir = tempfile::tempdir().unwrap();
        let err = DistilBert::new(config(), w.save_and_load(&dir), None, CLASSES)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`transformer.layer.1.ffn.lin2.bias` is missing"),
            "{err}"
        );
    }
}
