//! BERT-family encoders (BERT, MiniLM): word + position + token-type embeddings,
//! post-LN transformer layers, masked mean pooling, classification head.

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
use crate::tensor::ops;
use crate::tensor::ParamSet;
use crate::{Error, Result};

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
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(Error::Model(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            )));
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
struct BertLayer {
    query: LoraLinear,
    key: LoraLinear,
    value: LoraLinear,
    attention_output: LoraLinear,
    attention_norm: LayerNorm,
    intermediate: LoraLinear,
    output: LoraLinear,
    output_norm: LayerNorm,
}

/// A BERT-family encoder with LoRA and a classification head on masked mean pooling.
#[derive(Debug, Clone)]
pub struct Bert {
    config: BertConfig,
    activation: Activation,
    word_embeddings: FrozenTable,
    position_embeddings: Frozen,
    token_type_embeddings: Frozen,
    embedding_norm: LayerNorm,
    layers: Vec<BertLayer>,
    head: ClassificationHead,
    lora: Option<LoraSettings>,
    weights: Weights,
    /// Selective recomputation of the frozen base's attention cores and adapter-free
    /// feed-forward blocks ([`FewShotModel::set_selective_recompute`]).
    recompute: bool,
}

impl Bert {
    /// Builds the encoder from `weights` (Hugging Face `BertModel` names), with LoRA on
    /// the layers `lora` selects and a head for `classes` classes.
    pub fn new(
        config: BertConfig,
        weights: Weights,
        lora: Option<LoraSettings>,
        classes: usize,
    ) -> Result<Self> {
        config.validate()?;
        let activation = Activation::from_hf(&config.hidden_act)?;
        let (h, ff) = (config.hidden_size, config.intermediate_size);
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for l in 0..config.num_hidden_layers {
            let p = format!("encoder.layer.{l}");
            layers.push(BertLayer {
                query: load_linear(&weights, &format!("{p}.attention.self.query"), h, h)?,
                key: load_linear(&weights, &format!("{p}.attention.self.key"), h, h)?,
                value: load_linear(&weights, &format!("{p}.attention.self.value"), h, h)?,
                attention_output: load_linear(
                    &weights,
                    &format!("{p}.attention.output.dense"),
                    h,
                    h,
                )?,
                attention_norm: LayerNorm::load(
                    &weights,
                    &format!("{p}.attention.output.LayerNorm"),
                    h,
                )?,
                intermediate: load_linear(&weights, &format!("{p}.intermediate.dense"), h, ff)?,
                output: load_linear(&weights, &format!("{p}.output.dense"), ff, h)?,
                output_norm: LayerNorm::load(&weights, &format!("{p}.output.LayerNorm"), h)?,
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
            token_type_embeddings: Frozen::load(
                &weights,
                "embeddings.token_type_embeddings.weight",
                &[config.type_vocab_size, h],
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
        attach_lora("bert", model.linears_mut(), lora.as_ref(), DEFAULT_TARGETS)?;
        Ok(model)
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    fn linears_mut(&mut self) -> Vec<&mut LoraLinear> {
        self.layers
            .iter_mut()
            .flat_map(|l| {
                [
                    &mut l.query,
                    &mut l.key,
                    &mut l.value,
                    &mut l.attention_output,
                    &mut l.intermediate,
                    &mut l.output,
                ]
            })
            .collect()
    }

    fn linears(&self) -> Vec<&LoraLinear> {
        self.layers
            .iter()
            .flat_map(|l| {
                [
                    &l.query,
                    &l.key,
                    &l.value,
                    &l.attention_output,
                    &l.intermediate,
                    &l.output,
                ]
            })
            .collect()
    }

    /// Final hidden states `[b, t, hidden]` at `params`.
    pub fn hidden_states(&self, params: &ParamSet, batch: &Batch, mode: Mode) -> Result<Tensor> {
        self.encode(params, batch, mode)
    }
}

impl TransformerClassifier for Bert {
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
        let type_table = self.token_type_embeddings.get(params)?;
        let types = match &tokens.token_type_ids {
            Some(tt) => ops::embedding(tt, &type_table)?,
            None => type_table.narrow(0, 0, 1)?.unsqueeze(0)?,
        };
        let x = words.broadcast_add(&positions)?.broadcast_add(&types)?;
        self.embedding_norm
            .forward(&x, self.config.layer_norm_eps, params)
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
        let eps = self.config.layer_norm_eps;
        let heads = self.config.num_attention_heads;
        let scale = 1.0 / ((self.config.hidden_size / heads) as f64).sqrt();
        let q = layer.query.forward(x, params, mode)?;
        let k = layer.key.forward(x, params, mode)?;
        let v = layer.value.forward(x, params, mode)?;
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
        let attended = layer.attention_output.forward(&attention, params, mode)?;
        let x = layer
            .attention_norm
            .forward(&(attended + x)?, eps, params)?;
        let out = FeedForward {
            input: &layer.intermediate,
            gate: None,
            output: &layer.output,
            activation: self.activation,
        }
        .forward(&x, params, mode, self.recompute)?;
        layer.output_norm.forward(&(out + &x)?, eps, params)
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
            self.token_type_embeddings.base(),
        ];
        out.extend(self.embedding_norm.base());
        for layer in &self.layers {
            out.extend(layer.attention_norm.base());
            out.extend(layer.output_norm.base());
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
