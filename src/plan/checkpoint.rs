//! Gradient checkpointing (`crate::engine::Checkpointed`), replayed on simulated
//! tensors: the forward sweep keeps only the segments' outputs, and every backward
//! sweep rebuilds one segment's graph at a time from a leaf copy of its stored input
//! — for first-order gradients, for Hessian-vector products by the R-operator (a
//! tangent per boundary and vector on top of the outputs) and for Gauss-Newton
//! products.
//!
//! Each function follows the engine's statement by statement, including where each
//! tensor is dropped: the stack context for the whole call, the stored outputs (and
//! tangents) until the backward sweep is done, one segment's graph and one gradient
//! store at a time. When the engine changes, this file must follow; the planner test
//! compares both.

use super::autograd::{backward, reads, GradStore};
use super::models::{task_loss, SimBatch, SimContext, SimModel};
use super::sim::{Category, DType, SimDType, T};

/// Vectors per tangent sweep (the engine's `TANGENT_GROUP`).
const TANGENT_GROUP: usize = 8;

/// Runs `f` with new buffers counted in `category`.
fn within<R>(model: &SimModel, category: Category, f: impl FnOnce() -> R) -> R {
    let sim = model.sim();
    let previous = sim.set_category(category);
    let out = f();
    sim.set_category(previous);
    out
}

/// A fresh leaf variable holding `t`'s values (the engine's `leaf`).
fn leaf(t: &T) -> T {
    t.detach().to_leaf()
}

/// `Σ ⟨a, b⟩`, a 0-d tensor.
fn inner(a: &T, b: &T) -> T {
    let sum = a.mul(b).sum_all();
    // Half-precision sums are made f32 scalars (the engine's `inner`).
    if sum.dtype().is_half() {
        sum.to_dtype(DType::F32)
    } else {
        sum
    }
}

/// Adds an optional term to an optional sum.
fn plus(total: Option<T>, term: Option<T>) -> Option<T> {
    match (total, term) {
        (Some(a), Some(b)) => Some(a.add(&b)),
        (a, None) => a,
        (None, b) => b,
    }
}

/// One Hessian-vector product of a sweep (the engine's `Probe`): the vector and,
/// for a block product, its tensor and the first segment reading it.
#[derive(Clone, Copy)]
struct Probe<'p> {
    v: &'p [T],
    block: Option<(usize, usize)>,
}

impl<'p> Probe<'p> {
    fn whole(v: &'p [T]) -> Self {
        Probe { v, block: None }
    }

    fn touches(&self, index: usize) -> bool {
        self.block.is_none_or(|(tensor, _)| tensor == index)
    }

    /// The engine's `Probe::reaches`.
    fn reaches(&self, k: usize) -> bool {
        self.block.is_none_or(|(_, first)| k >= first)
    }
}

/// `⟨G_θ, v⟩ + ⟨G_h, ḣ⟩` over the entries `store` holds (and the probe touches).
fn directional(
    store: &GradStore,
    leaves: &[T],
    probe: &Probe,
    input: Option<(&T, &T)>,
) -> Option<T> {
    let mut total = None;
    for (index, (leaf, v_i)) in leaves.iter().zip(probe.v).enumerate() {
        if !probe.touches(index) {
            continue;
        }
        if let Some(g) = store.get(&leaf.id()) {
            total = plus(total, Some(inner(g, v_i)));
        }
    }
    if let Some((h, h_dot)) = input {
        if let Some(g) = store.get(&h.id()) {
            total = plus(total, Some(inner(g, h_dot)));
        }
    }
    total
}

/// The gradient of `store`'s scalar at `h` (detached), or zeros shaped like `h`.
fn adjoint(store: &GradStore, h: &T) -> T {
    match store.get(&h.id()) {
        Some(g) => g.detach(),
        None => h.zeros_like(),
    }
}

/// Gradient shares summed per parameter (the engine's `Accumulator`).
struct Accumulator {
    sums: Vec<Option<T>>,
    only: Option<usize>,
}

impl Accumulator {
    fn new(leaves: &[T]) -> Self {
        Accumulator {
            sums: vec![None; leaves.len()],
            only: None,
        }
    }

    fn for_probe(leaves: &[T], probe: &Probe) -> Self {
        Accumulator {
            only: probe.block.map(|(tensor, _)| tensor),
            ..Self::new(leaves)
        }
    }

    fn add(&mut self, store: &GradStore, leaves: &[T]) {
        for (index, (sum, leaf)) in self.sums.iter_mut().zip(leaves).enumerate() {
            if self.only.is_some_and(|only| only != index) {
                continue;
            }
            if let Some(g) = store.get(&leaf.id()) {
                let g = g.detach();
                *sum = Some(match sum.take() {
                    Some(s) => s.add(&g),
                    None => g,
                });
            }
        }
    }

    fn finish(self, leaves: &[T]) -> Vec<T> {
        self.sums
            .into_iter()
            .zip(leaves)
            .map(|(sum, leaf)| sum.unwrap_or_else(|| leaf.zeros_like()))
            .collect()
    }

    fn take(mut self, index: usize, leaves: &[T]) -> T {
        self.sums[index]
            .take()
            .unwrap_or_else(|| leaves[index].zeros_like())
    }
}

/// The stored outputs of a tangent sweep and, per segment and vector, the output's
/// tangent.
struct TangentSweep {
    outputs: Vec<T>,
    tangents: Vec<Vec<Option<T>>>,
}

/// The engine for one model and checkpoint plan (`engine::Checkpointed`).
pub(crate) struct SimCheckpointer<'a> {
    model: &'a SimModel,
    train: bool,
    /// Layers of each segment; segment 0 starts from the embedding.
    segments: Vec<std::ops::Range<usize>>,
}

impl<'a> SimCheckpointer<'a> {
    /// The segments of `boundaries` (the layers whose input is kept) in `model`.
    pub(crate) fn new(model: &'a SimModel, boundaries: &[usize], train: bool) -> Self {
        let layers = model.num_layers();
        let first = 0..boundaries.first().copied().unwrap_or(layers);
        let mut segments = Vec::with_capacity(boundaries.len() + 1);
        segments.push(first);
        for (i, &start) in boundaries.iter().enumerate() {
            segments.push(start..boundaries.get(i + 1).copied().unwrap_or(layers));
        }
        SimCheckpointer {
            model,
            train,
            segments,
        }
    }

    /// Segment `k` from its stored `input` (segment 0 from the embedding).
    fn run(
        &self,
        k: usize,
        input: Option<&T>,
        params: &[T],
        batch: &SimBatch,
        ctx: &SimContext,
    ) -> T {
        within(self.model, Category::Activations, || {
            let mut h = match input {
                Some(h) if k > 0 => h.clone(),
                _ => self.model.embed(params, batch, self.train),
            };
            for l in self.segments[k].clone() {
                h = self.model.layer(l, &h, ctx, params, self.train);
            }
            h
        })
    }

    /// A first-order backward pass (on the detaching worker).
    fn first_order(&self, scalar: &T) -> GradStore {
        within(self.model, Category::Gradients, || {
            backward(&self.model.sim(), scalar, true)
        })
    }

    /// A backward pass whose gradients keep their graph.
    fn keep(&self, scalar: &T) -> GradStore {
        within(self.model, Category::Gradients, || {
            backward(&self.model.sim(), scalar, false)
        })
    }

    /// `ParamSet::to_leaves`.
    fn leaves(&self, theta: &[T]) -> Vec<T> {
        within(self.model, Category::Trainable, || {
            theta.iter().map(leaf).collect()
        })
    }

    /// The stack context of a batch.
    fn context(&self, batch: &SimBatch, leaves: &[T]) -> SimContext {
        within(self.model, Category::Activations, || {
            self.model.stack_context(batch, leaves)
        })
    }

    /// Segments `0..count` at detached θ: their outputs (no graph).
    fn forward(&self, count: usize, theta: &[T], batch: &SimBatch, ctx: &SimContext) -> Vec<T> {
        let values: Vec<T> = theta.iter().map(T::detach).collect();
        let mut outputs: Vec<T> = Vec::with_capacity(count);
        for k in 0..count {
            let out = self.run(k, outputs.last(), &values, batch, ctx);
            outputs.push(out);
        }
        outputs
    }

    /// Back-propagates the adjoint `a` of segment `count − 1`'s output down to
    /// segment 0, one segment graph at a time.
    #[allow(clippy::too_many_arguments)]
    fn backward_sweep(
        &self,
        count: usize,
        outputs: &[T],
        leaves: &[T],
        mut a: T,
        batch: &SimBatch,
        ctx: &SimContext,
        total: &mut Accumulator,
    ) {
        for k in (0..count).rev() {
            let input = (k > 0)
                .then(|| within(self.model, Category::Activations, || leaf(&outputs[k - 1])));
            let out = self.run(k, input.as_ref(), leaves, batch, ctx);
            if !out.tracks() {
                continue;
            }
            let store = self.first_order(&inner(&out, &a));
            drop(out);
            total.add(&store, leaves);
            if let Some(h) = &input {
                a = adjoint(&store, h);
            }
        }
    }

    /// `Checkpointer::gradient`: the gradient of the task's loss at `theta`, one
    /// segment graph alive at a time (the last segment run once, with the tail).
    pub(crate) fn gradient(&self, theta: &[T], batch: &SimBatch) -> Vec<T> {
        let leaves = self.leaves(theta);
        let ctx = self.context(batch, &leaves);
        let last = self.segments.len() - 1;
        let outputs = self.forward(last, theta, batch, &ctx);
        let mut total = Accumulator::new(&leaves);
        let input = outputs
            .last()
            .map(|h| within(self.model, Category::Activations, || leaf(h)));
        let (_loss, _logits, a) = {
            let h = self.run(last, input.as_ref(), &leaves, batch, &ctx);
            let (logits, loss) = within(self.model, Category::Activations, || {
                let logits = self.model.tail_logits(&h, &leaves, batch);
                let loss = task_loss(&logits, batch);
                (logits, loss)
            });
            let store = self.first_order(&loss);
            total.add(&store, &leaves);
            let a = input.as_ref().map(|h| adjoint(&store, h));
            (loss.detach(), logits.detach(), a)
        };
        if let Some(a) = a {
            self.backward_sweep(last, &outputs, &leaves, a, batch, &ctx, &mut total);
        }
        total.finish(&leaves)
    }

    /// The forward sweep with tangents `ḣ = J·(ḣ_in, v)` per probe; with `known`
    /// outputs, segments where no probe can have a tangent are not run.
    fn tangent_sweep(
        &self,
        leaves: &[T],
        probes: &[Probe],
        known: Option<&[T]>,
        batch: &SimBatch,
        ctx: &SimContext,
    ) -> TangentSweep {
        let mut outputs: Vec<T> = Vec::with_capacity(self.segments.len());
        let mut tangents: Vec<Vec<Option<T>>> = Vec::with_capacity(self.segments.len());
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
                Some(h) if k > 0 => Some(within(self.model, Category::Activations, || leaf(h))),
                _ => None,
            };
            let out = self.run(k, input.as_ref(), leaves, batch, ctx);
            if out.tracks() {
                let u = within(self.model, Category::Gradients, || {
                    self.model.sim().variable(&out.dims(), out.dtype())
                });
                let store = self.keep(&inner(&out, &u));
                for (i, probe) in probes.iter().enumerate() {
                    if !active[i] {
                        continue;
                    }
                    let h_dot = match (&input, tangents.last()) {
                        (Some(h), Some(previous)) => previous[i].as_ref().map(|d| (h, d)),
                        _ => None,
                    };
                    let s = within(self.model, Category::Gradients, || {
                        directional(&store, leaves, probe, h_dot)
                    });
                    if let Some(s) = s {
                        dots[i] = self.first_order(&s).get(&u.id()).map(T::detach);
                    }
                }
            }
            outputs.push(match known {
                Some(known) => known[k].clone(),
                None => out.detach(),
            });
            tangents.push(dots);
        }
        TangentSweep { outputs, tangents }
    }

    /// `Checkpointer::gradient_and_hvps`: the gradient and `H·v` for every `v`, by
    /// sweeps of at most [`TANGENT_GROUP`] vectors (the first one summing the
    /// gradient).
    pub(crate) fn gradient_and_hvps(
        &self,
        theta: &[T],
        batch: &SimBatch,
        vs: &[Vec<T>],
    ) -> (Vec<T>, Vec<Vec<T>>) {
        if vs.is_empty() {
            return (self.gradient(theta, batch), Vec::new());
        }
        let leaves = self.leaves(theta);
        let ctx = self.context(batch, &leaves);
        let mut gradient = Accumulator::new(&leaves);
        let mut products = Vec::with_capacity(vs.len());
        for (index, group) in vs.chunks(TANGENT_GROUP).enumerate() {
            let probes: Vec<Probe> = group.iter().map(|v| Probe::whole(v)).collect();
            let first = (index == 0).then_some(&mut gradient);
            let sums = self.hvp_group(&leaves, &probes, None, batch, &ctx, first);
            products.extend(sums.into_iter().map(|sum| sum.finish(&leaves)));
        }
        (gradient.finish(&leaves), products)
    }

    /// `Checkpointer::block_products`: tensor `i`'s block of `H·v` for each `(i, v)`
    /// of `blocks`.
    pub(crate) fn block_products(
        &self,
        theta: &[T],
        batch: &SimBatch,
        blocks: &[(usize, &[T])],
    ) -> Vec<T> {
        let leaves = self.leaves(theta);
        let ctx = self.context(batch, &leaves);
        let count = self.segments.len();
        let mut first_segment = vec![count; leaves.len()];
        let mut outputs: Vec<T> = Vec::with_capacity(count);
        for k in 0..count {
            let out = self.run(k, outputs.last(), &leaves, batch, &ctx);
            for (first, read) in first_segment.iter_mut().zip(reads(&out, &leaves)) {
                if *first == count && read {
                    *first = k;
                }
            }
            outputs.push(out.detach());
        }
        let mut order: Vec<usize> = (0..blocks.len()).collect();
        order.sort_by_key(|&b| first_segment[blocks[b].0]);
        let mut products: Vec<Option<T>> = vec![None; blocks.len()];
        for group in order.chunks(TANGENT_GROUP) {
            let probes: Vec<Probe> = group
                .iter()
                .map(|&b| {
                    let (tensor, v) = blocks[b];
                    Probe {
                        v,
                        block: Some((tensor, first_segment[tensor])),
                    }
                })
                .collect();
            let sums = self.hvp_group(&leaves, &probes, Some(&outputs), batch, &ctx, None);
            for (&b, sum) in group.iter().zip(sums) {
                products[b] = Some(sum.take(blocks[b].0, &leaves));
            }
        }
        products
            .into_iter()
            .map(|p| p.expect("every block is in a group"))
            .collect()
    }

    fn hvp_group(
        &self,
        leaves: &[T],
        probes: &[Probe],
        known: Option<&[T]>,
        batch: &SimBatch,
        ctx: &SimContext,
        mut gradient: Option<&mut Accumulator>,
    ) -> Vec<Accumulator> {
        let TangentSweep { outputs, tangents } =
            self.tangent_sweep(leaves, probes, known, batch, ctx);
        let mut products: Vec<Accumulator> = probes
            .iter()
            .map(|p| Accumulator::for_probe(leaves, p))
            .collect();

        let last = within(self.model, Category::Activations, || {
            leaf(outputs.last().expect("at least one segment"))
        });
        let (mut a, mut a_dot) = {
            let logits = within(self.model, Category::Activations, || {
                self.model.tail_logits(&last, leaves, batch)
            });
            let store = self.keep(&within(self.model, Category::Activations, || {
                task_loss(&logits, batch)
            }));
            if let Some(gradient) = gradient.as_deref_mut() {
                gradient.add(&store, leaves);
            }
            let a = adjoint(&store, &last);
            let last_tangents = tangents.last().expect("at least one segment");
            let mut a_dot = Vec::with_capacity(probes.len());
            for (i, probe) in probes.iter().enumerate() {
                let h_dot = last_tangents[i].as_ref().map(|d| (&last, d));
                let s = within(self.model, Category::Gradients, || {
                    directional(&store, leaves, probe, h_dot)
                });
                a_dot.push(s.and_then(|s| {
                    let second = self.first_order(&s);
                    products[i].add(&second, leaves);
                    second.get(&last.id()).map(T::detach)
                }));
            }
            (a, a_dot)
        };

        for k in (0..self.segments.len()).rev() {
            let wanted: Vec<bool> = probes.iter().map(|p| p.reaches(k)).collect();
            if gradient.is_none() && !wanted.contains(&true) {
                break;
            }
            let input = (k > 0)
                .then(|| within(self.model, Category::Activations, || leaf(&outputs[k - 1])));
            let out = self.run(k, input.as_ref(), leaves, batch, ctx);
            if !out.tracks() {
                continue;
            }
            let store = self.keep(&inner(&out, &a));
            if let Some(gradient) = gradient.as_deref_mut() {
                gradient.add(&store, leaves);
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
                let s = within(self.model, Category::Gradients, || {
                    let first = a_dot[i].as_ref().map(|ad| inner(&out, ad));
                    plus(first, directional(&store, leaves, probe, h_dot))
                });
                next_dot.push(s.and_then(|s| {
                    let second = self.first_order(&s);
                    products[i].add(&second, leaves);
                    input
                        .as_ref()
                        .and_then(|h| second.get(&h.id()))
                        .map(T::detach)
                }));
            }
            if let Some(h) = &input {
                a = adjoint(&store, h);
            }
            a_dot = next_dot;
        }
        products
    }

    /// `Checkpointer::gauss_newton_product`: `Jᵀ·H_z·J·v` of the task loss.
    pub(crate) fn gauss_newton_product(&self, theta: &[T], batch: &SimBatch, v: &[T]) -> Vec<T> {
        let leaves = self.leaves(theta);
        let ctx = self.context(batch, &leaves);
        let probe = Probe::whole(v);
        let TangentSweep { outputs, tangents } =
            self.tangent_sweep(&leaves, std::slice::from_ref(&probe), None, batch, &ctx);
        let mut total = Accumulator::new(&leaves);
        let last = within(self.model, Category::Activations, || {
            leaf(outputs.last().expect("at least one segment"))
        });
        let a = {
            let logits = within(self.model, Category::Activations, || {
                self.model.tail_logits(&last, &leaves, batch)
            });
            let u = within(self.model, Category::Gradients, || {
                self.model.sim().variable(&logits.dims(), logits.dtype())
            });
            let store = self.keep(&within(self.model, Category::Activations, || {
                inner(&logits, &u)
            }));
            let h_dot = tangents.last().expect("at least one segment")[0]
                .as_ref()
                .map(|d| (&last, d));
            let s = within(self.model, Category::Gradients, || {
                directional(&store, &leaves, &probe, h_dot)
            });
            let z_dot = s.and_then(|s| self.first_order(&s).get(&u.id()).map(T::detach));
            drop(store);
            let r = within(self.model, Category::Gradients, || {
                let z_dot = z_dot.unwrap_or_else(|| logits.zeros_like().detach());
                super::models::output_hessian_product(&logits, batch, &z_dot)
            });
            let store = self.first_order(&within(self.model, Category::Activations, || {
                inner(&logits, &r)
            }));
            total.add(&store, &leaves);
            adjoint(&store, &last)
        };
        let count = self.segments.len();
        self.backward_sweep(count, &outputs, &leaves, a, batch, &ctx, &mut total);
        total.finish(&leaves)
    }
}
