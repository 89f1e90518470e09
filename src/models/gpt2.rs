//! GPT-2 decoders: pre-LN layers with causal attention, `gelu_new`, `Conv1D` weights
//! stored `[in, out]` (LoRA with `fan_in_fan_out`), and a classification head on the
//! hidden state of the last real token.

use std::path::Path;

use candle_core::Tensor;
use serde::Deserialize;

use super::attention::{causal_keep, check_heads_divide, Projections, SelfAttention};
use super::embeddings::PositionalEmbeddings;
use super::layers::{load_dense, Dense, FeedForward, LayerNorm, Sublayers};
use super::load::ConfigJson;
use super::{
    attach_lora, layer_at, Activation, ClassifierParts, FamilyConventions, LoraSettings, Pooling,
    StackContext, TransformerClassifier, Weights,
};
use crate::data::Batch;
use crate::nn::{LoraLinear, Mode};
use crate::tensor::ParamSet;
use crate::Result;

/// LoRA targets when the configuration names none (PEFT's default for GPT-2).
pub const DEFAULT_TARGETS: &[&str] = &["c_attn"];

/// The keys of a Hugging Face `GPT2Config` (`config.json`) that the model uses.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Gpt2Config {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Width of the hidden states.
    pub n_embd: usize,
    /// Number of layers.
    pub n_layer: usize,
    /// Attention heads per layer.
    pub n_head: usize,
    /// Longest sequence the position embeddings cover.
    pub n_positions: usize,
    /// Width of the MLP; `None` means 4·n_embd.
    #[serde(default)]
    pub n_inner: Option<usize>,
    /// Layer-norm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    /// MLP activation (`gelu_new` for GPT-2).
    #[serde(default = "default_act")]
    pub activation_function: String,
}

fn default_eps() -> f64 {
    1e-5
}
fn default_act() -> String {
    "gelu_new".into()
}

impl Gpt2Config {
    /// Reads a Hugging Face `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        ConfigJson::typed(path, "GPT-2")
    }

    fn inner(&self) -> usize {
        self.n_inner.unwrap_or(4 * self.n_embd)
    }

    /// Refuses a width that the heads do not divide.
    pub(crate) fn validate(&self) -> Result<()> {
        check_heads_divide(("n_embd", self.n_embd), ("n_head", self.n_head))
    }
}

/// The conventions of the GPT-2 family.
const FAMILY: FamilyConventions = FamilyConventions {
    name: "gpt2",
    pooling: Pooling::LastToken,
    default_targets: DEFAULT_TARGETS,
    fan_in_fan_out: true,
};

/// One pre-LN GPT-2 block: `x + attn(ln_1(x))`, then `x + mlp(ln_2(x))`.
#[derive(Debug, Clone)]
struct Gpt2Block {
    ln_1: LayerNorm,
    ln_2: LayerNorm,
    /// `attn` (`c_attn`, fused q, k, v, and `c_proj`) and `mlp` (`c_fc`, `c_proj`).
    sublayers: Sublayers,
}

/// A GPT-2 decoder with LoRA and a classification head on the last real token.
#[derive(Debug, Clone)]
pub struct Gpt2 {
    config: Gpt2Config,
    /// `wte` and `wpe`.
    embeddings: PositionalEmbeddings,
    blocks: Vec<Gpt2Block>,
    ln_f: LayerNorm,
    parts: ClassifierParts,
}

impl Gpt2 {
    /// Builds the decoder from `weights` (Hugging Face `GPT2Model` names), with LoRA on
    /// the layers `lora` selects and a head for `classes` classes.
    pub fn new(
        config: Gpt2Config,
        weights: Weights,
        lora: Option<LoraSettings>,
        classes: usize,
    ) -> Result<Self> {
        config.validate()?;
        let activation = Activation::from_hf(&config.activation_function)?;
        let (e, inner) = (config.n_embd, config.inner());
        let mut blocks = Vec::with_capacity(config.n_layer);
        for l in 0..config.n_layer {
            let p = format!("h.{l}");
            let conv1d = |name: &str, n_in, n_out| {
                load_dense(&weights, Dense::Conv1d, &format!("{p}.{name}"), n_in, n_out)
            };
            let ln_1 = LayerNorm::load(&weights, &format!("{p}.ln_1"), e)?;
            let c_attn = conv1d("attn.c_attn", e, 3 * e)?;
            let c_proj = conv1d("attn.c_proj", e, e)?;
            let attention =
                SelfAttention::scaled(Projections::Fused(c_attn), c_proj, e, config.n_head);
            let ln_2 = LayerNorm::load(&weights, &format!("{p}.ln_2"), e)?;
            let feed_forward = FeedForward {
                input: conv1d("mlp.c_fc", e, inner)?,
                gate: None,
                output: conv1d("mlp.c_proj", inner, e)?,
                activation,
            };
            blocks.push(Gpt2Block {
                ln_1,
                ln_2,
                sublayers: Sublayers {
                    attention,
                    feed_forward,
                },
            });
        }
        let model = Self {
            embeddings: PositionalEmbeddings::load(
                &weights,
                ("wte.weight", "wpe.weight"),
                config.vocab_size,
                config.n_positions,
                e,
            )?,
            ln_f: LayerNorm::load(&weights, "ln_f", e)?,
            blocks,
            parts: ClassifierParts::new(FAMILY, &weights, e, classes, lora),
            config,
        };
        attach_lora(model, Self::linears_mut)
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &Gpt2Config {
        &self.config
    }

    fn linears_mut(&mut self) -> Vec<&mut LoraLinear> {
        self.blocks
            .iter_mut()
            .flat_map(|b| b.sublayers.linears_mut())
            .collect()
    }

    /// Final hidden states `[b, t, n_embd]` (after `ln_f`) at `params`.
    pub fn hidden_states(&self, params: &ParamSet, batch: &Batch, mode: Mode) -> Result<Tensor> {
        self.encode(params, batch, mode)
    }
}

impl TransformerClassifier for Gpt2 {
    fn stack_context(&self, batch: &Batch, _params: &ParamSet) -> Result<StackContext> {
        let mask = &batch.tokens()?.attention_mask;
        StackContext::new(batch, causal_keep(mask, mask.device())?, None)
    }

    fn embed(&self, params: &ParamSet, batch: &Batch, _mode: Mode) -> Result<Tensor> {
        self.embeddings.forward(&batch.tokens()?.input_ids, params)
    }

    fn num_layers(&self) -> usize {
        self.blocks.len()
    }

    fn layer(
        &self,
        index: usize,
        x: &Tensor,
        context: &StackContext,
        params: &ParamSet,
        mode: Mode,
    ) -> Result<Tensor> {
        let block = layer_at(&self.blocks, index)?;
        let eps = self.config.layer_norm_epsilon;
        block.sublayers.pre_norm(
            x,
            [&|x| block.ln_1.forward(x, eps, params), &|x| {
                block.ln_2.forward(x, eps, params)
            }],
            context,
            params,
            mode,
            self.parts.recompute,
        )
    }

    fn finish(&self, h: &Tensor, params: &ParamSet) -> Result<Tensor> {
        self.ln_f.forward(h, self.config.layer_norm_epsilon, params)
    }

    fn lora_linears(&self) -> Vec<&LoraLinear> {
        self.blocks
            .iter()
            .flat_map(|b| b.sublayers.linears())
            .collect()
    }

    fn embedding_and_norm_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::from(self.embeddings.base()?);
        out.extend(self.ln_f.base());
        for block in &self.blocks {
            out.extend(block.ln_1.base());
            out.extend(block.ln_2.base());
        }
        Ok(out)
    }

    fn parts(&self) -> &ClassifierParts {
        &self.parts
    }

    fn parts_mut(&mut self) -> &mut ClassifierParts {
        &mut self.parts
    }
}
