//! DistilBERT encoders: word + position embeddings (no token types), post-LN
//! transformer layers, masked mean pooling, classification head.

use std::path::Path;

use candle_core::Tensor;
use serde::Deserialize;

use super::attention::{multi_head_attention, padding_keep};
use super::layers::{load_linear, FeedForward, Frozen, FrozenTable, LayerNorm};
use super::load::ConfigJson;
use super::{
    attach_lora, layer_at, Activation, ClassificationHead, ClassifierParts, LoraSettings, Pooling,
    StackContext, TransformerClassifier, Weights,
};
use crate::data::Batch;
use crate::nn::{LoraLinear, Mode};
use crate::tensor::ParamSet;
use crate::{Error, Result};

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
        if self.n_heads == 0 || !self.dim.is_multiple_of(self.n_heads) {
            return Err(Error::Model(format!(
                "dim {} is not a multiple of n_heads {}",
                self.dim, self.n_heads
            )));
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
struct DistilBertLayer {
    q_lin: LoraLinear,
    k_lin: LoraLinear,
    v_lin: LoraLinear,
    out_lin: LoraLinear,
    sa_layer_norm: LayerNorm,
    lin1: LoraLinear,
    lin2: LoraLinear,
    output_layer_norm: LayerNorm,
}

/// A DistilBERT encoder with LoRA and a classification head on masked mean pooling.
#[derive(Debug, Clone)]
pub struct DistilBert {
    config: DistilBertConfig,
    activation: Activation,
    word_embeddings: FrozenTable,
    position_embeddings: Frozen,
    embedding_norm: LayerNorm,
    layers: Vec<DistilBertLayer>,
    head: ClassificationHead,
    lora: Option<LoraSettings>,
    weights: Weights,
    /// Selective recomputation of the frozen base's attention cores and adapter-free
    /// feed-forward blocks ([`FewShotModel::set_selective_recompute`]).
    recompute: bool,
}

impl DistilBert {
    /// Builds the encoder from `weights` (Hugging Face `DistilBertModel` names), with
    /// LoRA on the layers `lora` selects and a head for `classes` classes.
    pub fn new(
        config: DistilBertConfig,
        weights: Weights,
        lora: Option<LoraSettings>,
        classes: usize,
    ) -> Result<Self> {
        config.validate()?;
        let activation = Activation::from_hf(&config.activation)?;
        let (h, ff) = (config.dim, config.hidden_dim);
        let mut layers = Vec::with_capacity(config.n_layers);
        for l in 0..config.n_layers {
            let p = format!("transformer.layer.{l}");
            let a = format!("{p}.attention");
            layers.push(DistilBertLayer {
                q_lin: load_linear(&weights, &format!("{a}.q_lin"), h, h)?,
                k_lin: load_linear(&weights, &format!("{a}.k_lin"), h, h)?,
                v_lin: load_linear(&weights, &format!("{a}.v_lin"), h, h)?,
                out_lin: load_linear(&weights, &format!("{a}.out_lin"), h, h)?,
                sa_layer_norm: LayerNorm::load(&weights, &format!("{p}.sa_layer_norm"), h)?,
                lin1: load_linear(&weights, &format!("{p}.ffn.lin1"), h, ff)?,
                lin2: load_linear(&weights, &format!("{p}.ffn.lin2"), ff, h)?,
                output_layer_norm: LayerNorm::load(&weights, &format!("{p}.output_layer_norm"), h)?,
            });
        }
        let mut model = Self {
            word_embeddings: FrozenTable::load(
                &weights,
                "embeddings.word_embeddings.weight",
                &[config.vocab_size, h],
            )?,
            position_embeddings: Frozen::load(
                &weights,
                "embeddings.position_embeddings.weight",
                &[config.max_position_embeddings, h],
            )?,
            embedding_norm: LayerNorm::load(&weights, "embeddings.LayerNorm", h)?,
            layers,
            head: ClassificationHead::new(h, classes),
            activation,
            config,
            lora: lora.clone(),
            weights: weights.without_tensors(),
            recompute: false,
        };
        attach_lora(
            "distilbert",
            model.linears_mut(),
            lora.as_ref(),
            DEFAULT_TARGETS,
        )?;
        Ok(model)
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &DistilBertConfig {
        &self.config
    }

    fn linears_mut(&mut self) -> Vec<&mut LoraLinear> {
        self.layers
            .iter_mut()
            .flat_map(|l| {
                [
                    &mut l.q_lin,
                    &mut l.k_lin,
                    &mut l.v_lin,
                    &mut l.out_lin,
                    &mut l.lin1,
                    &mut l.lin2,
                ]
            })
            .collect()
    }

    fn linears(&self) -> Vec<&LoraLinear> {
        self.layers
            .iter()
            .flat_map(|l| [&l.q_lin, &l.k_lin, &l.v_lin, &l.out_lin, &l.lin1, &l.lin2])
            .collect()
    }

    /// Final hidden states `[b, t, dim]` at `params`.
    pub fn hidden_states(&self, params: &ParamSet, batch: &Batch, mode: Mode) -> Result<Tensor> {
        self.encode(params, batch, mode)
    }
}

impl TransformerClassifier for DistilBert {
    fn stack_context(&self, batch: &Batch, _params: &ParamSet) -> Result<StackContext> {
        Ok(StackContext {
            keep: padding_keep(&batch.tokens()?.attention_mask)?,
            bias: None,
        })
    }

    fn embed(&self, params: &ParamSet, batch: &Batch, _mode: Mode) -> Result<Tensor> {
        let tokens = batch.tokens()?;
        let (_, t) = tokens.input_ids.dims2()?;
        if t > self.config.max_position_embeddings {
            return Err(Error::Shape(format!(
                "sequences of {t} tokens exceed the model's {} positions; truncate them",
                self.config.max_position_embeddings
            )));
        }
        let words = self.word_embeddings.lookup(&tokens.input_ids, params)?;
        let positions = self.position_embeddings.get(params)?.narrow(0, 0, t)?;
        self.embedding_norm
            .forward(&words.broadcast_add(&positions)?, LAYER_NORM_EPS, params)
    }

    fn num_layers(&self) -> usize {
        self.layers.len()
    }

    fn layer(
        &self,
        index: usize,
        x: &Tensor,
        context: &StackContext,
        params: &ParamSet,
        mode: Mode,
    ) -> Result<Tensor> {
        let layer = layer_at(&self.layers, index)?;
        let heads = self.config.n_heads;
        // HF divides q by √dh before the product; scaling the scores is the same.
        let scale = 1.0 / ((self.config.dim / heads) as f64).sqrt();
        let q = layer.q_lin.forward(x, params, mode)?;
        let k = layer.k_lin.forward(x, params, mode)?;
        let v = layer.v_lin.forward(x, params, mode)?;
        let attention = multi_head_attention(
            &q,
            &k,
            &v,
            heads,
            scale,
            &context.keep,
            None,
            self.recompute,
        )?;
        let attended = layer.out_lin.forward(&attention, params, mode)?;
        let x = layer
            .sa_layer_norm
            .forward(&(attended + x)?, LAYER_NORM_EPS, params)?;
        let out = FeedForward {
            input: &layer.lin1,
            gate: None,
            output: &layer.lin2,
            activation: self.activation,
        }
        .forward(&x, params, mode, self.recompute)?;
        layer
            .output_layer_norm
            .forward(&(out + &x)?, LAYER_NORM_EPS, params)
    }

    fn set_recompute(&mut self, on: bool) {
        self.recompute = on;
    }

    fn lora_linears(&self) -> Vec<&LoraLinear> {
        self.linears()
    }

    fn base_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = vec![
            self.word_embeddings.base()?,
            self.position_embeddings.base(),
        ];
        out.extend(self.embedding_norm.base());
        for layer in &self.layers {
            out.extend(layer.sa_layer_norm.base());
            out.extend(layer.output_layer_norm.base());
        }
        for linear in self.linears() {
            out.extend(linear.base_tensors()?);
        }
        Ok(out)
    }

    fn parts(&self) -> ClassifierParts<'_> {
        ClassifierParts {
            head: &self.head,
            lora: self.lora.as_ref(),
            weights: &self.weights,
            pooling: Pooling::MaskedMean,
            default_targets: DEFAULT_TARGETS,
            fan_in_fan_out: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::test_support::{
        check_loss_derivatives, max_abs_diff, padded_batch, RandomWeights,
    };
    use crate::models::FewShotModel;
    use crate::nn::{LoraInit, LoraSpec};

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

    fn lora(targets: Option<Vec<String>>) -> LoraSettings {
        LoraSettings {
            spec: LoraSpec {
                rank: 2,
                alpha: 4.0,
                dropout: 0.0,
            },
            target_modules: targets,
            // Non-zero B, so that A's gradient is non-zero too.
            init: LoraInit::Normal { seed: 0, std: 0.3 },
        }
    }

    fn model() -> DistilBert {
        let dir = tempfile::tempdir().unwrap();
        let weights = random_weights(&config()).save_and_load(&dir);
        DistilBert::new(config(), weights, Some(lora(None)), CLASSES).unwrap()
    }

    #[test]
    fn logits_have_batch_by_classes_shape_and_ignore_padding() {
        let model = model();
        let params = model.init_params(1).unwrap();
        let a = model
            .logits(&params, &padded_batch([0, 0]), Mode::Eval)
            .unwrap();
        assert_eq!(a.dims(), &[2, CLASSES]);
        let b = model
            .logits(&params, &padded_batch([10, 6]), Mode::Eval)
            .unwrap();
        assert!(max_abs_diff(&a, &b) <= 1e-12, "{a} {b}");
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
        let model = model();
        let names = [
            "base_model.model.transformer.layer.0.attention.q_lin.lora_A.weight",
            "base_model.model.transformer.layer.1.attention.v_lin.lora_B.weight",
            crate::models::HEAD_WEIGHT,
        ]
        .map(String::from);
        check_loss_derivatives(&model, &padded_batch([0, 0]), &names);
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
