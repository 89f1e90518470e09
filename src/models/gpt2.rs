//! GPT-2 decoders: pre-LN layers with causal attention, `gelu_new`, `Conv1D` weights
//! stored `[in, out]` (LoRA with `fan_in_fan_out`), and a classification head on the
//! hidden state of the last real token.

use std::path::Path;

use candle_core::Tensor;
use serde::Deserialize;

use super::attention::{causal_keep, multi_head_attention};
use super::layers::{load_conv1d, FeedForward, Frozen, FrozenTable, LayerNorm};
use super::load::ConfigJson;
use super::{
    attach_lora, layer_at, Activation, ClassificationHead, ClassifierParts, LoraSettings, Pooling,
    StackContext, TransformerClassifier, Weights,
};
use crate::data::Batch;
use crate::nn::{LoraLinear, Mode};
use crate::tensor::ParamSet;
use crate::{Error, Result};

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
        if self.n_head == 0 || !self.n_embd.is_multiple_of(self.n_head) {
            return Err(Error::Model(format!(
                "n_embd {} is not a multiple of n_head {}",
                self.n_embd, self.n_head
            )));
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
struct Gpt2Block {
    ln_1: LayerNorm,
    c_attn: LoraLinear,
    c_proj: LoraLinear,
    ln_2: LayerNorm,
    c_fc: LoraLinear,
    mlp_proj: LoraLinear,
}

/// A GPT-2 decoder with LoRA and a classification head on the last real token.
#[derive(Debug, Clone)]
pub struct Gpt2 {
    config: Gpt2Config,
    activation: Activation,
    wte: FrozenTable,
    wpe: Frozen,
    blocks: Vec<Gpt2Block>,
    ln_f: LayerNorm,
    head: ClassificationHead,
    lora: Option<LoraSettings>,
    weights: Weights,
    /// Selective recomputation of the frozen base's attention cores and adapter-free
    /// feed-forward blocks ([`FewShotModel::set_selective_recompute`]).
    recompute: bool,
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
            blocks.push(Gpt2Block {
                ln_1: LayerNorm::load(&weights, &format!("{p}.ln_1"), e)?,
                c_attn: load_conv1d(&weights, &format!("{p}.attn.c_attn"), e, 3 * e)?,
                c_proj: load_conv1d(&weights, &format!("{p}.attn.c_proj"), e, e)?,
                ln_2: LayerNorm::load(&weights, &format!("{p}.ln_2"), e)?,
                c_fc: load_conv1d(&weights, &format!("{p}.mlp.c_fc"), e, inner)?,
                mlp_proj: load_conv1d(&weights, &format!("{p}.mlp.c_proj"), inner, e)?,
            });
        }
        let mut model = Self {
            wte: FrozenTable::load(&weights, "wte.weight", &[config.vocab_size, e])?,
            wpe: Frozen::load(&weights, "wpe.weight", &[config.n_positions, e])?,
            ln_f: LayerNorm::load(&weights, "ln_f", e)?,
            blocks,
            head: ClassificationHead::new(e, classes),
            activation,
            config,
            lora: lora.clone(),
            weights: weights.without_tensors(),
            recompute: false,
        };
        attach_lora("gpt2", model.linears_mut(), lora.as_ref(), DEFAULT_TARGETS)?;
        Ok(model)
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &Gpt2Config {
        &self.config
    }

    fn linears_mut(&mut self) -> Vec<&mut LoraLinear> {
        self.blocks
            .iter_mut()
            .flat_map(|b| [&mut b.c_attn, &mut b.c_proj, &mut b.c_fc, &mut b.mlp_proj])
            .collect()
    }

    fn linears(&self) -> Vec<&LoraLinear> {
        self.blocks
            .iter()
            .flat_map(|b| [&b.c_attn, &b.c_proj, &b.c_fc, &b.mlp_proj])
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
        Ok(StackContext {
            keep: causal_keep(mask, mask.device())?,
            bias: None,
        })
    }

    fn embed(&self, params: &ParamSet, batch: &Batch, _mode: Mode) -> Result<Tensor> {
        let tokens = batch.tokens()?;
        let (_, t) = tokens.input_ids.dims2()?;
        if t > self.config.n_positions {
            return Err(Error::Shape(format!(
                "sequences of {t} tokens exceed the model's {} positions; truncate them",
                self.config.n_positions
            )));
        }
        Ok(self
            .wte
            .lookup(&tokens.input_ids, params)?
            .broadcast_add(&self.wpe.get(params)?.narrow(0, 0, t)?)?)
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
        let (e, heads, eps) = (
            self.config.n_embd,
            self.config.n_head,
            self.config.layer_norm_epsilon,
        );
        let scale = 1.0 / ((e / heads) as f64).sqrt();
        let qkv = block
            .c_attn
            .forward(&block.ln_1.forward(x, eps, params)?, params, mode)?;
        let (q, k, v) = (
            qkv.narrow(2, 0, e)?,
            qkv.narrow(2, e, e)?,
            qkv.narrow(2, 2 * e, e)?,
        );
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
        let x = (x + block.c_proj.forward(&attention, params, mode)?)?;
        let out = FeedForward {
            input: &block.c_fc,
            gate: None,
            output: &block.mlp_proj,
            activation: self.activation,
        }
        .forward(
            &block.ln_2.forward(&x, eps, params)?,
            params,
            mode,
            self.recompute,
        )?;
        Ok((&x + out)?)
    }

    fn finish(&self, h: &Tensor, params: &ParamSet) -> Result<Tensor> {
        self.ln_f.forward(h, self.config.layer_norm_epsilon, params)
    }

    fn set_recompute(&mut self, on: bool) {
        self.recompute = on;
    }

    fn lora_linears(&self) -> Vec<&LoraLinear> {
        self.linears()
    }

    fn base_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = vec![self.wte.base()?, self.wpe.base()];
        out.extend(self.ln_f.base());
        for block in &self.blocks {
            out.extend(block.ln_1.base());
            out.extend(block.ln_2.base());
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
            pooling: Pooling::LastToken,
            default_targets: DEFAULT_TARGETS,
            fan_in_fan_out: true,
        }
    }
}
