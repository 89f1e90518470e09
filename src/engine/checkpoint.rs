//! Gradient checkpointing for transformer stacks and vision backbones: the forward
//! pass keeps only the inputs of chosen layers (a backbone's stages), and the
//! backward pass rebuilds one segment's graph at a time from its stored input — for gradients, Hessian-vector products and
//! Gauss-Newton products alike, so that every learner (including the second-order
//! recursions of `maml` recompute mode and `melora`) runs with one segment's
//! activations alive instead of the whole stack's.
//!
//! # The chain
//!
//! A model is a chain (see [`LayerChain`]): the embedding `h₀ = E(θ)` (a vision
//! backbone's stem), layers `h_{l+1} = F_l(h_l, θ)` (its stages), and the tail
//! `Φ(h_L, θ)` (final norm, pooling, head, and the task's loss). A [`CheckpointPlan`] names the layers whose
//! input is kept, `B₀ < B₁ < … < B_{n−1}`; they cut the chain into segments:
//! segment 0 is the embedding followed by layers `0..B₀` (just the embedding when
//! `B₀ = 0`), segment k ≥ 1 is layers `B_{k−1}..B_k` (with `B_n = L`). The output of
//! segment k is the input of segment k+1; those outputs, and the last one `h_L`, are
//! all the forward pass keeps. Segment 0 is recomputed from the tokens, so it has no
//! stored input.
//!
//! # First-order gradient
//!
//! Forward at detached θ (candle records no graph at all), keeping the segment
//! outputs; the last segment runs with its graph and the tail on top, and their
//! backward gives the head's and last segment's gradient and the adjoint `a` of the
//! last segment's input. Then for each earlier segment: rebuild
//! its graph from a leaf copy of its stored input, back-propagate the surrogate scalar
//! `⟨F(h, θ), a⟩` (a vector-Jacobian product), which gives the segment's share of the
//! θ-gradient and the adjoint of its input; drop the graph. The sum of the shares is
//! the gradient of the unsegmented graph — the same sums of the same products, so it
//! agrees to float rounding.
//!
//! # Hessian-vector products (Pearlmutter's R-operator, exact)
//!
//! Differentiating the gradient computation above along θ + εv:
//!
//! - forward sweep: with the segment output also keep its tangent
//!   `ḣ_out = J_h·ḣ_in + J_θ·v`, a Jacobian-vector product obtained from two reverse
//!   passes on the segment graph: `ḣ_out = ∇_u ⟨∇_{(h,θ)}⟨F(h,θ), u⟩, (ḣ_in, v)⟩` with
//!   `u` a zero variable (the inner gradient is linear in `u`, so differentiating it
//!   along `(ḣ_in, v)` and then in `u` gives `J·(ḣ_in, v)`);
//! - tail: `G = ∇_{(h,θ)}Φ` with its graph; `∇_{(h,θ)}⟨G, (ḣ_L, v)⟩ = (ȧ_L, (Hv)_tail)`;
//! - backward sweep, each segment from the last, with `a`, `ȧ` of its output:
//!   `s̃(h, θ) = ⟨F(h,θ), ȧ⟩ + ⟨∇_{(h,θ)}⟨F(h,θ), a⟩, (ḣ_in, v)⟩`, whose gradient is
//!   `(ȧ_in, (Hv)_segment)`; the inner gradient `∇⟨F, a⟩` is at once the ordinary
//!   backward step `(a_in, g_segment)`.
//!
//! So the gradient and any number of products come from one forward sweep and one
//! backward sweep, one segment graph alive at a time, plus the stored outputs and
//! their tangents (one tensor `[b, t, width]` per boundary and per vector).
//!
//! # Block products
//!
//! A block product wants, for a vector `v` zero outside one tensor `i`, only tensor
//! `i`'s part of `H·v` (`H_ii·v_i`: MELoRA's block-diagonal approximation, the exact
//! diagonal). Its tangent is zero below the first segment that reads tensor `i`, and
//! below that segment its backward sweep would only produce cross terms nobody wants.
//! So one forward finds, from each segment's graph, the first segment reading each
//! tensor and keeps the outputs all sweeps start from; probes are grouped by that
//! segment; a group's tangent sweep starts at its lowest one and its backward sweep
//! stops there. Each directional derivative has the one term `⟨G_i, v_i⟩` instead of
//! one per tensor of which all but one are zero.
//!
//! # Gauss-Newton products
//!
//! `Jᵀ·H_z·J·v` with z the logits: the forward tangent sweep gives `ḣ_L`, the tail's
//! Jacobian-vector product (the same double-backward trick) gives `ż = J·v`,
//! `r = H_z·ż` is formed from the softmax, and the first-order backward sweep with the
//! surrogate `⟨z, r⟩` at the tail gives `Jᵀr`.
//!
//! # What is not checkpointed
//!
//! - Gradients whose graph is kept to be differentiated again *across* inner steps
//!   (full-graph MAML's inner steps, [`GradGraph::Keep`](crate::tensor::GradGraph)):
//!   candle returns gradients only at leaf variables, so a segment's input gradient
//!   needs a leaf input, which cuts the dependence of the later segments' gradients
//!   on the earlier layers' θ; keeping that dependence needs every segment's graph,
//!   which is the whole unsegmented graph. Full-graph MAML keeps every graph by
//!   definition, so its inner steps run unsegmented; its query gradient is
//!   checkpointed. `meta_learning.inner.mode: recompute` gives the same
//!   meta-gradient with checkpointed Hessian-vector products.
//! - Forward-only evaluation: without a graph nothing is kept anyway.

use std::collections::HashSet;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::data::Batch;
use crate::models::{FewShotModel, LayerChain, StackContext};
use crate::nn::Mode;
use crate::tensor::second_order::{ensure_second_order, first_order_backward};
use crate::tensor::ParamSet;
use crate::{Error, Result};

use super::{inner, FeaturePullback};

use super::{CheckpointPlan, GradEngine, Gradient, Loss, TaskLoss};

/// Tangent vectors carried through one sweep: more share the segment graphs
/// (one forward and one kept backward per segment for all of them) but each keeps a
/// tangent per boundary, so sweeps take at most this many and callers with more
/// (exact diagonals, block products) run several sweeps.
const TANGENT_GROUP: usize = 8;

/// The error for checkpointing a model that is not a chain of layers (also the
/// memory planner's).
pub(crate) fn not_a_stack() -> Error {
    Error::InvalidArgument(
        "gradient checkpointing recomputes transformer layers (BERT, DistilBERT, GPT-2, T5) \
         or the stages of a vision backbone (conv4, conv6, resnet12, resnet18, resnet34); \
         this model has neither, so set \
         memory_optimization.checkpointing.enabled to false (micro-batches, \
         memory_optimization.gradient_accumulation.micro_batch, lower its memory)"
            .into(),
    )
}

/// A segment: the layers it runs. Segment 0 starts from the embedding (recomputed
/// from the tokens), every other one from the previous segment's stored output.
#[derive(Debug, Clone)]
struct Segment {
    layers: std::ops::Range<usize>,
}

/// The checkpointing engine for a model's [`LayerChain`] (a transformer's layers, a
/// vision backbone's stages) and a [`CheckpointPlan`]: the
/// [`GradEngine`] whose gradients and products come from segment sweeps, one segment
/// graph alive at a time, equal to [`super::WholeGraph`]'s to float rounding.
///
/// ```
/// use melora::engine::{CheckpointPlan, Checkpointed, GradEngine, WholeGraph};
/// use melora::models::{load::builtin, FewShotModel};
/// use melora::data::{EpisodeSource, SyntheticText};
/// use melora::nn::Mode;
///
/// melora::init();
/// let model = builtin("tiny-bert", 0, candle_core::DType::F32, None, 5)?;
/// let params = model.init_params(0)?;
/// let task = SyntheticText::default().episode(0)?;
/// let segmented = Checkpointed::new(&*model, &CheckpointPlan::Every(1))?;
/// let a = segmented.gradient(&params, &task.support, Mode::Eval)?.grads;
/// let b = WholeGraph::new(&*model).gradient(&params, &task.support, Mode::Eval)?.grads;
/// assert!(a.sub(&b)?.norm()? <= 1e-5 * b.norm()?);
/// # Ok::<(), melora::Error>(())
/// ```
pub struct Checkpointed<'a> {
    model: &'a dyn FewShotModel,
    chain: &'a dyn LayerChain,
    segments: Vec<Segment>,
    loss: &'a dyn Loss,
}

/// What the forward sweep with tangents keeps: every segment's output, and per
/// segment and vector the output's tangent (`None` where it is zero).
struct TangentSweep {
    outputs: Vec<Tensor>,
    tangents: Vec<Vec<Option<Tensor>>>,
}

/// One Hessian-vector product of a sweep.
#[derive(Clone, Copy)]
struct Probe<'p> {
    /// The vector.
    v: &'p ParamSet,
    /// For a block product, the block (see the module documentation); `None` for
    /// a whole product.
    block: Option<Block>,
}

/// A block product's tensor: `v` is zero outside it and only its part of `H·v` is
/// wanted.
#[derive(Clone, Copy)]
struct Block {
    /// The tensor's index in θ.
    tensor: usize,
    /// The first segment whose graph reads it (the number of segments when only
    /// the tail does).
    first_segment: usize,
}

impl<'p> Probe<'p> {
    fn whole(v: &'p ParamSet) -> Self {
        Self { v, block: None }
    }

    /// Whether `v` may be non-zero on tensor `index`.
    fn touches(&self, index: usize) -> bool {
        self.block.is_none_or(|b| b.tensor == index)
    }

    /// Whether segment `k` is at or above the first segment reading the probe's
    /// tensor: only there can it give the probe a tangent from a zero input tangent,
    /// and only there does the backward sweep add to the wanted part of the product.
    fn reaches(&self, k: usize) -> bool {
        self.block.is_none_or(|b| k >= b.first_segment)
    }
}

/// Sums gradient shares per parameter, reading only the entries a backward pass
/// produced (most segments touch a few LoRA tensors of the whole set).
struct Accumulator {
    sums: Vec<Option<Tensor>>,
    /// Only this tensor's shares are summed (a block product's), when set.
    only: Option<usize>,
}

impl Accumulator {
    fn new(leaves: &ParamSet) -> Self {
        Self {
            sums: vec![None; leaves.len()],
            only: None,
        }
    }

    /// The accumulator of a probe's product: only its block's tensor for a block.
    fn for_probe(leaves: &ParamSet, probe: &Probe) -> Self {
        Self {
            only: probe.block.map(|b| b.tensor),
            ..Self::new(leaves)
        }
    }

    fn add(&mut self, store: &GradStore, leaves: &ParamSet) -> Result<()> {
        for (index, (sum, (_, leaf))) in self.sums.iter_mut().zip(leaves.iter()).enumerate() {
            if self.only.is_some_and(|only| only != index) {
                continue;
            }
            if let Some(g) = store.get(leaf) {
                let g = g.detach();
                *sum = Some(match sum.take() {
                    Some(s) => (s + g)?,
                    None => g,
                });
            }
        }
        Ok(())
    }

    fn finish(self, leaves: &ParamSet) -> Result<ParamSet> {
        let mut sums = self.sums.into_iter();
        leaves.map(|_, leaf| match sums.next().flatten() {
            Some(s) => Ok(s),
            None => leaf.zeros_like(),
        })
    }

    /// Tensor `index`'s sum (zeros when nothing was added).
    fn take(mut self, index: usize, leaves: &ParamSet) -> Result<Tensor> {
        match self.sums[index].take() {
            Some(s) => Ok(s),
            None => {
                let (_, leaf) = leaves.iter().nth(index).expect("an index of θ");
                Ok(leaf.zeros_like()?)
            }
        }
    }
}

/// A fresh leaf variable holding `t`'s values.
fn leaf(t: &Tensor) -> Result<Tensor> {
    Ok(Var::from_tensor(&t.detach())?.into_inner())
}

/// Adds an optional term to an optional sum.
fn plus(total: Option<Tensor>, term: Option<Tensor>) -> Result<Option<Tensor>> {
    Ok(match (total, term) {
        (Some(a), Some(b)) => Some((a + b)?),
        (a, None) => a,
        (None, b) => b,
    })
}

/// A backward pass whose gradients keep their graph, on this thread.
fn backward_keep(scalar: &Tensor) -> Result<GradStore> {
    ensure_second_order()?;
    Ok(scalar.backward()?)
}

/// `⟨G_θ, v⟩ + ⟨G_h, ḣ⟩` over the entries `store` holds (and the probe's `v` may
/// be non-zero on): the directional derivative, along `(ḣ, v)`, of whatever scalar
/// `store` differentiated. `None` when no term exists (the scalar depends on none
/// of them).
fn directional(
    store: &GradStore,
    leaves: &ParamSet,
    probe: &Probe,
    input: Option<(&Tensor, &Tensor)>,
) -> Result<Option<Tensor>> {
    let mut total = None;
    for (index, ((_, leaf), (_, v_i))) in leaves.iter().zip(probe.v.iter()).enumerate() {
        if !probe.touches(index) {
            continue;
        }
        if let Some(g) = store.get(leaf) {
            total = plus(total, Some(inner(g, v_i)?))?;
        }
    }
    if let Some((h, h_dot)) = input {
        if let Some(g) = store.get(h) {
            total = plus(total, Some(inner(g, h_dot)?))?;
        }
    }
    Ok(total)
}

impl<'a> Checkpointed<'a> {
    /// The engine of `model` with `plan` and the task's own loss ([`TaskLoss`]).
    /// Models that are not chains of layers (the MLP) are refused rather than
    /// silently run unsegmented, and so are plans naming layers the model does not
    /// have.
    pub fn new(model: &'a dyn FewShotModel, plan: &CheckpointPlan) -> Result<Self> {
        let Some(chain) = model.layer_chain() else {
            return Err(not_a_stack());
        };
        let boundaries = plan.boundaries(chain.chain_length())?;
        Ok(Self::from_boundaries(model, chain, &boundaries))
    }

    /// The same engine with any `loss` of the model's outputs.
    pub fn with_loss(self, loss: &'a dyn Loss) -> Self {
        Self { loss, ..self }
    }

    fn from_boundaries(
        model: &'a dyn FewShotModel,
        chain: &'a dyn LayerChain,
        boundaries: &[usize],
    ) -> Self {
        let layers = chain.chain_length();
        let mut segments = vec![Segment {
            layers: 0..boundaries.first().copied().unwrap_or(layers),
        }];
        for (i, &start) in boundaries.iter().enumerate() {
            let end = boundaries.get(i + 1).copied().unwrap_or(layers);
            segments.push(Segment { layers: start..end });
        }
        Self {
            model,
            chain,
            segments,
            loss: &TaskLoss,
        }
    }

    /// Runs segment `k` from `input` (its stored input; ignored for segment 0, which
    /// starts from the embedding) at `params`.
    fn run(
        &self,
        k: usize,
        input: Option<&Tensor>,
        params: &ParamSet,
        batch: &Batch,
        context: &StackContext,
        mode: Mode,
    ) -> Result<Tensor> {
        let mut h = match input {
            Some(h) if k > 0 => h.clone(),
            _ => self.chain.chain_input(params, batch, context, mode)?,
        };
        for l in self.segments[k].layers.clone() {
            h = self.chain.chain_link(l, &h, context, params, mode)?;
        }
        Ok(h)
    }

    /// The forward pass through segments `0..count` at detached θ (no graph is
    /// recorded): their outputs.
    fn forward(
        &self,
        count: usize,
        theta: &ParamSet,
        batch: &Batch,
        context: &StackContext,
        mode: Mode,
    ) -> Result<Vec<Tensor>> {
        let values = theta.detach();
        let mut outputs: Vec<Tensor> = Vec::with_capacity(count);
        for k in 0..count {
            let out = self.run(k, outputs.last(), &values, batch, context, mode)?;
            outputs.push(out);
        }
        Ok(outputs)
    }

    /// Back-propagates the adjoint `a` of the output of segment `count − 1` through
    /// segments `count − 1` down to 0 (first order), adding each segment's θ-gradient
    /// to `total`; `outputs` holds (at least) the outputs of segments `0..count − 1`.
    #[allow(clippy::too_many_arguments)]
    fn backward_sweep(
        &self,
        count: usize,
        outputs: &[Tensor],
        leaves: &ParamSet,
        mut a: Tensor,
        batch: &Batch,
        context: &StackContext,
        mode: Mode,
        total: &mut Accumulator,
    ) -> Result<()> {
        for k in (0..count).rev() {
            let input = if k > 0 {
                Some(leaf(&outputs[k - 1])?)
            } else {
                None
            };
            let out = self.run(k, input.as_ref(), leaves, batch, context, mode)?;
            if !out.track_op() {
                // The embedding segment without trainable tensors: nothing to add.
                continue;
            }
            let store = first_order_backward(&inner(&out, &a)?)?;
            drop(out);
            total.add(&store, leaves)?;
            if let Some(h) = &input {
                a = match store.get(h) {
                    Some(g) => g.detach(),
                    None => h.zeros_like()?,
                };
            }
        }
        Ok(())
    }

    /// The gradient of `loss` on `batch` at `theta`, with the loss and logits, one
    /// segment graph alive at a time.
    ///
    /// The last segment is run once, with its graph, and the tail is attached to it:
    /// its graph would be rebuilt first thing in the backward pass anyway, so this
    /// saves one segment's forward at the same peak.
    fn gradient_sweep(&self, theta: &ParamSet, batch: &Batch, mode: Mode) -> Result<Gradient> {
        let leaves = theta.to_leaves()?;
        // From the leaves: under full fine-tuning T5's position bias is trained, and
        // each segment's backward pass reaches it through the context.
        let context = self.chain.chain_context(batch, &leaves)?;
        let last = self.segments.len() - 1;
        let outputs = self.forward(last, theta, batch, &context, mode)?;
        let mut total = Accumulator::new(&leaves);
        let input = match outputs.last() {
            Some(h) => Some(leaf(h)?),
            None => None,
        };
        let (loss, logits, a) = {
            let h = self.run(last, input.as_ref(), &leaves, batch, &context, mode)?;
            let logits = self.chain.chain_logits(&h, &context, &leaves, batch)?;
            let loss = self.loss.value(&logits, batch)?;
            let store = first_order_backward(&loss)?;
            total.add(&store, &leaves)?;
            let a = match &input {
                Some(input) => Some(match store.get(input) {
                    Some(g) => g.detach(),
                    None => input.zeros_like()?,
                }),
                None => None,
            };
            (loss.detach(), logits.detach(), a)
        };
        if let Some(a) = a {
            self.backward_sweep(
                last, &outputs, &leaves, a, batch, &context, mode, &mut total,
            )?;
        }
        Ok(Gradient {
            grads: total.finish(&leaves)?,
            loss,
            logits,
        })
    }

    /// The forward sweep with tangents: every segment's output and, per probe, its
    /// tangent `ḣ = J·(ḣ_in, v)` (`None` where it is zero). With `known` outputs
    /// (block products), segments where no probe can have a tangent are not run.
    fn tangent_sweep(
        &self,
        leaves: &ParamSet,
        probes: &[Probe],
        known: Option<&[Tensor]>,
        batch: &Batch,
        context: &StackContext,
        mode: Mode,
    ) -> Result<TangentSweep> {
        let mut outputs: Vec<Tensor> = Vec::with_capacity(self.segments.len());
        let mut tangents: Vec<Vec<Option<Tensor>>> = Vec::with_capacity(self.segments.len());
        for k in 0..self.segments.len() {
            let active: Vec<bool> = probes
                .iter()
                .enumerate()
                .map(|(i, p)| p.reaches(k) || tangents.last().is_some_and(|t| t[i].is_some()))
                .collect();
            let mut dots = vec![None; probes.len()];
            if let Some(known) = known.filter(|_| !active.contains(&true)) {
                outputs.push(known[k].clone());
                tangents.push(dots);
                continue;
            }
            let input = match outputs.last() {
                Some(h) if k > 0 => Some(leaf(h)?),
                _ => None,
            };
            let out = self.run(k, input.as_ref(), leaves, batch, context, mode)?;
            if out.track_op() {
                let u = Var::zeros(out.shape(), out.dtype(), out.device())?.into_inner();
                let store = backward_keep(&inner(&out, &u)?)?;
                for (i, probe) in probes.iter().enumerate() {
                    if !active[i] {
                        continue;
                    }
                    let h_dot = match (&input, tangents.last()) {
                        (Some(h), Some(previous)) => previous[i].as_ref().map(|d| (h, d)),
                        _ => None,
                    };
                    if let Some(s) = directional(&store, leaves, probe, h_dot)? {
                        dots[i] = first_order_backward(&s)?.get(&u).map(Tensor::detach);
                    }
                }
            }
            outputs.push(match known {
                Some(known) => known[k].clone(),
                None => out.detach(),
            });
            tangents.push(dots);
        }
        Ok(TangentSweep { outputs, tangents })
    }

    /// The gradient and `H·v` for every `v` of `vs` (H the Hessian of `loss` on
    /// `batch` at `theta`), by the R-operator sweeps described in the module
    /// documentation; vectors are taken [`TANGENT_GROUP`] at a time.
    fn hvp_sweeps(
        &self,
        theta: &ParamSet,
        batch: &Batch,
        vs: &[ParamSet],
        mode: Mode,
    ) -> Result<(ParamSet, Vec<ParamSet>)> {
        if vs.is_empty() {
            return Ok((self.gradient_sweep(theta, batch, mode)?.grads, Vec::new()));
        }
        for v in vs {
            theta.check_compatible(v)?;
        }
        let leaves = theta.to_leaves()?;
        let context = self.chain.chain_context(batch, &leaves)?;
        let mut gradient = Accumulator::new(&leaves);
        let mut products = Vec::with_capacity(vs.len());
        for (index, group) in vs.chunks(TANGENT_GROUP).enumerate() {
            let probes: Vec<Probe> = group.iter().map(Probe::whole).collect();
            // The gradient is the same in every sweep: the first one sums it.
            let sums = self.hvp_group(
                &leaves,
                &probes,
                None,
                batch,
                &context,
                mode,
                (index == 0).then_some(&mut gradient),
            )?;
            for sum in sums {
                products.push(sum.finish(&leaves)?);
            }
        }
        Ok((gradient.finish(&leaves)?, products))
    }

    /// Block products (see the module documentation): for each `(i, v)` of `blocks`,
    /// tensor `i`'s part of `H·v` for a `v` that is zero outside tensor `i`
    /// (`H_ii·v_i`), in order.
    fn block_sweeps(
        &self,
        theta: &ParamSet,
        batch: &Batch,
        blocks: &[(usize, &ParamSet)],
        mode: Mode,
    ) -> Result<Vec<Tensor>> {
        super::check_blocks(theta, blocks)?;
        let leaves = theta.to_leaves()?;
        let context = self.chain.chain_context(batch, &leaves)?;
        let count = self.segments.len();
        // One forward, a segment graph at a time: the outputs every sweep starts
        // from, and the first segment whose graph reads each tensor.
        let mut first_segment = vec![count; leaves.len()];
        let mut outputs: Vec<Tensor> = Vec::with_capacity(count);
        for k in 0..count {
            let out = self.run(k, outputs.last(), &leaves, batch, &context, mode)?;
            let read: HashSet<_> = out.sorted_nodes().iter().map(|n| n.id()).collect();
            for (first, (_, leaf)) in first_segment.iter_mut().zip(leaves.iter()) {
                if *first == count && read.contains(&leaf.id()) {
                    *first = k;
                }
            }
            outputs.push(out.detach());
        }
        let mut order: Vec<usize> = (0..blocks.len()).collect();
        order.sort_by_key(|&b| first_segment[blocks[b].0]);
        let mut products: Vec<Option<Tensor>> = vec![None; blocks.len()];
        for group in order.chunks(TANGENT_GROUP) {
            let probes: Vec<Probe> = group
                .iter()
                .map(|&b| {
                    let (tensor, v) = blocks[b];
                    Probe {
                        v,
                        block: Some(Block {
                            tensor,
                            first_segment: first_segment[tensor],
                        }),
                    }
                })
                .collect();
            let sums = self.hvp_group(
                &leaves,
                &probes,
                Some(&outputs),
                batch,
                &context,
                mode,
                None,
            )?;
            for (&b, sum) in group.iter().zip(sums) {
                products[b] = Some(sum.take(blocks[b].0, &leaves)?);
            }
        }
        Ok(products
            .into_iter()
            .map(|p| p.expect("every block is in a group"))
            .collect())
    }

    /// One sweep pair for `probes`: their products' sums, and the gradient's added
    /// to `gradient` when given. Without a gradient to sum, the backward sweep stops
    /// below the last segment any probe wants.
    #[allow(clippy::too_many_arguments)]
    fn hvp_group(
        &self,
        leaves: &ParamSet,
        probes: &[Probe],
        known: Option<&[Tensor]>,
        batch: &Batch,
        context: &StackContext,
        mode: Mode,
        mut gradient: Option<&mut Accumulator>,
    ) -> Result<Vec<Accumulator>> {
        let TangentSweep { outputs, tangents } =
            self.tangent_sweep(leaves, probes, known, batch, context, mode)?;
        let mut products: Vec<Accumulator> = probes
            .iter()
            .map(|p| Accumulator::for_probe(leaves, p))
            .collect();

        // The tail: a = ∂L/∂h_L and ȧ = R{a}, with the head's shares.
        let last = leaf(outputs.last().expect("at least one segment"))?;
        let (mut a, mut a_dot) = {
            let logits = self.chain.chain_logits(&last, context, leaves, batch)?;
            let store = backward_keep(&self.loss.value(&logits, batch)?)?;
            if let Some(gradient) = gradient.as_deref_mut() {
                gradient.add(&store, leaves)?;
            }
            let a = match store.get(&last) {
                Some(g) => g.detach(),
                None => last.zeros_like()?,
            };
            let last_tangents = tangents.last().expect("at least one segment");
            let mut a_dot = Vec::with_capacity(probes.len());
            for (i, probe) in probes.iter().enumerate() {
                let h_dot = last_tangents[i].as_ref().map(|d| (&last, d));
                a_dot.push(match directional(&store, leaves, probe, h_dot)? {
                    Some(s) => {
                        let second = first_order_backward(&s)?;
                        products[i].add(&second, leaves)?;
                        second.get(&last).map(Tensor::detach)
                    }
                    None => None,
                });
            }
            (a, a_dot)
        };

        // The backward sweep: (a_in, g) from ∇⟨F, a⟩, (ȧ_in, Hv) from ∇s̃.
        for k in (0..self.segments.len()).rev() {
            let wanted: Vec<bool> = probes.iter().map(|p| p.reaches(k)).collect();
            if gradient.is_none() && !wanted.contains(&true) {
                break;
            }
            let input = if k > 0 {
                Some(leaf(&outputs[k - 1])?)
            } else {
                None
            };
            let out = self.run(k, input.as_ref(), leaves, batch, context, mode)?;
            if !out.track_op() {
                continue;
            }
            let store = backward_keep(&inner(&out, &a)?)?;
            if let Some(gradient) = gradient.as_deref_mut() {
                gradient.add(&store, leaves)?;
            }
            let mut next_dot = Vec::with_capacity(probes.len());
            for (i, probe) in probes.iter().enumerate() {
                if !wanted[i] {
                    next_dot.push(None);
                    continue;
                }
                let h_dot = match (&input, k.checked_sub(1)) {
                    (Some(h), Some(previous)) => tangents[previous][i].as_ref().map(|d| (h, d)),
                    _ => None,
                };
                let first = match &a_dot[i] {
                    Some(ad) => Some(inner(&out, ad)?),
                    None => None,
                };
                let s = plus(first, directional(&store, leaves, probe, h_dot)?)?;
                next_dot.push(match s {
                    Some(s) => {
                        let second = first_order_backward(&s)?;
                        products[i].add(&second, leaves)?;
                        input
                            .as_ref()
                            .and_then(|h| second.get(h))
                            .map(Tensor::detach)
                    }
                    None => None,
                });
            }
            if let Some(h) = &input {
                a = match store.get(h) {
                    Some(g) => g.detach(),
                    None => h.zeros_like()?,
                };
            }
            a_dot = next_dot;
        }
        Ok(products)
    }

    /// The generalised Gauss-Newton product `Jᵀ·H_z·J·v` (as
    /// [`GradEngine::gauss_newton_product`]), segment by segment.
    fn gauss_newton_sweep(
        &self,
        theta: &ParamSet,
        batch: &Batch,
        v: &ParamSet,
        mode: Mode,
    ) -> Result<ParamSet> {
        theta.check_compatible(v)?;
        let leaves = theta.to_leaves()?;
        let context = self.chain.chain_context(batch, &leaves)?;
        let probe = Probe::whole(v);
        let TangentSweep { outputs, tangents } = self.tangent_sweep(
            &leaves,
            std::slice::from_ref(&probe),
            None,
            batch,
            &context,
            mode,
        )?;
        let mut total = Accumulator::new(&leaves);
        let last = leaf(outputs.last().expect("at least one segment"))?;
        let a = {
            let logits = self.chain.chain_logits(&last, &context, &leaves, batch)?;
            // ż = J·(ḣ_L, v) by the double-backward trick at the tail.
            let u = Var::zeros(logits.shape(), logits.dtype(), logits.device())?.into_inner();
            let store = backward_keep(&inner(&logits, &u)?)?;
            let h_dot = tangents.last().expect("at least one segment")[0]
                .as_ref()
                .map(|d| (&last, d));
            let z_dot = match directional(&store, &leaves, &probe, h_dot)? {
                Some(s) => first_order_backward(&s)?.get(&u).map(Tensor::detach),
                None => None,
            };
            drop(store);
            let z_dot = match z_dot {
                Some(z) => z,
                None => logits.zeros_like()?.detach(),
            };
            let r = self.loss.output_hessian_product(&logits, batch, &z_dot)?;
            let store = first_order_backward(&inner(&logits, &r)?)?;
            total.add(&store, &leaves)?;
            match store.get(&last) {
                Some(g) => g.detach(),
                None => last.zeros_like()?,
            }
        };
        let count = self.segments.len();
        self.backward_sweep(
            count, &outputs, &leaves, a, batch, &context, mode, &mut total,
        )?;
        total.finish(&leaves)
    }
}

impl GradEngine for Checkpointed<'_> {
    fn model(&self) -> &dyn FewShotModel {
        self.model
    }

    fn loss(&self) -> &dyn Loss {
        self.loss
    }

    /// The last segment is run once, with its graph, and the tail is attached to it:
    /// its graph would be rebuilt first thing in the backward pass anyway, so this
    /// saves one segment's forward at the same peak.
    fn gradient(&self, theta: &ParamSet, batch: &Batch, mode: Mode) -> Result<Gradient> {
        self.gradient_sweep(theta, batch, mode)
    }

    /// Vectors are taken `TANGENT_GROUP` (8) at a time.
    fn gradient_and_hvps(
        &self,
        theta: &ParamSet,
        batch: &Batch,
        vs: &[ParamSet],
        mode: Mode,
    ) -> Result<(ParamSet, Vec<ParamSet>)> {
        self.hvp_sweeps(theta, batch, vs, mode)
    }

    fn block_products(
        &self,
        theta: &ParamSet,
        batch: &Batch,
        blocks: &[(usize, &ParamSet)],
        mode: Mode,
    ) -> Result<Vec<Tensor>> {
        self.block_sweeps(theta, batch, blocks, mode)
    }

    fn gauss_newton_product(
        &self,
        theta: &ParamSet,
        batch: &Batch,
        v: &ParamSet,
        mode: Mode,
    ) -> Result<ParamSet> {
        self.gauss_newton_sweep(theta, batch, v, mode)
    }

    /// The forward keeps the segment outputs; the last segment runs with its graph
    /// and the features on top (kept until the pullback, which would rebuild it
    /// first), and the pullback sweeps the adjoint back one segment at a time.
    fn feature_pullback<'s>(
        &'s self,
        theta: &ParamSet,
        batch: &Batch,
        mode: Mode,
    ) -> Result<(Tensor, FeaturePullback<'s>)> {
        let leaves = theta.to_leaves()?;
        let context = self.chain.chain_context(batch, &leaves)?;
        let last = self.segments.len() - 1;
        let outputs = self.forward(last, theta, batch, &context, mode)?;
        let input = match outputs.last() {
            Some(h) => Some(leaf(h)?),
            None => None,
        };
        let h = self.run(last, input.as_ref(), &leaves, batch, &context, mode)?;
        let features = self.chain.chain_features(&h, &context, &leaves, batch)?;
        drop(h);
        let value = features.detach();
        let batch = batch.clone();
        let pullback = move |a: &Tensor| -> Result<ParamSet> {
            let mut total = Accumulator::new(&leaves);
            let store = first_order_backward(&inner(&features, a)?)?;
            drop(features);
            total.add(&store, &leaves)?;
            if let Some(input) = &input {
                let a = match store.get(input) {
                    Some(g) => g.detach(),
                    None => input.zeros_like()?,
                };
                drop(store);
                self.backward_sweep(
                    last, &outputs, &leaves, a, &batch, &context, mode, &mut total,
                )?;
            }
            total.finish(&leaves)
        };
        Ok((value, Box::new(pullback)))
    }
}

#[cfg(test)]
#[path = "checkpoint_tests.rs"]
mod tests;
