//! The post-LayerNorm encoders of BERT and DistilBERT: word + position (+ token type)
//! embeddings and a layer norm, then layers of self-attention, residual, layer norm;
//! feed-forward, residual, layer norm. The two families differ only in their config's
//! keys, the names of their modules and BERT's token types, which [`PostLnConfig`]
//! gives; [`PostLnEncoder`] is the one implementation of both. Its items are public
//! because `bert::Bert` and `distilbert::DistilBert` are this type.

use candle_core::Tensor;

use super::attention::{padding_context, Projections, SelfAttention};
use super::embeddings::PositionalEmbeddings;
use super::layers::{load_dense, Dense, FeedForward, Frozen, LayerNorm, Sublayers};
use super::{
    attach_lora, layer_at, Activation, ClassifierParts, FamilyConventions, LoraSettings,
    StackContext, TransformerClassifier, Weights,
};
use crate::data::Batch;
use crate::nn::{LoraLinear, Mode};
use crate::tensor::{ops, ParamSet};
use crate::Result;

/// A family's Hugging Face names of a post-LN layer's modules, relative to the
/// layer's prefix (`encoder.layer.3`, `transformer.layer.3`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PostLnNames {
    /// The query projection.
    pub query: &'static str,
    /// The key projection.
    pub key: &'static str,
    /// The value projection.
    pub value: &'static str,
    /// The attention's output projection.
    pub attention_output: &'static str,
    /// The layer norm after the attention's residual.
    pub attention_norm: &'static str,
    /// The feed-forward block's first (widening) linear.
    pub intermediate: &'static str,
    /// The feed-forward block's second linear.
    pub output: &'static str,
    /// The layer norm after the feed-forward block's residual.
    pub output_norm: &'static str,
}

/// The sizes and constants of a post-LN encoder, read from a family's config.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PostLnShape {
    /// Vocabulary size.
    pub vocab: usize,
    /// Width of the hidden states.
    pub width: usize,
    /// Number of layers.
    pub layers: usize,
    /// Attention heads per layer.
    pub heads: usize,
    /// Width of the feed-forward layer.
    pub ffn: usize,
    /// Longest sequence the position embeddings cover.
    pub max_positions: usize,
    /// Number of token types (BERT's segments); `None` for a family without them.
    pub type_vocab: Option<usize>,
    /// Layer-norm epsilon.
    pub eps: f64,
    /// The feed-forward activation.
    pub activation: Activation,
}

/// A post-LN family's config, as the shared encoder reads it.
pub trait PostLnConfig: Clone + std::fmt::Debug {
    /// The family's conventions (name, pooling, default LoRA targets).
    const FAMILY: FamilyConventions;
    /// Layer `l`'s modules are under `<LAYER_PREFIX>.<l>`.
    const LAYER_PREFIX: &'static str;
    /// The names of a layer's modules under its prefix.
    const LAYER_NAMES: PostLnNames;
    /// The encoder's shape; a config the model cannot be built from is an error.
    fn shape(&self) -> Result<PostLnShape>;
}

/// One post-LN transformer layer.
#[derive(Debug, Clone)]
struct PostLnLayer {
    sublayers: Sublayers,
    attention_norm: LayerNorm,
    output_norm: LayerNorm,
}

impl PostLnLayer {
    /// The layer at `prefix` of `weights`, its modules named by `names`.
    fn load(
        weights: &Weights,
        prefix: &str,
        names: &PostLnNames,
        shape: PostLnShape,
    ) -> Result<Self> {
        let (h, ff) = (shape.width, shape.ffn);
        let path = |name: &str| format!("{prefix}.{name}");
        let linear =
            |name: &str, n_in, n_out| load_dense(weights, Dense::Linear, &path(name), n_in, n_out);
        let projections = Projections::Separate {
            query: linear(names.query, h, h)?,
            key: linear(names.key, h, h)?,
            value: linear(names.value, h, h)?,
        };
        let attention_output = linear(names.attention_output, h, h)?;
        let attention = SelfAttention::scaled(projections, attention_output, h, shape.heads);
        let attention_norm = LayerNorm::load(weights, &path(names.attention_norm), h)?;
        let feed_forward = FeedForward {
            input: linear(names.intermediate, h, ff)?,
            gate: None,
            output: linear(names.output, ff, h)?,
            activation: shape.activation,
        };
        Ok(Self {
            sublayers: Sublayers {
                attention,
                feed_forward,
            },
            attention_norm,
            output_norm: LayerNorm::load(weights, &path(names.output_norm), h)?,
        })
    }

    /// The two norms' scales and shifts with their names, for full fine-tuning.
    fn norm_tensors(&self) -> impl Iterator<Item = (String, Tensor)> {
        self.attention_norm
            .base()
            .into_iter()
            .chain(self.output_norm.base())
    }
}

/// A post-LN encoder (BERT, DistilBERT) with LoRA and a classification head on masked
/// mean pooling; `C` is the family's config.
#[derive(Debug, Clone)]
pub struct PostLnEncoder<C> {
    config: C,
    /// Layer-norm epsilon of every norm.
    eps: f64,
    embeddings: PositionalEmbeddings,
    /// BERT's token-type table, `None` for DistilBERT.
    token_type_embeddings: Option<Frozen>,
    embedding_norm: LayerNorm,
    layers: Vec<PostLnLayer>,
    parts: ClassifierParts,
}

impl<C: PostLnConfig> PostLnEncoder<C> {
    /// Builds the encoder from `weights` (Hugging Face names of the family's base
    /// model), with LoRA on the layers `lora` selects and a head for `classes` classes.
    pub fn new(
        config: C,
        weights: Weights,
        lora: Option<LoraSettings>,
        classes: usize,
    ) -> Result<Self> {
        let shape = config.shape()?;
        let layers = (0..shape.layers)
            .map(|l| {
                let prefix = format!("{}.{l}", C::LAYER_PREFIX);
                PostLnLayer::load(&weights, &prefix, &C::LAYER_NAMES, shape)
            })
            .collect::<Result<_>>()?;
        let h = shape.width;
        let model = Self {
            embeddings: PositionalEmbeddings::load(
                &weights,
                (
                    "embeddings.word_embeddings.weight",
                    "embeddings.position_embeddings.weight",
                ),
                shape.vocab,
                shape.max_positions,
                h,
            )?,
            token_type_embeddings: match shape.type_vocab {
                Some(types) => Some(Frozen::load(
                    &weights,
                    "embeddings.token_type_embeddings.weight",
                    &[types, h],
                )?),
                None => None,
            },
            embedding_norm: LayerNorm::load(&weights, "embeddings.LayerNorm", h)?,
            layers,
            parts: ClassifierParts::new(C::FAMILY, &weights, h, classes, lora),
            eps: shape.eps,
            config,
        };
        attach_lora(model, |m| {
            m.layers
                .iter_mut()
                .flat_map(|l| l.sublayers.linears_mut())
                .collect()
        })
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &C {
        &self.config
    }

    /// Final hidden states `[b, t, width]` at `params`.
    pub fn hidden_states(&self, params: &ParamSet, batch: &Batch, mode: Mode) -> Result<Tensor> {
        self.encode(params, batch, mode)
    }
}

impl<C: PostLnConfig> TransformerClassifier for PostLnEncoder<C> {
    fn stack_context(&self, batch: &Batch, _params: &ParamSet) -> Result<StackContext> {
        padding_context(batch)
    }

    fn embed(&self, params: &ParamSet, batch: &Batch, _mode: Mode) -> Result<Tensor> {
        let tokens = batch.tokens()?;
        let mut x = self.embeddings.forward(&tokens.input_ids, params)?;
        if let Some(table) = &self.token_type_embeddings {
            // Without token types every token is of type 0.
            let table = table.get(params)?;
            let types = match &tokens.token_type_ids {
                Some(tt) => ops::embedding(tt, &table)?,
                None => table.narrow(0, 0, 1)?.unsqueeze(0)?,
            };
            x = x.broadcast_add(&types)?;
        }
        self.embedding_norm.forward(&x, self.eps, params)
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
        let eps = self.eps;
        layer.sublayers.post_norm(
            x,
            [&|x| layer.attention_norm.forward(x, eps, params), &|x| {
                layer.output_norm.forward(x, eps, params)
            }],
            context,
            params,
            mode,
            self.parts.recompute,
        )
    }

    fn lora_linears(&self) -> Vec<&LoraLinear> {
        self.layers
            .iter()
            .flat_map(|l| l.sublayers.linears())
            .collect()
    }

    fn embedding_and_norm_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::from(self.embeddings.base()?);
        out.extend(self.token_type_embeddings.as_ref().map(Frozen::base));
        out.extend(self.embedding_norm.base());
        out.extend(self.layers.iter().flat_map(PostLnLayer::norm_tensors));
        Ok(out)
    }

    fn parts(&self) -> &ClassifierParts {
        &self.parts
    }

    fn parts_mut(&mut self) -> &mut ClassifierParts {
        &mut self.parts
    }
}
