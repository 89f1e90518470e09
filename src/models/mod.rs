//! Models as functions of their trainable parameters (see `DESIGN.md`): a model holds
//! its frozen base and computes logits at whatever [`ParamSet`] it is given, so a
//! meta-learner can evaluate it at θ₀, θ₁, …, θ_K.
//!
//! Transformers are written from [`crate::tensor::ops`] (second-order safe), load
//! Hugging Face weights by name, and carry LoRA on the linear layers that
//! `target_modules` selects. The frozen base runs without dropout (as in evaluation
//! mode); only the LoRA branches apply their dropout in [`Mode::Train`].

pub mod adapter_files;
mod architecture;
mod attention;
mod batch_norm;
pub mod bert;
pub mod convnet;
pub mod distilbert;
mod embeddings;
pub mod fsct;
pub mod gpt2;
mod head;
mod layers;
pub mod load;
pub mod mlp;
mod packing;
pub mod post_ln;
mod precision;
pub mod resnet;
pub mod t5;
pub(crate) mod targets;
pub mod vision;
mod weights;

use candle_core::Tensor;

pub use crate::config::Backbone;
pub use architecture::Architecture;
pub use batch_norm::{BatchNormStatistics, RunningStatistics};
pub use head::{ClassificationHead, HEAD_BIAS, HEAD_WEIGHT};
pub use precision::{ModelPrecision, Quantization};
pub use vision::ImageShape;

pub use weights::Weights;

use crate::data::Batch;
use crate::nn::{AdapterConfig, LoraInit, LoraLinear, LoraSpec, Mode};
use crate::tensor::ops::HeadLayout;
use crate::tensor::{ops, ParamSet};
use crate::{Error, Result};
use packing::TokenPacking;

/// A model that adapts to a few-shot task through its trainable parameters.
///
/// The model holds only what is frozen; the trainable tensors come in a [`ParamSet`]
/// on every call, so a learner evaluates one model at θ₀, θ₁, …, θ_K. A model of
/// one's own is a few lines:
///
/// ```
/// use melora::prelude::*;
///
/// /// y = w·x + b, on one input feature.
/// struct Line;
///
/// impl FewShotModel for Line {
///     fn init_params(&self, _seed: u64) -> melora::Result<ParamSet> {
///         let zero = Tensor::zeros(1, DType::F64, &Device::Cpu)?;
///         ParamSet::from_pairs([("w", zero.clone()), ("b", zero)])
///     }
///     fn features(&self, _: &ParamSet, batch: &Batch, _: Mode) -> melora::Result<Tensor> {
///         Ok(batch.dense()?.clone())
///     }
///     fn logits(&self, params: &ParamSet, batch: &Batch, mode: Mode) -> melora::Result<Tensor> {
///         let x = self.features(params, batch, mode)?;
///         Ok(x.broadcast_mul(params.require("w")?)?.broadcast_add(params.require("b")?)?)
///     }
/// }
///
/// melora::init();
/// // Four points of y = 2x + 1; 200 inner steps fit the line.
/// let x = Tensor::new(&[[0f64], [1.], [2.], [3.]], &Device::Cpu)?;
/// let support = Batch::regression(x.clone(), ((x * 2.0)? + 1.0)?)?;
/// let fit = Maml { inner: InnerLoop::new(200, 0.1), mode: MamlMode::Recompute };
/// let fitted = fit.adapt(&WholeGraph::new(&Line), &Line.init_params(0)?, &support, Mode::Eval)?;
/// let w = fitted.require("w")?.to_vec1::<f64>()?[0];
/// assert!((w - 2.0).abs() < 1e-3, "w = {w}");
/// # Ok::<(), melora::Error>(())
/// ```
pub trait FewShotModel {
    /// Trainable tensors (LoRA `A`/`B`, head) with their names and initial values.
    fn init_params(&self, seed: u64) -> Result<ParamSet>;
    /// Pooled features `[b, width]` before the head (masked mean for encoders, the
    /// last real token for decoders): sentence embeddings, metric learners' inputs.
    fn features(&self, params: &ParamSet, batch: &Batch, mode: Mode) -> Result<Tensor>;
    /// Logits `[b, classes]` at the given trainable values; the frozen base is inside
    /// the model.
    fn logits(&self, params: &ParamSet, batch: &Batch, mode: Mode) -> Result<Tensor>;
    /// The parameters of full fine-tuning: [`init_params`](Self::init_params) plus
    /// every weight of the frozen base under its Hugging Face name, which the model
    /// then reads from the ParamSet instead of its frozen copy (so that it is
    /// trained). Models that train every parameter already return their
    /// initialisation.
    fn full_params(&self, seed: u64) -> Result<ParamSet> {
        self.init_params(seed)
    }
    /// PEFT's description of the model's LoRA adapter (`None` without LoRA), for
    /// saving adapters that other tools load.
    fn adapter_config(&self) -> Option<AdapterConfig> {
        None
    }
    /// Whether an example's output depends on the other examples of its batch
    /// (BatchNorm with batch statistics): then a batch cannot be split into
    /// micro-batches without changing the result.
    fn couples_examples(&self) -> bool {
        false
    }
    /// The statistics its BatchNorm layers normalise with (the vision backbones'):
    /// the batch's own unless running statistics are in use; `None` for models
    /// without BatchNorm.
    fn batch_norm_statistics(&self) -> Option<&BatchNormStatistics> {
        None
    }
    /// The model as a transformer stack; `None` for models that are not (vision
    /// backbones, MLP).
    fn transformer(&self) -> Option<&dyn TransformerClassifier> {
        None
    }
    /// The model as a chain of segments, for gradient checkpointing: a transformer's
    /// layers, a vision backbone's stages; `None` for the MLP.
    fn layer_chain(&self) -> Option<&dyn LayerChain> {
        None
    }
    /// Selective recomputation (`memory_optimization.checkpointing.selective`): the
    /// frozen base's attention cores and adapter-free feed-forward blocks keep only
    /// their inputs in the graph and are rebuilt in the backward pass, while the
    /// layers' inputs, projections and LoRA branches stay stored. Models that are not
    /// transformer stacks refuse.
    fn set_selective_recompute(&mut self, on: bool) -> Result<()> {
        if on {
            return Err(not_a_stack_selective());
        }
        Ok(())
    }
}

/// The error for selective recomputation of a model that is not a transformer stack.
pub(crate) fn not_a_stack_selective() -> Error {
    Error::InvalidArgument(
        "selective recomputation rebuilds the attention and feed-forward blocks of \
         transformer layers (BERT, DistilBERT, GPT-2, T5); this model has none, so set \
         memory_optimization.checkpointing.selective to false (micro-batches, \
         memory_optimization.gradient_accumulation.micro_batch, lower its memory)"
            .into(),
    )
}

/// How a transformer's hidden states become one feature vector per sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// Mean over the real tokens (encoders).
    MaskedMean,
    /// The last real token (decoders).
    LastToken,
}

/// A transformer family's conventions: fixed per family, the same for every model
/// of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FamilyConventions {
    /// The family's name in error messages and `model_type` (`bert`, `gpt2`, …).
    pub name: &'static str,
    /// How sequences are pooled.
    pub pooling: Pooling,
    /// LoRA targets used when the settings name none.
    pub default_targets: &'static [&'static str],
    /// Whether frozen weights are stored `[in, out]` (PEFT's `fan_in_fan_out`).
    pub fan_in_fan_out: bool,
}

/// What every transformer classifier has besides its embeddings and layers, held by
/// the model.
#[derive(Debug, Clone)]
pub struct ClassifierParts {
    /// The family's conventions.
    pub family: FamilyConventions,
    /// The trainable head.
    pub head: ClassificationHead,
    /// LoRA settings, if adapters are attached.
    pub lora: Option<LoraSettings>,
    /// The frozen weights' settings, without their tensors (for dtype and device).
    pub weights: Weights,
    /// Selective recomputation of the frozen base's attention cores and adapter-free
    /// feed-forward blocks ([`FewShotModel::set_selective_recompute`]).
    pub recompute: bool,
}

impl ClassifierParts {
    /// The parts of a `family` model of hidden width `width` read from `weights`, with
    /// a head for `classes` classes and adapters as `lora` says (attached by
    /// [`attach_lora`] once the layers exist).
    pub(crate) fn new(
        family: FamilyConventions,
        weights: &Weights,
        width: usize,
        classes: usize,
        lora: Option<LoraSettings>,
    ) -> Self {
        Self {
            family,
            head: ClassificationHead::new(width, classes),
            lora,
            weights: weights.without_tensors(),
            recompute: false,
        }
    }
}

/// Per-batch constants that every layer of a transformer stack reads: the attention
/// mask (key padding, and causality for decoders) and, for T5, the relative-position
/// bias. They depend on the batch and the frozen base only, so a recomputed layer
/// (gradient checkpointing) reads the same values as the first pass.
#[derive(Debug, Clone)]
pub struct StackContext {
    /// Non-zero where a query may attend to a key, broadcastable to `[b, h, t, t]`;
    /// `None` for chains without attention (vision backbones).
    keep: Option<Tensor>,
    /// Added to the attention scores of every layer (`[1, h, t, t]`), if any.
    pub(crate) bias: Option<Tensor>,
    /// Where the real tokens are, when the batch has padding: the layers then see
    /// hidden states `[1, n, width]` of the `n` real tokens (see `packing`).
    packing: Option<TokenPacking>,
}

impl StackContext {
    /// The context of `batch` with attention mask `keep` and score bias `bias`; its
    /// padding, if any, is packed away.
    pub(crate) fn new(batch: &Batch, keep: Tensor, bias: Option<Tensor>) -> Result<Self> {
        Ok(Self {
            keep: Some(keep),
            bias,
            packing: TokenPacking::of_mask(&batch.tokens()?.attention_mask)?,
        })
    }

    /// The context of a chain that reads no tokens (a vision backbone's stages): no
    /// mask, no bias, no packing.
    pub(crate) fn dense() -> Self {
        Self {
            keep: None,
            bias: None,
            packing: None,
        }
    }

    /// The attention mask, or an error for a context of dense inputs.
    pub(crate) fn keep(&self) -> Result<Tensor> {
        self.keep.clone().ok_or_else(|| {
            Error::InvalidArgument("attention needs the token mask of a text batch".into())
        })
    }

    /// The embedding's output `[b, t, width]` as the layers take it (packed when the
    /// batch has padding).
    pub(crate) fn pack(&self, h: &Tensor) -> Result<Tensor> {
        match &self.packing {
            Some(packing) => packing.pack(h),
            None => Ok(h.clone()),
        }
    }

    /// This context computing every position, padding included (no packing).
    pub(crate) fn padded(self) -> Self {
        Self {
            packing: None,
            ..self
        }
    }

    /// Attention's move between hidden-state rows as the layers hold them (`h`'s
    /// layout: packed `[1, n, width]` or `[b, t, width]`) and `heads` heads.
    pub(crate) fn head_layout(&self, h: &Tensor, heads: usize) -> Result<HeadLayout> {
        Ok(match &self.packing {
            Some(packing) => packing.head_layout(heads),
            None => {
                let (batch, length, _) = h.dims3()?;
                HeadLayout::dense(batch, length, heads)
            }
        })
    }

    /// Hidden states as the layers hold them, in the padded layout `[b, t, width]`
    /// (for pooling).
    pub(crate) fn unpack(&self, h: &Tensor) -> Result<Tensor> {
        match &self.packing {
            Some(packing) => packing.unpack(h),
            None => Ok(h.clone()),
        }
    }
}

/// A transformer family: its hidden states and LoRA layers. Every implementor is a
/// [`FewShotModel`] (pooling, head, ParamSet layout and PEFT configuration are shared).
///
/// The stack is written as a chain of segments (see `DESIGN.md`): the embedding
/// `h₀ = E(θ)`, the layers `h_{l+1} = F_l(h_l, θ)` and the tail (`finish`, pooling,
/// head). [`encode`](Self::encode) runs them in order; gradient checkpointing
/// (`crate::engine::Checkpointed`) runs the same functions one segment graph at a
/// time, so there is one copy of each family's layer code.
pub trait TransformerClassifier {
    /// The batch's constants for [`layer`](Self::layer) (T5's relative-position bias
    /// is read from `params` when full fine-tuning trains it).
    fn stack_context(&self, batch: &Batch, params: &ParamSet) -> Result<StackContext>;
    /// The embedding: hidden states `[b, t, width]`, padding included. The
    /// embedding segment is this packed to the real tokens by the stack context.
    fn embed(&self, params: &ParamSet, batch: &Batch, mode: Mode) -> Result<Tensor>;
    /// Number of layers.
    fn num_layers(&self) -> usize;
    /// Layer `index` (0-based) applied to hidden states `h`, `[b, t, width]` or, when
    /// the context packs the batch, `[1, n, width]` (everything but attention is
    /// row-wise; attention unpacks through the context).
    fn layer(
        &self,
        index: usize,
        h: &Tensor,
        context: &StackContext,
        params: &ParamSet,
        mode: Mode,
    ) -> Result<Tensor>;
    /// What follows the last layer (GPT-2's `ln_f`, T5's final norm; trained under
    /// full fine-tuning), the identity by default.
    fn finish(&self, h: &Tensor, _params: &ParamSet) -> Result<Tensor> {
        Ok(h.clone())
    }
    /// Final hidden states `[b, t, width]` at `params`: embedding, every layer,
    /// finish, computed at every position, padding included (as Hugging Face does;
    /// pooling and training skip the padding instead).
    fn encode(&self, params: &ParamSet, batch: &Batch, mode: Mode) -> Result<Tensor> {
        let context = self.stack_context(batch, params)?.padded();
        run_stack(self, &context, params, batch, mode)
    }
    /// The frozen tensors of the base model that are not linear layers' (embeddings,
    /// position bias, norms) under their Hugging Face names, dense.
    fn embedding_and_norm_tensors(&self) -> Result<Vec<(String, Tensor)>>;
    /// Every frozen tensor of the base model (embeddings, norms, linear weights and
    /// biases) under its Hugging Face name, dense: what full fine-tuning trains.
    fn base_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = self.embedding_and_norm_tensors()?;
        for linear in self.lora_linears() {
            out.extend(linear.base_tensors()?);
        }
        Ok(out)
    }
    /// Turns selective recomputation of the frozen blocks on or off
    /// ([`FewShotModel::set_selective_recompute`]).
    fn set_recompute(&mut self, on: bool) {
        self.parts_mut().recompute = on;
    }
    /// Every linear layer that may carry LoRA.
    fn lora_linears(&self) -> Vec<&LoraLinear>;
    /// Head, LoRA settings, weights and conventions.
    fn parts(&self) -> &ClassifierParts;
    /// [`parts`](Self::parts), mutable.
    fn parts_mut(&mut self) -> &mut ClassifierParts;
}

/// A model as a chain of segments, which gradient checkpointing
/// (`crate::engine::Checkpointed`) cuts at chosen links: an input
/// `h₀ = E(θ)`, links `h_{l+1} = F_l(h_l, θ)`, and logits `Φ(h_L, θ)`. A
/// transformer's links are its layers; a vision backbone's are its stages (the stem
/// is part of the input).
pub trait LayerChain {
    /// The batch's constants every link reads (attention masks; nothing for images).
    fn chain_context(&self, batch: &Batch, params: &ParamSet) -> Result<StackContext>;
    /// `h₀`, as the links take it (packed to the real tokens for text).
    fn chain_input(
        &self,
        params: &ParamSet,
        batch: &Batch,
        context: &StackContext,
        mode: Mode,
    ) -> Result<Tensor>;
    /// Number of links.
    fn chain_length(&self) -> usize;
    /// Link `index` (0-based) applied to `h`.
    fn chain_link(
        &self,
        index: usize,
        h: &Tensor,
        context: &StackContext,
        params: &ParamSet,
        mode: Mode,
    ) -> Result<Tensor>;
    /// Logits `[b, classes]` from the last link's output.
    fn chain_logits(
        &self,
        last: &Tensor,
        context: &StackContext,
        params: &ParamSet,
        batch: &Batch,
    ) -> Result<Tensor>;
    /// The features `[b, d]` ([`FewShotModel::features`]) from the last link's
    /// output: the tail without the head, what metric learners score.
    fn chain_features(
        &self,
        last: &Tensor,
        context: &StackContext,
        params: &ParamSet,
        batch: &Batch,
    ) -> Result<Tensor>;
}

impl<T: TransformerClassifier> LayerChain for T {
    fn chain_context(&self, batch: &Batch, params: &ParamSet) -> Result<StackContext> {
        self.stack_context(batch, params)
    }

    fn chain_input(
        &self,
        params: &ParamSet,
        batch: &Batch,
        context: &StackContext,
        mode: Mode,
    ) -> Result<Tensor> {
        context.pack(&self.embed(params, batch, mode)?)
    }

    fn chain_length(&self) -> usize {
        self.num_layers()
    }

    fn chain_link(
        &self,
        index: usize,
        h: &Tensor,
        context: &StackContext,
        params: &ParamSet,
        mode: Mode,
    ) -> Result<Tensor> {
        self.layer(index, h, context, params, mode)
    }

    fn chain_logits(
        &self,
        last: &Tensor,
        context: &StackContext,
        params: &ParamSet,
        batch: &Batch,
    ) -> Result<Tensor> {
        tail_logits(self, last, context, params, batch)
    }

    fn chain_features(
        &self,
        last: &Tensor,
        context: &StackContext,
        params: &ParamSet,
        batch: &Batch,
    ) -> Result<Tensor> {
        tail_features(self, last, context, params, batch)
    }
}

/// Layer `index` of a family's stack, or an error naming the valid range.
pub(crate) fn layer_at<L>(layers: &[L], index: usize) -> Result<&L> {
    layers.get(index).ok_or_else(|| {
        Error::InvalidArgument(format!(
            "layer {index} does not exist; the stack has layers 0..{}",
            layers.len()
        ))
    })
}

/// Final hidden states `[b, t, width]` through embedding, layers and finish, packed
/// in between as `context` says (padding positions then hold no meaningful state).
fn run_stack<M: TransformerClassifier + ?Sized>(
    model: &M,
    context: &StackContext,
    params: &ParamSet,
    batch: &Batch,
    mode: Mode,
) -> Result<Tensor> {
    let mut h = context.pack(&model.embed(params, batch, mode)?)?;
    for index in 0..model.num_layers() {
        h = model.layer(index, &h, context, params, mode)?;
    }
    context.unpack(&model.finish(&h, params)?)
}

/// Pooled features `[b, width]` of final hidden states, by the family's pooling.
fn pool(model: &dyn TransformerClassifier, hidden: &Tensor, batch: &Batch) -> Result<Tensor> {
    // Mixed precision: pooling, head and loss in the trainable dtype (f32), so the
    // token sum is accurate and the loss's statistics are f32.
    let hidden = &hidden.to_dtype(model.parts().weights.trainable_dtype())?;
    let mask = &batch.tokens()?.attention_mask;
    Ok(match model.parts().family.pooling {
        Pooling::MaskedMean => ops::masked_mean_pool(hidden, mask)?,
        Pooling::LastToken => ops::last_token(hidden, mask)?,
    })
}

/// The tail segment: logits `[b, classes]` from the last layer's output `h_L`
/// (finish, pooling, head). [`FewShotModel::logits`] of a transformer is this applied
/// to the chain of the other segments.
pub(crate) fn tail_logits(
    model: &dyn TransformerClassifier,
    last: &Tensor,
    context: &StackContext,
    params: &ParamSet,
    batch: &Batch,
) -> Result<Tensor> {
    let features = tail_features(model, last, context, params, batch)?;
    model.parts().head.forward(&features, params)
}

/// The pooled features from the last layer's output (final norm, unpacking,
/// pooling): [`tail_logits`] without the head.
pub(crate) fn tail_features(
    model: &dyn TransformerClassifier,
    last: &Tensor,
    context: &StackContext,
    params: &ParamSet,
    batch: &Batch,
) -> Result<Tensor> {
    let hidden = context.unpack(&model.finish(last, params)?)?;
    pool(model, &hidden, batch)
}

impl<T: TransformerClassifier> FewShotModel for T {
    fn init_params(&self, seed: u64) -> Result<ParamSet> {
        let parts = self.parts();
        init_transformer_params(
            &self.lora_linears(),
            parts.lora.as_ref().map(|l| l.init),
            &parts.head,
            seed,
            &parts.weights,
        )
    }

    fn features(&self, params: &ParamSet, batch: &Batch, mode: Mode) -> Result<Tensor> {
        let context = self.stack_context(batch, params)?;
        pool(
            self,
            &run_stack(self, &context, params, batch, mode)?,
            batch,
        )
    }

    fn logits(&self, params: &ParamSet, batch: &Batch, mode: Mode) -> Result<Tensor> {
        self.parts()
            .head
            .forward(&self.features(params, batch, mode)?, params)
    }

    /// The initialisation (adapters at their zero update, zero head) and every base
    /// weight, in the trainable dtype.
    fn full_params(&self, seed: u64) -> Result<ParamSet> {
        let mut params = self.init_params(seed)?;
        let dtype = self.parts().weights.trainable_dtype();
        for (name, tensor) in self.base_tensors()? {
            params.insert(name, tensor.to_dtype(dtype)?.detach())?;
        }
        Ok(params)
    }

    fn adapter_config(&self) -> Option<AdapterConfig> {
        let parts = self.parts();
        let family = parts.family;
        parts
            .lora
            .as_ref()
            .map(|l| l.adapter_config(family.default_targets, family.fan_in_fan_out))
    }

    fn transformer(&self) -> Option<&dyn TransformerClassifier> {
        Some(self)
    }

    fn layer_chain(&self) -> Option<&dyn LayerChain> {
        Some(self)
    }

    fn set_selective_recompute(&mut self, on: bool) -> Result<()> {
        self.set_recompute(on);
        Ok(())
    }
}

/// Which linear layers carry LoRA, and its hyper-parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSettings {
    /// Rank, alpha, dropout.
    pub spec: LoraSpec,
    /// PEFT-style target names (suffixes of module paths); `None` for the family's
    /// defaults.
    pub target_modules: Option<Vec<String>>,
    /// How `A` and `B` start.
    pub init: LoraInit,
}

/// Activation functions named as in Hugging Face configs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `gelu`: exact erf GELU.
    GeluErf,
    /// `gelu_new` / `gelu_pytorch_tanh`: tanh approximation.
    GeluTanh,
    /// `relu`.
    Relu,
    /// `silu` / `swish`.
    Silu,
}

impl Activation {
    /// Parses a Hugging Face `hidden_act` / `activation_function` value.
    pub fn from_hf(name: &str) -> Result<Self> {
        Ok(match name {
            "gelu" => Self::GeluErf,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Self::GeluTanh,
            "relu" => Self::Relu,
            "silu" | "swish" => Self::Silu,
            other => {
                return Err(Error::Model(format!(
                "unsupported activation `{other}`; supported: gelu, gelu_new, gelu_pytorch_tanh, \
                     relu, silu"
            )))
            }
        })
    }

    pub(crate) fn apply(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::GeluErf => ops::gelu_erf(x),
            Self::GeluTanh => ops::gelu_tanh(x),
            Self::Relu => ops::relu(x),
            Self::Silu => ops::silu(x),
        }
    }

    /// The derivative at `x`, element-wise, itself differentiable (ReLU's is a
    /// constant step: its own derivative is zero away from the kink).
    pub(crate) fn derivative(self, x: &Tensor) -> candle_core::Result<Tensor> {
        use crate::tensor::ops::{pointwise_derivative, Pointwise};
        match self {
            Self::GeluErf => pointwise_derivative(x, Pointwise::GeluErf),
            Self::GeluTanh => pointwise_derivative(x, Pointwise::GeluTanh),
            Self::Silu => pointwise_derivative(x, Pointwise::Silu),
            Self::Relu => x.detach().gt(0.0)?.to_dtype(x.dtype()),
        }
    }
}

impl LoraSettings {
    /// The PEFT adapter configuration for these settings on a family whose default
    /// targets are `default_targets`.
    pub(crate) fn adapter_config(
        &self,
        default_targets: &[&str],
        fan_in_fan_out: bool,
    ) -> AdapterConfig {
        let targets = self
            .target_modules
            .clone()
            .unwrap_or_else(|| default_targets.iter().map(|t| t.to_string()).collect());
        let mut config = AdapterConfig::lora(
            self.spec.rank,
            self.spec.alpha,
            self.spec.dropout,
            targets,
            fan_in_fan_out,
        );
        config.modules_to_save = Some(vec!["classifier".into()]);
        config
    }
}

/// Attaches LoRA to the linears (`linears` of `model`) that its parts' settings select
/// (or the family's default targets), and returns the model; an unknown target is an
/// error.
pub(crate) fn attach_lora<M: TransformerClassifier>(
    mut model: M,
    linears: impl FnOnce(&mut M) -> Vec<&mut LoraLinear>,
) -> Result<M> {
    let parts = model.parts();
    let family = parts.family;
    let Some(settings) = parts.lora.clone() else {
        return Ok(model);
    };
    let targets: Vec<String> = match &settings.target_modules {
        Some(t) => t.clone(),
        None => family
            .default_targets
            .iter()
            .map(|t| t.to_string())
            .collect(),
    };
    let linears = linears(&mut model);
    let paths: Vec<String> = linears
        .iter()
        .map(|l| l.module_path().to_string())
        .collect();
    let selected = targets::resolve(family.name, &targets, &paths)?;
    for (linear, on) in linears.into_iter().zip(selected) {
        if on {
            *linear = linear.clone().with_lora(settings.spec)?;
        }
    }
    Ok(model)
}

/// The trainable ParamSet of a transformer: LoRA tensors in name order (PEFT's saved
/// order), then the head.
pub(crate) fn init_transformer_params(
    linears: &[&LoraLinear],
    init: Option<LoraInit>,
    head: &ClassificationHead,
    seed: u64,
    weights: &Weights,
) -> Result<ParamSet> {
    let mut lora = ParamSet::new();
    if let Some(init) = init {
        let init = match init {
            LoraInit::Peft { .. } => LoraInit::Peft { seed },
            LoraInit::Normal { std, .. } => LoraInit::Normal { seed, std },
        };
        for linear in linears {
            linear.init_params(init, &mut lora)?;
        }
    }
    let mut sorted: Vec<(String, Tensor)> = lora
        .iter()
        .map(|(n, t)| (n.to_string(), t.clone()))
        .collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut params = ParamSet::from_pairs(sorted)?;
    head.init_zero_params(weights.trainable_dtype(), &weights.device(), &mut params)?;
    Ok(params)
}

#[cfg(test)]
pub(crate) mod fixture_tests;
#[cfg(test)]
mod full_finetune_tests;
#[cfg(test)]
mod test_support;
