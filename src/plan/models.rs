//! The models' forward passes, replayed on simulated tensors op by op.
//!
//! Each function here mirrors the model code in `crate::models` (and the ops of
//! `crate::tensor::ops` it calls) statement by statement, so that the simulated graph
//! holds the same buffers as the real one: the frozen projections, the LoRA branch,
//! the head-split copies, scores and probabilities, layer-norm outputs, the FFN
//! intermediate and its activation, the pooling and the loss. When the model code
//! changes, this file must follow; the planner test compares both.

use super::sim::{Bin, ConvParams, Custom, DType, Sim, SimBlock, SimDType, Un, T};
use crate::models::bert::BertConfig;
use crate::models::conv4::Conv4Config;
use crate::models::distilbert::DistilBertConfig;
use crate::models::gpt2::Gpt2Config;
use crate::models::t5::T5Config;
use crate::models::Activation;

/// The architecture and its sizes.
#[derive(Debug, Clone)]
pub(crate) enum Family {
    /// BERT / MiniLM.
    Bert(BertConfig),
    /// DistilBERT.
    DistilBert(DistilBertConfig),
    /// GPT-2.
    Gpt2(Gpt2Config),
    /// T5 encoder.
    T5(T5Config),
    /// Conv4 (every parameter trainable).
    Conv4(Conv4Config),
    /// The fully connected network of the regression tasks (every parameter
    /// trainable).
    Mlp(MlpShape),
}

/// Widths of the built-in MLP (`models::load::builtin("mlp")`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MlpShape {
    /// Input features.
    pub(crate) inputs: usize,
    /// Hidden layer widths.
    pub(crate) hidden: Vec<usize>,
}

/// What the planner needs to know of a model.
#[derive(Debug, Clone)]
pub(crate) struct ModelSpec {
    /// Architecture.
    pub(crate) family: Family,
    /// LoRA rank and dropout, and which linear modules carry it (module paths).
    pub(crate) lora: Option<LoraPlan>,
    /// Classes of the head.
    pub(crate) classes: usize,
    /// Element types and storage.
    pub(crate) precision: Precision,
    /// Where the frozen weights come from.
    pub(crate) source: Source,
    /// Selective recomputation of the attention cores and adapter-free feed-forward
    /// blocks (`memory_optimization.checkpointing.selective`).
    pub(crate) selective: bool,
}

/// The element types of a model (`models::ModelPrecision`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Precision {
    /// Frozen tensors and activations.
    pub(crate) frozen: DType,
    /// Trainable tensors, pooling, head and loss (the master weights).
    pub(crate) trainable: DType,
    /// Frozen linear weights and token tables in int8 with f32 scales per output
    /// channel (per row for tables).
    pub(crate) int8: bool,
}

impl Precision {
    /// Everything in `dtype`, dense.
    pub(crate) fn uniform(dtype: DType) -> Self {
        Precision {
            frozen: dtype,
            trainable: dtype,
            int8: false,
        }
    }
}

/// Where a model's frozen weights come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// Built in: each tensor drawn in f64 when the model asks for it, then
    /// converted (norms and biases are made as ones and zeros).
    Drawn,
    /// A weights file, read whole before the model is built: the tensors the model
    /// does not keep (`unused` bytes of them, and the dense copies of matrices it
    /// stores in int8) are freed once it is built.
    File { unused: u64 },
    /// No frozen weights (Conv4, the MLP).
    None,
}

/// LoRA settings resolved against the model's modules.
#[derive(Debug, Clone)]
pub(crate) struct LoraPlan {
    /// Rank r.
    pub(crate) rank: usize,
    /// Dropout probability on the LoRA input.
    pub(crate) dropout: f64,
    /// Module paths that carry an adapter.
    pub(crate) targets: Vec<String>,
}

/// The inputs of one batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Inputs {
    /// `n` sequences of `t` tokens.
    Tokens { n: usize, t: usize },
    /// `n` images of `c × side × side`.
    Images { n: usize, c: usize, side: usize },
    /// `n` rows of `d` features, with regression targets of `targets` values each, or
    /// class labels (`targets: None`: tabular classification).
    Dense {
        n: usize,
        d: usize,
        targets: Option<usize>,
    },
}

impl Inputs {
    /// Number of examples.
    pub(crate) fn len(&self) -> usize {
        match *self {
            Inputs::Tokens { n, .. } | Inputs::Images { n, .. } | Inputs::Dense { n, .. } => n,
        }
    }

    /// The same inputs with `n` examples.
    pub(crate) fn with_len(&self, n: usize) -> Inputs {
        match *self {
            Inputs::Tokens { t, .. } => Inputs::Tokens { n, t },
            Inputs::Images { c, side, .. } => Inputs::Images { n, c, side },
            Inputs::Dense { d, targets, .. } => Inputs::Dense { n, d, targets },
        }
    }
}

/// A batch's tensors (token ids and mask, images, or dense rows with regression
/// targets; labels).
#[derive(Debug, Clone)]
pub(crate) struct SimBatch {
    pub(crate) inputs: Inputs,
    pub(crate) ids: Option<T>,
    pub(crate) mask: Option<T>,
    pub(crate) images: Option<T>,
    pub(crate) dense: Option<T>,
    pub(crate) targets: Option<T>,
    pub(crate) labels: T,
}

impl SimBatch {
    /// Allocates a batch's tensors.
    pub(crate) fn new(sim: &Sim, inputs: Inputs, dtype: DType) -> Self {
        match inputs {
            Inputs::Tokens { n, t } => SimBatch {
                inputs,
                ids: Some(sim.tensor(&[n, t], DType::U32)),
                mask: Some(sim.tensor(&[n, t], DType::U32)),
                images: None,
                dense: None,
                targets: None,
                labels: sim.tensor(&[n], DType::U32),
            },
            Inputs::Images { n, c, side } => SimBatch {
                inputs,
                ids: None,
                mask: None,
                images: Some(sim.tensor(&[n, c, side, side], dtype)),
                dense: None,
                targets: None,
                labels: sim.tensor(&[n], DType::U32),
            },
            // Batch::regression: inputs and targets as made (f32), labels zeros;
            // Batch::from_dense (tabular rows): inputs and labels.
            Inputs::Dense { n, d, targets } => SimBatch {
                inputs,
                ids: None,
                mask: None,
                images: None,
                dense: Some(sim.tensor(&[n, d], DType::F32)),
                targets: targets.map(|outputs| sim.tensor(&[n, outputs], DType::F32)),
                labels: sim.tensor(&[n], DType::U32),
            },
        }
    }

    /// Consecutive micro-batches of at most `size` examples: views (`Batch::split`).
    pub(crate) fn split(&self, size: usize) -> Vec<SimBatch> {
        let n = self.inputs.len();
        let rows = |t: &T, start: usize, len: usize| t.narrow(0, start, len);
        (0..n)
            .step_by(size)
            .map(|start| {
                let len = size.min(n - start);
                SimBatch {
                    inputs: self.inputs.with_len(len),
                    ids: self.ids.as_ref().map(|t| rows(t, start, len)),
                    mask: self.mask.as_ref().map(|t| rows(t, start, len)),
                    images: self.images.as_ref().map(|t| rows(t, start, len)),
                    dense: self.dense.as_ref().map(|t| rows(t, start, len)),
                    targets: self.targets.as_ref().map(|t| rows(t, start, len)),
                    labels: rows(&self.labels, start, len),
                }
            })
            .collect()
    }

    /// Number of examples.
    pub(crate) fn len(&self) -> usize {
        self.inputs.len()
    }
}

/// A frozen linear layer with an optional adapter (`nn::LoraLinear`).
#[derive(Debug, Clone)]
struct Linear {
    /// The dense weight, or its int8 values (with `scales`).
    weight: T,
    _scales: Option<T>,
    bias: Option<T>,
    in_out: bool,
    n_out: usize,
    /// Indices of A and B in the parameter list, with the dropout probability.
    lora: Option<(usize, usize, f64)>,
    /// Where full fine-tuning's parameter list holds the weight and bias.
    weight_slot: usize,
    bias_slot: Option<usize>,
}

impl Linear {
    /// `LoraLinear::frozen_forward`: the frozen map alone.
    fn frozen(&self, x: &T) -> T {
        x.frozen_linear(
            &self.weight,
            self.in_out,
            false,
            self.n_out,
            self.bias.as_ref(),
        )
    }

    /// `LoraLinear::frozen_input_gradient`: `g·W`.
    fn frozen_input_gradient(&self, g: &T) -> T {
        let d = self.weight.dims();
        let n_in = if self.in_out { d[0] } else { d[1] };
        g.frozen_linear(&self.weight, self.in_out, true, n_in, None)
    }

    /// Whether `params` trains the weight (full fine-tuning).
    fn is_trained(&self, params: &[T]) -> bool {
        self.weight_slot < params.len()
    }

    fn forward(&self, x: &T, params: &[T], train: bool) -> T {
        let base = if self.is_trained(params) {
            // LoraLinear::forward with the base in the parameters: a differentiable
            // linear map of the trained weight (cast into the input's type).
            let w = params[self.weight_slot].to_dtype(x.dtype());
            let w = if self.in_out { w } else { w.t() };
            match self.bias_slot.map(|b| params[b].to_dtype(x.dtype())) {
                Some(b) => affine(x, &w).broadcast_binary(&b, Bin::Add),
                None => affine(x, &w),
            }
        } else {
            // ops::frozen_linear_matrix: one custom op on the contiguous input.
            x.frozen_linear(
                &self.weight,
                self.in_out,
                false,
                self.n_out,
                self.bias.as_ref(),
            )
        };
        let Some((a, b, p)) = self.lora else {
            return base;
        };
        // A and B cast into the input's type in the graph (mixed precision).
        let (a, b) = (params[a].to_dtype(x.dtype()), params[b].to_dtype(x.dtype()));
        let x = dropout(x, p, train);
        let update = affine(&affine(&x, &a.t()), &b.t());
        base.add(&update.affine(2.0))
    }
}

/// `ops::dropout`: the input itself in evaluation or at p = 0, else `x ⊙ mask` with a
/// mask drawn in f64 and converted.
fn dropout(x: &T, p: f64, train: bool) -> T {
    if !train || p == 0.0 {
        return x.clone();
    }
    let sim = x.sim_handle();
    let elems = x.elem_count() as u64;
    let mask = if x.dtype().bytes() == 8 {
        sim.tensor(&x.dims(), x.dtype())
    } else {
        sim.spike(8 * elems);
        sim.tensor(&x.dims(), x.dtype())
    };
    x.mul(&mask)
}

/// `linear::affine`: `x·W` with the leading dims folded into one matrix product.
fn affine(x: &T, w_in_out: &T) -> T {
    let dims = x.dims();
    let (n_in, n_out) = (w_in_out.dims()[0], w_in_out.dims()[1]);
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let y = x.reshape(&[rows, n_in]).matmul(w_in_out);
    let mut out = dims[..dims.len() - 1].to_vec();
    out.push(n_out);
    y.reshape(&out)
}

/// `linear::linear` with a bias (the classification head).
pub(crate) fn linear_with_bias(x: &T, w: &T, b: &T) -> T {
    let dims = x.dims();
    let n_in = dims[dims.len() - 1];
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let y = x.reshape(&[rows, n_in]).matmul(&w.t());
    let y = y.broadcast_binary(b, Bin::Add);
    let mut out = dims[..dims.len() - 1].to_vec();
    out.push(w.dims()[0]);
    y.reshape(&out)
}

/// The fused layer norm (`layers::LayerNorm::forward`).
fn layer_norm(x: &T, gamma: &T, beta: &T) -> T {
    x.contiguous()
        .custom3(&gamma.contiguous(), &beta.contiguous(), Custom::LayerNorm)
}

/// `ops::norm::rms_norm`: in half precision, on f32 copies of `x` and the weight,
/// the result converted back.
fn rms_norm(x: &T, weight: &T) -> T {
    if x.dtype().is_half() {
        let x32 = x.to_dtype(DType::F32);
        return rms_norm(&x32, &weight.to_dtype(DType::F32)).to_dtype(x.dtype());
    }
    let last = x.rank() - 1;
    let mean_square = x.unary(Un::Sqr).mean_keepdim(&[last]);
    x.broadcast_binary(&mean_square.affine(1.0).unary(Un::Sqrt), Bin::Div)
        .broadcast_binary(weight, Bin::Mul)
}

/// `ops::embedding`: a row lookup in a frozen table (the ids are copied to check them).
fn embedding(ids: &T, table: &T) -> T {
    let dims = ids.dims();
    let flat = ids.reshape(&[ids.elem_count()]);
    ids.sim_handle().spike(4 * ids.elem_count() as u64);
    let mut shape = dims.clone();
    shape.push(table.dims()[1]);
    table.index_select(&flat, 0).reshape(&shape)
}

/// `ops::int8_embedding`: rows of an int8 table dequantized into `dtype` by one
/// untracked op. The ids are read into a vector of indices, and the rows are
/// gathered one at a time into a vector that grows by doubling, so the result holds
/// the row width times the next power of two of the ids.
fn int8_embedding(ids: &T, table: &T, dtype: DType) -> T {
    let sim = ids.sim_handle();
    let count = ids.elem_count();
    let dim = table.dims()[1];
    let mut shape = ids.dims();
    shape.push(dim);
    let capacity = (count.next_power_of_two() * dim) as u64 * dtype.bytes();
    let out = sim.tensor_with_capacity(&shape, dtype, capacity);
    sim.spike(8 * count as u64 + 4 * dim as u64);
    out
}

fn activation(act: Activation, x: &T) -> T {
    match act {
        Activation::Relu => x.unary(Un::Relu),
        Activation::GeluErf | Activation::GeluTanh | Activation::Silu => x
            .contiguous()
            .custom1(Custom::Pointwise { order: 0 }, &x.dims()),
    }
}

/// `attention::split_heads`: `[b, t, h·d]` → `[b, h, t, d]` (a copy).
fn split_heads(x: &T, heads: usize) -> T {
    let d = x.dims();
    let (b, t, w) = (d[0], d[1], d[2]);
    x.reshape(&[b, t, heads, w / heads])
        .transpose(1, 2)
        .contiguous()
}

/// `attention::merge_heads`: `[b, h, t, d]` → `[b, t, h·d]` (a copy).
fn merge_heads(x: &T) -> T {
    let d = x.dims();
    x.transpose(1, 2)
        .contiguous()
        .reshape(&[d[0], d[2], d[1] * d[3]])
}

/// `attention::Core`: heads, scaling, the mask's size in bytes (the 0/1 copy the
/// softmax op keeps, one byte per entry) and the score bias.
#[derive(Clone)]
struct Core {
    heads: usize,
    scaled: bool,
    keep_bytes: u64,
    bias: Option<T>,
}

impl Core {
    fn probabilities(&self, q: &T, k: &T) -> T {
        let mut scores = q.matmul(&k.transpose(2, 3).contiguous());
        if self.scaled {
            scores = scores.affine(0.125);
        }
        if let Some(bias) = &self.bias {
            scores = scores.broadcast_binary(bias, Bin::Add);
        }
        // KeepMask::new: the mask compared with 0 (u8), copied into the op.
        q.sim_handle().spike(2 * self.keep_bytes);
        scores
            .contiguous()
            .custom1_keeping(Custom::Softmax, &scores.dims(), self.keep_bytes)
    }

    fn forward(&self, q: &T, k: &T, v: &T) -> T {
        let probs = self.probabilities(&split_heads(q, self.heads), &split_heads(k, self.heads));
        merge_heads(&probs.matmul(&split_heads(v, self.heads)))
    }

    fn vjp(&self, q: &T, k: &T, v: &T, g: &T) -> Vec<T> {
        let (q, k, v, g) = (
            split_heads(q, self.heads),
            split_heads(k, self.heads),
            split_heads(v, self.heads),
            split_heads(g, self.heads),
        );
        let probs = self.probabilities(&q, &k);
        let d_v = probs.transpose(2, 3).contiguous().matmul(&g);
        let d_probs = g.matmul(&v.transpose(2, 3).contiguous());
        let mut d_scores = softmax_backward(&probs, &d_probs);
        if self.scaled {
            d_scores = d_scores.affine(0.125);
        }
        let d_q = d_scores.matmul(&k);
        let d_k = d_scores.transpose(2, 3).contiguous().matmul(&q);
        vec![merge_heads(&d_q), merge_heads(&d_k), merge_heads(&d_v)]
    }
}

/// `fused_softmax::softmax_backward`.
fn softmax_backward(p: &T, g: &T) -> T {
    if p.dtype().is_half() {
        return p.contiguous().custom2(&g.contiguous(), Custom::SoftmaxGrad);
    }
    let weighted = g.mul(p).sum_keepdim(&[p.rank() - 1]);
    p.mul(&g.broadcast_binary(&weighted, Bin::Sub))
}

/// `attention::multi_head_attention`, one recomputed block with `recompute`.
#[allow(clippy::too_many_arguments)]
fn attention(
    q: &T,
    k: &T,
    v: &T,
    heads: usize,
    scaled: bool,
    keep_bytes: u64,
    bias: Option<&T>,
    recompute: bool,
) -> T {
    let core = Core {
        heads,
        scaled,
        keep_bytes,
        bias: bias.cloned(),
    };
    if !recompute {
        return core.forward(q, k, v);
    }
    let backward = core.clone();
    T::recomputed(
        &[q, k, v],
        SimBlock {
            forward: Box::new(move |x: &[T]| core.forward(&x[0], &x[1], &x[2])),
            vjp: Box::new(move |x: &[T], g: &T| backward.vjp(&x[0], &x[1], &x[2], g)),
            // The op struct, the two closures' Arcs and the `Core` they share.
            struct_bytes: 48 + 2 * 32 + 64,
        },
    )
}

/// `layers::FeedForward::forward`: `output(act(input(x)) ⊙ gate(x))`, one recomputed
/// block with `recompute` when none of its linears has an adapter.
#[allow(clippy::too_many_arguments)]
fn feed_forward(
    input: &Linear,
    gate: Option<&Linear>,
    output: &Linear,
    act: Activation,
    x: &T,
    params: &[T],
    train: bool,
    recompute: bool,
) -> T {
    let frozen = [Some(input), gate, Some(output)]
        .into_iter()
        .flatten()
        .all(|l| l.lora.is_none() && !l.is_trained(params));
    if !(recompute && frozen) {
        let mut inner = activation(act, &input.forward(x, params, train));
        if let Some(gate) = gate {
            inner = inner.mul(&gate.forward(x, params, train));
        }
        return output.forward(&inner, params, train);
    }
    let block = FrozenFeedForward {
        input: input.clone(),
        gate: gate.cloned(),
        output: output.clone(),
        act,
    };
    let backward = block.clone();
    T::recomputed(
        &[x],
        SimBlock {
            forward: Box::new(move |x: &[T]| block.forward(&x[0])),
            vjp: Box::new(move |x: &[T], g: &T| vec![backward.vjp(&x[0], g)]),
            // The op struct, the two closures' Arcs and the block they share: three
            // cloned linears (their module paths are new strings).
            struct_bytes: 48 + 2 * 32 + 3 * 160 + 3 * 48,
        },
    )
}

/// `layers::FrozenFeedForward`.
#[derive(Clone)]
struct FrozenFeedForward {
    input: Linear,
    gate: Option<Linear>,
    output: Linear,
    act: Activation,
}

impl FrozenFeedForward {
    fn forward(&self, x: &T) -> T {
        let mut inner = activation(self.act, &self.input.frozen(x));
        if let Some(gate) = &self.gate {
            inner = inner.mul(&gate.frozen(x));
        }
        self.output.frozen(&inner)
    }

    fn vjp(&self, x: &T, g: &T) -> T {
        let d_inner = self.output.frozen_input_gradient(g);
        let pre = self.input.frozen(x);
        let slope = activation_derivative(self.act, &pre);
        match &self.gate {
            None => self.input.frozen_input_gradient(&d_inner.mul(&slope)),
            Some(gate) => {
                let gated = gate.frozen(x);
                let d_pre = d_inner.mul(&gated).mul(&slope);
                let d_gated = d_inner.mul(&activation(self.act, &pre));
                self.input
                    .frozen_input_gradient(&d_pre)
                    .add(&gate.frozen_input_gradient(&d_gated))
            }
        }
    }
}

/// `Activation::derivative`.
fn activation_derivative(act: Activation, x: &T) -> T {
    match act {
        Activation::Relu => x.detach().cmp().to_dtype(x.dtype()),
        Activation::GeluErf | Activation::GeluTanh | Activation::Silu => x
            .contiguous()
            .custom1(Custom::Pointwise { order: 1 }, &x.dims()),
    }
}

/// `ops::masked_mean_pool`.
fn masked_mean_pool(hidden: &T, mask: &T) -> T {
    let weights = mask.cmp().to_dtype(hidden.dtype());
    let counts = weights.sum_keepdim(&[1]);
    // The zero-count check reads the counts as f64.
    hidden.sim_handle().spike(16 * counts.elem_count() as u64);
    hidden
        .broadcast_binary(&weights.unsqueeze(2), Bin::Mul)
        .sum(&[1])
        .broadcast_binary(&counts, Bin::Div)
}

/// `ops::last_token`.
fn last_token(hidden: &T) -> T {
    let d = hidden.dims();
    let (b, t, w) = (d[0], d[1], d[2]);
    let sim = hidden.sim_handle();
    // The mask read as f64 rows, and the row indices.
    sim.spike(8 * (b * t) as u64 + 24 * b as u64);
    let rows = sim.tensor(&[b], DType::U32);
    hidden.reshape(&[b * t, w]).index_select(&rows, 0)
}

/// `ops::cross_entropy` of logits `[b, c]` (one-hot targets built in f64).
pub(crate) fn cross_entropy(logits: &T) -> T {
    let d = logits.dims();
    let (b, c) = (d[0], d[1]);
    let sim = logits.sim_handle();
    sim.spike(4 * b as u64 + 8 * (b * c) as u64);
    let targets = {
        let f64_targets = sim.tensor(&[b, c], DType::F64);
        f64_targets.to_dtype(logits.dtype())
    };
    let max = logits.detach().max_keepdim(1);
    let shifted = logits.broadcast_binary(&max, Bin::Sub);
    let log_sum = shifted.unary(Un::Exp).sum_keepdim(&[1]).unary(Un::Log);
    let log_softmax = shifted.broadcast_binary(&log_sum, Bin::Sub);
    let per_example = log_softmax.mul(&targets).sum(&[1]);
    per_example.sum_all().affine(1.0 / b as f64).unary(Un::Neg)
}

/// `ops::mse` of a regression batch's outputs against its targets
/// (`data::regression_loss`: the targets converted to the outputs' type first).
fn mse(outputs: &T, targets: &T) -> T {
    let targets = targets.to_dtype(outputs.dtype());
    let count = outputs.elem_count() as f64;
    // mean_all: the sum divided by the count.
    outputs
        .sub(&targets)
        .unary(Un::Sqr)
        .sum_all()
        .affine(1.0 / count)
}

/// `meta::loss::task_loss`: mean squared error for a regression batch, mean
/// cross-entropy otherwise.
pub(crate) fn task_loss(outputs: &T, batch: &SimBatch) -> T {
    match &batch.targets {
        Some(targets) => mse(outputs, targets),
        None => cross_entropy(outputs),
    }
}

/// `engine::TaskLoss::output_hessian_product`: `H_z·ż` of the task loss in the outputs
/// (the mean squared error's `2ż/count`, or the cross-entropy's
/// `(diag(p) − ppᵀ)·ż/N`).
pub(crate) fn output_hessian_product(outputs: &T, batch: &SimBatch, z_dot: &T) -> T {
    if batch.targets.is_some() {
        return z_dot.affine(2.0 / outputs.elem_count().max(1) as f64);
    }
    let n = outputs.dims()[0].max(1) as f64;
    let p = softmax(&outputs.detach());
    let p_dot = p.mul(z_dot).sum_keepdim(&[1]);
    p.mul(z_dot)
        .sub(&p.broadcast_binary(&p_dot, Bin::Mul))
        .affine(1.0 / n)
}

/// Per-batch constants of a transformer stack (`models::StackContext`), alive while
/// its layers run.
#[derive(Debug)]
pub(crate) struct SimContext {
    /// The keep mask: a view of the padding mask, or GPT-2's causal table.
    _keep: T,
    /// Bytes of the 0/1 copy of the mask each attention softmax keeps.
    keep_bytes: u64,
    /// T5's relative-position bias `[1, heads, t, t]`.
    bias: Option<T>,
}

/// The simulated model: frozen weights (allocated by [`SimModel::build`]) and the
/// shapes of its trainable parameters.
#[derive(Debug)]
pub(crate) struct SimModel {
    sim: Sim,
    spec: ModelSpec,
    embeddings: Vec<Slot>,
    layers: Vec<Layer>,
    final_norm: Vec<Slot>,
    /// Full fine-tuning's extra parameters, in slot order: every frozen tensor.
    base: Vec<T>,
    /// Shapes of the trainable tensors, in ParamSet order.
    param_shapes: Vec<Vec<usize>>,
    /// Conv4 parameter indices per block (conv weight, conv bias, bn γ, bn β).
    conv_blocks: Vec<[usize; 4]>,
    head: (usize, usize),
    /// Scales of an int8 token table.
    _table_scales: Option<T>,
}

#[derive(Debug)]
struct Layer {
    linears: Vec<Linear>,
    norms: Vec<Slot>,
}

/// A frozen tensor (`layers::Frozen`) and where full fine-tuning's parameter list
/// holds it: read from there when the list is that long.
#[derive(Debug, Clone)]
struct Slot {
    tensor: T,
    slot: usize,
}

impl Slot {
    /// The trained copy (in the frozen type) or the frozen tensor.
    fn get(&self, params: &[T]) -> T {
        match params.get(self.slot) {
            Some(trained) => trained.to_dtype(self.tensor.dtype()),
            None => self.tensor.clone(),
        }
    }
}

/// Module paths of a family's linear layers in one layer, with their (in, out) sizes.
fn layer_linears(family: &Family, l: usize) -> Vec<(String, usize, usize)> {
    match family {
        Family::Bert(c) => {
            let (h, ff) = (c.hidden_size, c.intermediate_size);
            let p = format!("encoder.layer.{l}");
            vec![
                (format!("{p}.attention.self.query"), h, h),
                (format!("{p}.attention.self.key"), h, h),
                (format!("{p}.attention.self.value"), h, h),
                (format!("{p}.attention.output.dense"), h, h),
                (format!("{p}.intermediate.dense"), h, ff),
                (format!("{p}.output.dense"), ff, h),
            ]
        }
        Family::DistilBert(c) => {
            let (h, ff) = (c.dim, c.hidden_dim);
            let p = format!("transformer.layer.{l}");
            vec![
                (format!("{p}.attention.q_lin"), h, h),
                (format!("{p}.attention.k_lin"), h, h),
                (format!("{p}.attention.v_lin"), h, h),
                (format!("{p}.attention.out_lin"), h, h),
                (format!("{p}.ffn.lin1"), h, ff),
                (format!("{p}.ffn.lin2"), ff, h),
            ]
        }
        Family::Gpt2(c) => {
            let (e, inner) = (c.n_embd, c.n_inner.unwrap_or(4 * c.n_embd));
            let p = format!("h.{l}");
            vec![
                (format!("{p}.attn.c_attn"), e, 3 * e),
                (format!("{p}.attn.c_proj"), e, e),
                (format!("{p}.mlp.c_fc"), e, inner),
                (format!("{p}.mlp.c_proj"), inner, e),
            ]
        }
        Family::T5(c) => {
            let (d, inner, ff) = (c.d_model, c.num_heads * c.d_kv, c.d_ff);
            let a = format!("encoder.block.{l}.layer.0.SelfAttention");
            let f = format!("encoder.block.{l}.layer.1.DenseReluDense");
            let gated = c.feed_forward_proj.starts_with("gated-");
            let mut v = vec![
                (format!("{a}.q"), d, inner),
                (format!("{a}.k"), d, inner),
                (format!("{a}.v"), d, inner),
                (format!("{a}.o"), inner, d),
            ];
            if gated {
                v.push((format!("{f}.wi_0"), d, ff));
                v.push((format!("{f}.wi_1"), d, ff));
            } else {
                v.push((format!("{f}.wi"), d, ff));
            }
            v.push((format!("{f}.wo"), ff, d));
            v
        }
        Family::Conv4(_) | Family::Mlp(_) => Vec::new(),
    }
}

/// Number of transformer layers.
pub(crate) fn layer_count(family: &Family) -> usize {
    match family {
        Family::Bert(c) => c.num_hidden_layers,
        Family::DistilBert(c) => c.n_layers,
        Family::Gpt2(c) => c.n_layer,
        Family::T5(c) => c.num_layers,
        Family::Conv4(_) | Family::Mlp(_) => 0,
    }
}

/// Every linear module path of the model, in order (for LoRA target resolution).
pub(crate) fn module_paths(family: &Family) -> Vec<String> {
    (0..layer_count(family))
        .flat_map(|l| layer_linears(family, l).into_iter().map(|(p, _, _)| p))
        .collect()
}

fn activation_of(family: &Family) -> Activation {
    let name = match family {
        Family::Bert(c) => c.hidden_act.clone(),
        Family::DistilBert(c) => c.activation.clone(),
        Family::Gpt2(c) => c.activation_function.clone(),
        Family::T5(c) => {
            let p = c.feed_forward_proj.as_str();
            match p.split_once('-') {
                Some(("gated", "gelu")) => "gelu_new".to_string(),
                Some((_, act)) => act.to_string(),
                None => p.to_string(),
            }
        }
        Family::Conv4(_) | Family::Mlp(_) => "relu".into(),
    };
    Activation::from_hf(&name).unwrap_or(Activation::GeluErf)
}

impl SimModel {
    /// Allocates the frozen weights (in [`super::sim::Category::Weights`]) and lays out
    /// the trainable parameters.
    ///
    /// In the order the model code loads them: drawn weights cost their f64 draw on
    /// top while they are made; a file's tensors the model does not keep stay alive
    /// until it is built; an int8 matrix is quantized from its dense copy (read in f64
    /// twice, as a tensor and as a vector), which is then dropped.
    pub(crate) fn build(sim: &Sim, spec: &ModelSpec) -> SimModel {
        let dt = spec.precision.frozen;
        // The file's tensors beyond those the model keeps, until it is built.
        let mut file_only: Vec<T> = Vec::new();
        if let Source::File { unused } = spec.source {
            if unused > 0 {
                file_only.push(sim.tensor(&[unused as usize], DType::U8));
            }
        }
        // A dense frozen tensor; `drawn` for the randomly initialised ones (matrices
        // and tables, not norms and biases).
        let dense = |dims: &[usize], drawn: bool| {
            let t = sim.tensor(dims, dt);
            if drawn && spec.source == Source::Drawn && dt != DType::F64 {
                sim.spike(8 * t.elem_count() as u64);
            }
            t
        };
        let w = |dims: &[usize]| dense(dims, false);
        let unslotted = |tensor: T| Slot {
            tensor,
            slot: usize::MAX,
        };
        // A matrix (`channels` output channels), int8 when quantized: the values and
        // scales, made from the dense copy.
        let mut matrix = |dims: &[usize], channels: usize| -> (T, Option<T>) {
            let full = dense(dims, true);
            if !spec.precision.int8 {
                return (full, None);
            }
            // `Int8Matrix::quantize`: an f64 tensor (the dense one itself in f64) read
            // into an f64 vector.
            let copies = if dt == DType::F64 { 1 } else { 2 };
            sim.spike(copies * 8 * full.elem_count() as u64);
            let values = sim.tensor(dims, DType::U8);
            let scales = sim.tensor(&[channels], DType::F32);
            if matches!(spec.source, Source::File { .. }) {
                file_only.push(full);
            }
            (values, Some(scales))
        };
        let width = match &spec.family {
            Family::Bert(c) => c.hidden_size,
            Family::DistilBert(c) => c.dim,
            Family::Gpt2(c) => c.n_embd,
            Family::T5(c) => c.d_model,
            Family::Conv4(c) => {
                let mut side = c.image_size;
                for _ in 0..4 {
                    side /= 2;
                }
                c.channels * side * side
            }
            Family::Mlp(m) => m.hidden.last().copied().unwrap_or(m.inputs),
        };
        // The layers first, then the embeddings, as every family's constructor.
        let paths = module_paths(&spec.family);
        let targets = spec.lora.as_ref().map(|l| &l.targets);
        // LoRA tensors are ordered by name (A before B of a module), then the head.
        let mut lora_names: Vec<(String, Vec<usize>)> = Vec::new();
        let mut layers = Vec::new();
        for l in 0..layer_count(&spec.family) {
            let mut linears = Vec::new();
            for (path, n_in, n_out) in layer_linears(&spec.family, l) {
                let in_out = matches!(spec.family, Family::Gpt2(_));
                let (weight, scales) = if in_out {
                    matrix(&[n_in, n_out], n_out)
                } else {
                    matrix(&[n_out, n_in], n_out)
                };
                let bias = (!matches!(spec.family, Family::T5(_))).then(|| w(&[n_out]));
                let lora = match (targets, &spec.lora) {
                    (Some(t), Some(plan)) if t.contains(&path) => {
                        lora_names.push((format!("{path}.lora_A"), vec![plan.rank, n_in]));
                        lora_names.push((format!("{path}.lora_B"), vec![n_out, plan.rank]));
                        Some((lora_names.len() - 2, lora_names.len() - 1, plan.dropout))
                    }
                    _ => None,
                };
                linears.push(Linear {
                    weight,
                    _scales: scales,
                    bias,
                    in_out,
                    n_out,
                    lora,
                    weight_slot: usize::MAX,
                    bias_slot: None,
                });
            }
            let norms = match &spec.family {
                Family::Bert(_) | Family::DistilBert(_) | Family::Gpt2(_) => {
                    (0..4).map(|_| unslotted(w(&[width]))).collect()
                }
                Family::T5(_) => (0..2).map(|_| unslotted(w(&[width]))).collect(),
                Family::Conv4(_) | Family::Mlp(_) => Vec::new(),
            };
            layers.push(Layer { linears, norms });
        }
        let mut embeddings = Vec::new();
        let mut final_norm = Vec::new();
        let mut table = |vocab: usize| {
            let (t, scales) = matrix(&[vocab, width], vocab);
            embeddings.push(unslotted(t));
            scales
        };
        let table_scales = match &spec.family {
            Family::Bert(c) => table(c.vocab_size),
            Family::DistilBert(c) => table(c.vocab_size),
            Family::Gpt2(c) => table(c.vocab_size),
            Family::T5(c) => table(c.vocab_size),
            Family::Conv4(_) | Family::Mlp(_) => None,
        };
        match &spec.family {
            Family::Bert(c) => {
                embeddings.push(unslotted(dense(&[c.max_position_embeddings, width], true)));
                embeddings.push(unslotted(dense(&[c.type_vocab_size, width], true)));
                embeddings.push(unslotted(w(&[width])));
                embeddings.push(unslotted(w(&[width])));
            }
            Family::DistilBert(c) => {
                embeddings.push(unslotted(dense(&[c.max_position_embeddings, width], true)));
                embeddings.push(unslotted(w(&[width])));
                embeddings.push(unslotted(w(&[width])));
            }
            Family::Gpt2(c) => {
                embeddings.push(unslotted(dense(&[c.n_positions, width], true)));
                final_norm.push(unslotted(w(&[width])));
                final_norm.push(unslotted(w(&[width])));
            }
            Family::T5(c) => {
                embeddings.push(unslotted(dense(
                    &[c.relative_attention_num_buckets, c.num_heads],
                    true,
                )));
                final_norm.push(unslotted(w(&[width])));
            }
            Family::Conv4(_) | Family::Mlp(_) => {}
        }
        debug_assert!(paths.len() >= lora_names.len() / 2);
        // Sort LoRA tensors by name as `init_transformer_params` does, remapping indices.
        let mut order: Vec<usize> = (0..lora_names.len()).collect();
        order.sort_by(|&a, &b| lora_names[a].0.cmp(&lora_names[b].0));
        let mut position = vec![0; lora_names.len()];
        for (new, &old) in order.iter().enumerate() {
            position[old] = new;
        }
        for layer in &mut layers {
            for lin in &mut layer.linears {
                if let Some((a, b, p)) = lin.lora {
                    lin.lora = Some((position[a], position[b], p));
                }
            }
        }
        let mut param_shapes: Vec<Vec<usize>> =
            order.iter().map(|&i| lora_names[i].1.clone()).collect();
        let mut conv_blocks = Vec::new();
        if let Family::Conv4(c) = &spec.family {
            for block in 0..4 {
                let c_in = if block == 0 {
                    c.in_channels
                } else {
                    c.channels
                };
                let base = param_shapes.len();
                param_shapes.push(vec![c.channels, c_in, 3, 3]);
                param_shapes.push(vec![c.channels]);
                param_shapes.push(vec![c.channels]);
                param_shapes.push(vec![c.channels]);
                conv_blocks.push([base, base + 1, base + 2, base + 3]);
            }
        }
        if let Family::Mlp(m) = &spec.family {
            // layers.{i}.weight [width, fan_in] and layers.{i}.bias, in order.
            let mut fan_in = m.inputs;
            for &width in &m.hidden {
                param_shapes.push(vec![width, fan_in]);
                param_shapes.push(vec![width]);
                fan_in = width;
            }
        }
        let head = (param_shapes.len(), param_shapes.len() + 1);
        param_shapes.push(vec![spec.classes, width]);
        param_shapes.push(vec![spec.classes]);
        // Full fine-tuning's list continues after the initialisation's with every
        // frozen tensor (`TransformerClassifier::base_tensors`; the order does not
        // change what is allocated).
        let mut base = Vec::new();
        let mut next_slot = |t: &T| {
            base.push(t.clone());
            param_shapes.len() + base.len() - 1
        };
        for slot in embeddings.iter_mut().chain(final_norm.iter_mut()) {
            slot.slot = next_slot(&slot.tensor);
        }
        for layer in &mut layers {
            for slot in &mut layer.norms {
                slot.slot = next_slot(&slot.tensor);
            }
            for lin in &mut layer.linears {
                lin.weight_slot = next_slot(&lin.weight);
                lin.bias_slot = lin.bias.as_ref().map(&mut next_slot);
            }
        }
        // The weights' tensors are dropped once the model holds its own
        // (`Weights::without_tensors`).
        drop(file_only);
        SimModel {
            sim: sim.clone(),
            spec: spec.clone(),
            embeddings,
            layers,
            final_norm,
            base,
            param_shapes,
            conv_blocks,
            head,
            _table_scales: table_scales,
        }
    }

    /// Full fine-tuning's extra parameters (`FewShotModel::full_params` beyond the
    /// initialisation): every frozen tensor in the trainable type, the same storage
    /// where the types agree. An int8 model has none (it cannot be fine-tuned).
    pub(crate) fn base_params(&self) -> Vec<T> {
        let trainable = self.spec.precision.trainable;
        self.base
            .iter()
            .map(|t| t.to_dtype(trainable).detach())
            .collect()
    }

    /// Elements of [`base_params`](Self::base_params), without making them.
    pub(crate) fn base_numel(&self) -> u64 {
        self.base.iter().map(|t| t.elem_count() as u64).sum()
    }

    /// Shapes of the trainable tensors.
    pub(crate) fn param_shapes(&self) -> &[Vec<usize>] {
        &self.param_shapes
    }

    /// The simulation the model lives in.
    pub(crate) fn sim(&self) -> Sim {
        self.sim.clone()
    }

    /// Element types.
    pub(crate) fn precision(&self) -> Precision {
        self.spec.precision
    }

    /// `FewShotModel::logits` at `params` on `batch`.
    pub(crate) fn logits(&self, params: &[T], batch: &SimBatch, train: bool) -> T {
        let features = self.features(params, batch, train);
        self.head(&features, params)
    }

    /// `FewShotModel::features`: the pooled features the head reads.
    pub(crate) fn features(&self, params: &[T], batch: &SimBatch, train: bool) -> T {
        match &self.spec.family {
            Family::Conv4(c) => self.conv4_features(c, params, batch),
            Family::Mlp(_) => self.mlp_features(params, batch),
            _ => self.pool(&self.encode(params, batch, train), batch),
        }
    }

    /// The positions of the head's weight and bias in the parameter list.
    pub(crate) fn head_params(&self) -> (usize, usize) {
        self.head
    }

    /// The classification (or regression) head on pooled features.
    fn head(&self, features: &T, params: &[T]) -> T {
        linear_with_bias(features, &params[self.head.0], &params[self.head.1])
    }

    /// `TransformerClassifier::encode`: the batch's context, the embedding, every
    /// layer and the finish; the context is dropped on return, as there.
    fn encode(&self, params: &[T], batch: &SimBatch, train: bool) -> T {
        let context = self.stack_context(batch, params);
        let mut h = self.embed(params, batch, train);
        for index in 0..self.num_layers() {
            h = self.layer(index, &h, &context, params, train);
        }
        let out = self.finish(&h, params);
        drop(context);
        out
    }

    /// Pooled features of final hidden states (`models::pool`), in the trainable type
    /// (an f32 copy of the hidden states in mixed precision).
    fn pool(&self, hidden: &T, batch: &SimBatch) -> T {
        let hidden = &hidden.to_dtype(self.spec.precision.trainable);
        match self.spec.family {
            Family::Gpt2(_) => last_token(hidden),
            _ => masked_mean_pool(hidden, batch.mask.as_ref().expect("tokens")),
        }
    }

    /// `models::tail_logits`: logits from the last layer's output (finish, pooling,
    /// head), the tail segment of gradient checkpointing.
    pub(crate) fn tail_logits(&self, last: &T, params: &[T], batch: &SimBatch) -> T {
        let features = self.pool(&self.finish(last, params), batch);
        self.head(&features, params)
    }

    /// Number of transformer layers (0 for Conv4 and the MLP).
    pub(crate) fn num_layers(&self) -> usize {
        layer_count(&self.spec.family)
    }

    /// `TransformerClassifier::stack_context`: the keep mask every layer's softmax
    /// reads and, for T5, the relative-position bias.
    pub(crate) fn stack_context(&self, batch: &SimBatch, params: &[T]) -> SimContext {
        let Inputs::Tokens { n, t } = batch.inputs else {
            unreachable!("transformers read tokens")
        };
        let mask = batch.mask.as_ref().expect("tokens");
        // attention::padding_keep: a `[n, 1, 1, t]` view of the mask.
        let padding = || mask.reshape(&[n, 1, 1, t]);
        match &self.spec.family {
            Family::Bert(_) | Family::DistilBert(_) => SimContext {
                _keep: padding(),
                keep_bytes: (n * t) as u64,
                bias: None,
            },
            Family::Gpt2(_) => {
                // attention::causal_keep: the lower-triangular table times the padding
                // mask, `[n, 1, t, t]` u32.
                let sim = mask.sim_handle();
                sim.spike(4 * (t * t) as u64);
                let causal = sim.tensor(&[1, 1, t, t], DType::U32);
                SimContext {
                    _keep: causal.broadcast_binary(&padding(), Bin::Mul),
                    keep_bytes: (n * t * t) as u64,
                    bias: None,
                }
            }
            Family::T5(_) => {
                // T5Encoder::position_bias: bucket ids, a lookup in the frozen table,
                // permuted to [1, heads, t, t] and copied.
                let sim = mask.sim_handle();
                let buckets = sim.tensor(&[t, t], DType::U32);
                let looked = embedding(&buckets, &self.embeddings[1].get(params));
                drop(buckets);
                SimContext {
                    _keep: padding(),
                    keep_bytes: (n * t) as u64,
                    bias: Some(looked.permute(&[2, 0, 1]).unsqueeze(0).contiguous()),
                }
            }
            Family::Conv4(_) | Family::Mlp(_) => unreachable!("not a transformer stack"),
        }
    }

    /// The token table's rows at `ids` (`layers::FrozenTable::lookup`).
    fn words(&self, ids: &T, params: &[T]) -> T {
        if self.spec.precision.int8 {
            int8_embedding(ids, &self.embeddings[0].tensor, self.spec.precision.frozen)
        } else {
            embedding(ids, &self.embeddings[0].get(params))
        }
    }

    /// `TransformerClassifier::embed`: hidden states entering layer 0.
    pub(crate) fn embed(&self, params: &[T], batch: &SimBatch, _train: bool) -> T {
        let Inputs::Tokens { t, .. } = batch.inputs else {
            unreachable!("transformers read tokens")
        };
        let ids = batch.ids.as_ref().expect("tokens");
        match &self.spec.family {
            Family::Bert(_) => {
                let words = self.words(ids, params);
                let positions = self.embeddings[1].get(params).narrow(0, 0, t);
                let types = self.embeddings[2].get(params).narrow(0, 0, 1).unsqueeze(0);
                let x = words
                    .broadcast_binary(&positions, Bin::Add)
                    .broadcast_binary(&types, Bin::Add);
                layer_norm(
                    &x,
                    &self.embeddings[3].get(params),
                    &self.embeddings[4].get(params),
                )
            }
            Family::DistilBert(_) => {
                let words = self.words(ids, params);
                let positions = self.embeddings[1].get(params).narrow(0, 0, t);
                layer_norm(
                    &words.broadcast_binary(&positions, Bin::Add),
                    &self.embeddings[2].get(params),
                    &self.embeddings[3].get(params),
                )
            }
            Family::Gpt2(_) => self
                .words(ids, params)
                .broadcast_binary(&self.embeddings[1].get(params).narrow(0, 0, t), Bin::Add),
            Family::T5(_) => self.words(ids, params),
            Family::Conv4(_) | Family::Mlp(_) => unreachable!("not a transformer stack"),
        }
    }

    /// `TransformerClassifier::layer`: layer `index` applied to `x`.
    pub(crate) fn layer(
        &self,
        index: usize,
        x: &T,
        context: &SimContext,
        params: &[T],
        train: bool,
    ) -> T {
        let family = &self.spec.family;
        let layer = &self.layers[index];
        let lin = &layer.linears;
        let keep_bytes = context.keep_bytes;
        let selective = self.spec.selective;
        match family {
            Family::Bert(_) | Family::DistilBert(_) => {
                let heads = match family {
                    Family::Bert(c) => c.num_attention_heads,
                    Family::DistilBert(c) => c.n_heads,
                    _ => unreachable!("matched above"),
                };
                let q = lin[0].forward(x, params, train);
                let k = lin[1].forward(x, params, train);
                let v = lin[2].forward(x, params, train);
                let context = attention(&q, &k, &v, heads, true, keep_bytes, None, selective);
                let attended = lin[3].forward(&context, params, train);
                let x = layer_norm(
                    &attended.add(x),
                    &layer.norms[0].get(params),
                    &layer.norms[1].get(params),
                );
                let out = feed_forward(
                    &lin[4],
                    None,
                    &lin[5],
                    activation_of(family),
                    &x,
                    params,
                    train,
                    selective,
                );
                layer_norm(
                    &out.add(&x),
                    &layer.norms[2].get(params),
                    &layer.norms[3].get(params),
                )
            }
            Family::Gpt2(c) => {
                let e = c.n_embd;
                let qkv = lin[0].forward(
                    &layer_norm(x, &layer.norms[0].get(params), &layer.norms[1].get(params)),
                    params,
                    train,
                );
                let (q, k, v) = (
                    qkv.narrow(2, 0, e),
                    qkv.narrow(2, e, e),
                    qkv.narrow(2, 2 * e, e),
                );
                let context = attention(&q, &k, &v, c.n_head, true, keep_bytes, None, selective);
                let x = x.add(&lin[1].forward(&context, params, train));
                let out = feed_forward(
                    &lin[2],
                    None,
                    &lin[3],
                    activation_of(family),
                    &layer_norm(&x, &layer.norms[2].get(params), &layer.norms[3].get(params)),
                    params,
                    train,
                    selective,
                );
                x.add(&out)
            }
            Family::T5(c) => {
                let gated = c.feed_forward_proj.starts_with("gated-");
                let h = x;
                let x = rms_norm(h, &layer.norms[0].get(params));
                let q = lin[0].forward(&x, params, train);
                let k = lin[1].forward(&x, params, train);
                let v = lin[2].forward(&x, params, train);
                let attended = attention(
                    &q,
                    &k,
                    &v,
                    c.num_heads,
                    false,
                    keep_bytes,
                    context.bias.as_ref(),
                    selective,
                );
                let h = h.add(&lin[3].forward(&attended, params, train));
                let x = rms_norm(&h, &layer.norms[1].get(params));
                let (gate, wo) = if gated {
                    (Some(&lin[5]), &lin[6])
                } else {
                    (None, &lin[5])
                };
                let out = feed_forward(
                    &lin[4],
                    gate,
                    wo,
                    activation_of(family),
                    &x,
                    params,
                    train,
                    selective,
                );
                h.add(&out)
            }
            Family::Conv4(_) | Family::Mlp(_) => unreachable!("not a transformer stack"),
        }
    }

    /// `TransformerClassifier::finish`: GPT-2's final layer norm, T5's final RMS norm,
    /// the identity otherwise.
    fn finish(&self, h: &T, params: &[T]) -> T {
        match &self.spec.family {
            Family::Gpt2(_) => layer_norm(
                h,
                &self.final_norm[0].get(params),
                &self.final_norm[1].get(params),
            ),
            Family::T5(_) => rms_norm(h, &self.final_norm[0].get(params)),
            _ => h.clone(),
        }
    }

    /// `Mlp::features`: ReLU layers on the dense inputs.
    fn mlp_features(&self, params: &[T], batch: &SimBatch) -> T {
        let mut x = batch.dense.as_ref().expect("dense inputs").clone();
        for pair in params[..self.head.0].chunks(2) {
            x = linear_with_bias(&x, &pair[0], &pair[1]).unary(Un::Relu);
        }
        x
    }

    fn conv4_features(&self, c: &Conv4Config, params: &[T], batch: &SimBatch) -> T {
        let mut x = batch.images.as_ref().expect("images").clone();
        for block in &self.conv_blocks {
            let conv = {
                let (weight, bias) = (&params[block[0]], &params[block[1]]);
                let y = x.conv2d(weight, ConvParams { padding: 1 });
                y.broadcast_binary(&bias.reshape(&[1, c.channels, 1, 1]), Bin::Add)
            };
            let normed = batch_norm(&conv, &params[block[2]], &params[block[3]]);
            x = max_pool(&normed.unary(Un::Relu), 2);
        }
        let d = x.dims();
        x.reshape(&[d[0], d[1] * d[2] * d[3]])
    }
}

/// `ops::norm::batch_norm` with the batch's statistics.
fn batch_norm(x: &T, gamma: &T, beta: &T) -> T {
    let dims = x.dims();
    let c = dims[1];
    let moved = x.transpose(0, 1).contiguous();
    let flat = moved.reshape(&[c, moved.elem_count() / c]);
    let centered = flat.broadcast_binary(&flat.mean_keepdim(&[1]), Bin::Sub);
    let var = centered.unary(Un::Sqr).mean_keepdim(&[1]);
    let normed = centered.broadcast_binary(&var.affine(1.0).unary(Un::Sqrt), Bin::Div);
    let scaled = normed
        .broadcast_binary(&gamma.reshape(&[c, 1]), Bin::Mul)
        .broadcast_binary(&beta.reshape(&[c, 1]), Bin::Add);
    let mut moved_dims = dims.clone();
    moved_dims.swap(0, 1);
    scaled.reshape(&moved_dims).transpose(0, 1).contiguous()
}

/// `ops::max_pool`: windows as extra dims, max over them.
fn max_pool(x: &T, k: usize) -> T {
    let d = x.dims();
    let (n, c, h, w) = (d[0], d[1], d[2], d[3]);
    let (ho, wo) = (h / k, w / k);
    let x = x.narrow(2, 0, ho * k).narrow(3, 0, wo * k).contiguous();
    x.reshape(&[n, c, ho, k, wo, k]).max(5).max(3)
}

impl T {
    /// The simulation this tensor belongs to.
    fn sim_handle(&self) -> Sim {
        self.sim_of()
    }
}

/// `ops::softmax` over the last dim (the fused op).
pub(crate) fn softmax(x: &T) -> T {
    x.contiguous().custom1(Custom::Softmax, &x.dims())
}
