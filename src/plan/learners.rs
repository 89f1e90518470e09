//! The learners' meta-gradients and the meta-step, replayed on simulated tensors.
//!
//! Mirrors `crate::meta` (inner loop, MAML in both modes, FOMAML, Reptile, MELoRA
//! with each Hessian approximation), `crate::run::meta_step` and the outer update,
//! including what each keeps alive: full-graph MAML holds every inner step's forward
//! and gradient graphs until the meta-backward has crossed them; recompute-MAML and
//! MELoRA rebuild one step's graphs at a time; FOMAML and Reptile never keep a
//! gradient's graph.
//!
//! Learning rates, scales and other numbers appear only where an op takes one; they
//! do not change a single size.

use super::autograd::gradients;
use super::checkpoint::SimCheckpointer;
use super::models::{task_loss, SimBatch, SimModel};
use super::sim::{Category, DType, Sim, T};

/// Parameters, gradients and directions: one tensor per trainable tensor.
pub(crate) type Params = Vec<T>;

/// The Hessian stand-in of MELoRA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Approximation {
    /// No curvature term.
    None,
    /// Hutchinson's diagonal with this many probes.
    Diagonal { probes: usize },
    /// Generalised Gauss-Newton products.
    GaussNewton,
    /// Per-tensor Hessian blocks.
    BlockDiagonal,
}

/// A learner as the planner sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Learner {
    /// MAML keeping every inner step's graph.
    MamlFullGraph,
    /// MAML rebuilding one step's graph per Hessian-vector product.
    MamlRecompute,
    /// First-order MAML.
    Fomaml,
    /// Reptile.
    Reptile,
    /// MetaSGD (MAML with learned per-entry step sizes).
    MetaSgd { full_graph: bool },
    /// MELoRA (`damping > 0` adds a product even without curvature).
    Melora {
        approximation: Approximation,
        damped: bool,
    },
}

/// The inner loop's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct InnerSpec {
    /// Steps K.
    pub(crate) steps: usize,
    /// Micro-batch size, if any.
    pub(crate) micro: Option<usize>,
}

/// Runs `f` with new buffers counted in `category`.
fn within<R>(sim: &Sim, category: Category, f: impl FnOnce() -> R) -> R {
    let previous = sim.set_category(category);
    let out = f();
    sim.set_category(previous);
    out
}

fn detach(p: &[T]) -> Params {
    p.iter().map(T::detach).collect()
}

/// `ParamSet::to_leaves`: fresh variables holding copies.
fn to_leaves(sim: &Sim, p: &[T]) -> Params {
    within(sim, Category::Trainable, || {
        p.iter().map(|t| t.detach().to_leaf()).collect()
    })
}

fn axpy(a: &[T], alpha: f64, b: &[T]) -> Params {
    a.iter()
        .zip(b)
        .map(|(x, y)| x.add(&y.affine(alpha)))
        .collect()
}

fn scale(a: &[T], alpha: f64) -> Params {
    a.iter().map(|x| x.affine(alpha)).collect()
}

fn add(a: &[T], b: &[T]) -> Params {
    a.iter().zip(b).map(|(x, y)| x.add(y)).collect()
}

fn sub(a: &[T], b: &[T]) -> Params {
    a.iter().zip(b).map(|(x, y)| x.sub(y)).collect()
}

fn mul(a: &[T], b: &[T]) -> Params {
    a.iter().zip(b).map(|(x, y)| x.mul(y)).collect()
}

fn zeros_like(a: &[T]) -> Params {
    a.iter().map(T::zeros_like).collect()
}

/// `ParamSet::dot`: Σ sum(a_i ⊙ b_i), a 0-d tensor.
fn dot(a: &[T], b: &[T]) -> T {
    let mut total = a[0].mul(&b[0]).sum_all();
    for (x, y) in a.iter().zip(b).skip(1) {
        total = total.add(&x.mul(y).sum_all());
    }
    total
}

/// `ParamSet::norm` and `check_finite`: each tensor in f64, its squares or absolute
/// values summed.
fn read_norm(sim: &Sim, p: &[T]) {
    within(sim, Category::Temporaries, || {
        for t in p {
            let _ = t.to_dtype(DType::F64).unary(super::sim::Un::Abs).sum_all();
        }
    });
}

/// The gradient of `loss` at `leaves`.
fn grads(sim: &Sim, loss: &T, leaves: &[T], keep: bool) -> Params {
    within(sim, Category::Gradients, || {
        gradients(sim, loss, leaves, keep)
    })
}

/// `ParamSet::vjp`: `∇⟨outputs, v⟩` at `leaves`, detached. Under a loss scale `v` is
/// normalised for the pass (its norm read in f64, a unit copy made) and the result
/// scaled back into a copy.
fn vjp(sim: &Sim, leaves: &[T], outputs: &[T], v: &[T]) -> Params {
    if !sim.loss_scaled() {
        return grads(sim, &dot(outputs, v), leaves, false);
    }
    read_norm(sim, v);
    let unit = within(sim, Category::Gradients, || scale(v, 0.5));
    let surrogate = dot(outputs, &unit);
    let g = grads(sim, &surrogate, leaves, false);
    let out = within(sim, Category::Gradients, || scale(&g, 2.0));
    drop((g, surrogate, unit));
    out
}

/// The micro-batches of a batch (`inner::chunks`) with their weights.
fn chunks(batch: &SimBatch, micro: Option<usize>) -> Vec<(SimBatch, f64)> {
    match micro {
        Some(size) if size < batch.len() => {
            let n = batch.len() as f64;
            batch
                .split(size)
                .into_iter()
                .map(|b| {
                    let w = b.len() as f64 / n;
                    (b, w)
                })
                .collect()
        }
        _ => vec![(batch.clone(), 1.0)],
    }
}

/// Σ w_i·f(chunk_i) (`inner::weighted_sum`).
fn weighted_sum(
    batch: &SimBatch,
    micro: Option<usize>,
    mut f: impl FnMut(&SimBatch) -> Params,
) -> Params {
    let mut total: Option<Params> = None;
    for (chunk, w) in chunks(batch, micro) {
        let part = f(&chunk);
        let part = if w == 1.0 { part } else { scale(&part, w) };
        total = Some(match total {
            Some(t) => add(&t, &part),
            None => part,
        });
    }
    total.expect("a batch has at least one chunk")
}

/// The simulated world of one task: model, batches and options.
pub(crate) struct Ctx<'a> {
    pub(crate) sim: &'a Sim,
    pub(crate) model: &'a SimModel,
    pub(crate) train: bool,
    pub(crate) inner: InnerSpec,
    /// With gradient checkpointing, the layers whose input is kept.
    pub(crate) checkpoint: Option<&'a [usize]>,
}

impl Ctx<'_> {
    fn loss(&self, params: &[T], batch: &SimBatch) -> T {
        within(self.sim, Category::Activations, || {
            task_loss(&self.model.logits(params, batch, self.train), batch)
        })
    }

    /// The checkpointing engine (`FewShotModel::checkpointing`), when it is on.
    fn engine(&self) -> Option<SimCheckpointer<'_>> {
        self.checkpoint
            .map(|boundaries| SimCheckpointer::new(self.model, boundaries, self.train))
    }

    /// One SGD step from `leaves` (`inner::sgd_step`): θ − α∇L, the gradient's graph
    /// kept when `keep`. A kept graph is never segmented (full-graph MAML needs the
    /// whole graph); a first-order gradient is, with checkpointing.
    fn sgd_step(&self, leaves: &[T], support: &SimBatch, keep: bool) -> Params {
        let g = weighted_sum(support, self.inner.micro, |chunk| match self.engine() {
            Some(engine) if !keep => engine.gradient(leaves, chunk),
            _ => {
                let loss = self.loss(leaves, chunk);
                grads(self.sim, &loss, leaves, keep)
            }
        });
        read_norm(self.sim, &g);
        within(self.sim, Category::Trainable, || axpy(leaves, -0.01, &g))
    }

    /// First-order adaptation storing θ₀…θ_{K−1} (`inner::adapt_with`).
    fn adapt_storing(&self, params: &[T], support: &SimBatch) -> (Vec<Params>, Params) {
        let mut theta = detach(params);
        let mut thetas = Vec::new();
        for _ in 0..self.inner.steps {
            let leaves = to_leaves(self.sim, &theta);
            let next = self.sgd_step(&leaves, support, false);
            thetas.push(theta);
            theta = detach(&next);
        }
        (thetas, theta)
    }

    /// The query gradient at `theta` (`inner::gradient`, first order).
    fn query_gradient(&self, theta: &[T], query: &SimBatch) -> Params {
        self.gradient(theta, query, self.inner.micro)
    }

    /// `inner::gradient`: the first-order gradient at `theta` over micro-batches of
    /// `micro`, segmented with checkpointing.
    fn gradient(&self, theta: &[T], batch: &SimBatch, micro: Option<usize>) -> Params {
        let leaves = to_leaves(self.sim, theta);
        let g = weighted_sum(batch, micro, |chunk| match self.engine() {
            Some(engine) => engine.gradient(&leaves, chunk),
            None => {
                let loss = self.loss(&leaves, chunk);
                grads(self.sim, &loss, &leaves, false)
            }
        });
        read_norm(self.sim, &g);
        g
    }

    /// The gradient and H·v at `theta`, each micro-batch's from one graph.
    fn gradient_and_hvp(&self, theta: &[T], batch: &SimBatch, v: &[T]) -> (Params, Params) {
        let leaves = to_leaves(self.sim, theta);
        let mut total: Option<(Params, Params)> = None;
        for (chunk, w) in chunks(batch, self.inner.micro) {
            let (g, hv) = match self.engine() {
                Some(engine) => {
                    let (g, mut hv) = engine.gradient_and_hvps(&leaves, &chunk, &[v.to_vec()]);
                    (g, hv.pop().expect("one product per vector"))
                }
                None => {
                    let loss = self.loss(&leaves, &chunk);
                    let g = grads(self.sim, &loss, &leaves, true);
                    let hv = vjp(self.sim, &leaves, &g, v);
                    (detach(&g), hv)
                }
            };
            let (g, hv) = (scale(&g, w), scale(&hv, w));
            total = Some(match total {
                Some((tg, th)) => (add(&tg, &g), add(&th, &hv)),
                None => (g, hv),
            });
        }
        total.expect("a batch has at least one chunk")
    }

    /// The support loss's gradient at fresh leaves, graph kept.
    fn gradient_with_graph(&self, theta: &[T], batch: &SimBatch) -> (Params, Params) {
        let leaves = to_leaves(self.sim, theta);
        let loss = self.loss(&leaves, batch);
        let g = grads(self.sim, &loss, &leaves, true);
        (leaves, g)
    }

    /// A Rademacher probe shaped like `theta` (`curvature::rademacher`): signs drawn in
    /// f64, then converted.
    fn rademacher(&self, theta: &[T]) -> Params {
        let sim = self.sim;
        within(sim, Category::Temporaries, || {
            theta
                .iter()
                .map(|t| {
                    sim.spike(8 * t.elem_count() as u64);
                    sim.tensor(&t.dims(), DType::F64).to_dtype(t.dtype())
                })
                .collect()
        })
    }

    /// MELoRA's curvature product H̃(θ)·g over the micro-batches.
    fn curvature(
        &self,
        approximation: Approximation,
        theta: &[T],
        support: &SimBatch,
        g: &[T],
    ) -> Params {
        let sim = self.sim;
        match approximation {
            Approximation::None => zeros_like(g),
            Approximation::Diagonal { probes } => {
                let diagonal = weighted_sum(support, self.inner.micro, |b| {
                    if let Some(engine) = self.engine() {
                        // Every probe drawn first, then their products from shared sweeps.
                        let zs: Vec<Params> =
                            (0..probes.max(1)).map(|_| self.rademacher(theta)).collect();
                        let (_, products) = engine.gradient_and_hvps(theta, b, &zs);
                        let mut sum = detach(&zeros_like(theta));
                        for (z, hz) in zs.iter().zip(&products) {
                            sum = add(&sum, &mul(z, hz));
                        }
                        return scale(&sum, 1.0 / zs.len() as f64);
                    }
                    let (leaves, gr) = self.gradient_with_graph(theta, b);
                    let mut sum = detach(&zeros_like(theta));
                    for _ in 0..probes.max(1) {
                        let z = self.rademacher(theta);
                        let hz = {
                            let surrogate = dot(&gr, &z);
                            grads(sim, &surrogate, &leaves, false)
                        };
                        sum = add(&sum, &mul(&z, &hz));
                    }
                    scale(&sum, 1.0 / probes.max(1) as f64)
                });
                mul(&diagonal, g)
            }
            Approximation::GaussNewton => weighted_sum(support, self.inner.micro, |b| {
                if let Some(engine) = self.engine() {
                    return engine.gauss_newton_product(theta, b, g);
                }
                let leaves = to_leaves(sim, theta);
                let logits = within(sim, Category::Activations, || {
                    self.model.logits(&leaves, b, self.train)
                });
                let u = within(sim, Category::Gradients, || {
                    sim.variable(&logits.dims(), logits.dtype())
                });
                let j_t_u = {
                    let surrogate = within(sim, Category::Activations, || logits.mul(&u).sum_all());
                    grads(sim, &surrogate, &leaves, true)
                };
                let jv = {
                    let surrogate = dot(&j_t_u, g);
                    grads(sim, &surrogate, std::slice::from_ref(&u), false)
                };
                let r = within(sim, Category::Gradients, || {
                    super::models::output_hessian_product(&logits, b, &jv[0])
                });
                let surrogate = within(sim, Category::Activations, || logits.mul(&r).sum_all());
                let out = grads(sim, &surrogate, &leaves, false);
                drop(j_t_u);
                out
            }),
            Approximation::BlockDiagonal => weighted_sum(support, self.inner.micro, |b| {
                if let Some(engine) = self.engine() {
                    // One block product per tensor, each reading its part of g.
                    let blocks: Vec<(usize, &[T])> = (0..g.len()).map(|i| (i, g)).collect();
                    return engine.block_products(theta, b, &blocks);
                }
                // ⟨∇_i L, g_i⟩ per tensor: only the graph that tensor's gradient
                // depends on is walked.
                let (leaves, gr) = self.gradient_with_graph(theta, b);
                (0..g.len())
                    .map(|i| {
                        let h = {
                            let surrogate = dot(&gr[i..=i], &g[i..=i]);
                            grads(sim, &surrogate, &leaves, false)
                        };
                        h[i].clone()
                    })
                    .collect()
            }),
        }
    }

    /// A fine-tuning baseline on one test task (`meta::baseline` and
    /// `eval::evaluate_episodes`): `steps` full-batch AdamW steps on the support set
    /// from `start` (first order, segmented with checkpointing), then the query's
    /// outputs without a graph.
    pub(crate) fn finetune(&self, start: &[T], support: &SimBatch, query: &SimBatch, steps: usize) {
        let mut theta = detach(start);
        let mut state = None;
        // Optimizer::new(OptimizerKind::adamw(0.0)).
        let adamw = OptimizerSpec {
            adamw: true,
            weight_decay: false,
        };
        for _ in 0..steps {
            let g = self.gradient(&theta, support, None);
            theta = optimizer_step(self.sim, &theta, &g, adamw, &mut state);
        }
        let _ = self.loss(&theta, query);
    }

    /// `meta::NoAdaptation` on one test task: the query's outputs at `params`.
    pub(crate) fn no_adaptation(&self, params: &[T], query: &SimBatch) {
        let _ = self.loss(&detach(params), query);
    }

    /// `meta::Prototype` on one test task: the support's features without a graph,
    /// unit rows and one mean per class, then the query's features against them.
    pub(crate) fn prototype(
        &self,
        params: &[T],
        support: &SimBatch,
        query: &SimBatch,
        classes: usize,
    ) {
        let sim = self.sim;
        let unit = |x: &T| {
            let norms = x
                .unary(super::sim::Un::Sqr)
                .sum_keepdim(&[1])
                .unary(super::sim::Un::Sqrt);
            x.broadcast_binary(&norms, super::sim::Bin::Div)
        };
        let means = within(sim, Category::Activations, || {
            let features = unit(&self.model.features(params, support, self.train).detach());
            let per_class = features.dims()[0].div_ceil(classes.max(1));
            let rows: Vec<T> = (0..classes)
                .map(|_| {
                    features
                        .narrow(0, 0, per_class.min(features.dims()[0]))
                        .contiguous()
                        .mean_keepdim(&[0])
                })
                .collect();
            unit(&T::cat(&rows.iter().collect::<Vec<_>>(), 0))
        });
        within(sim, Category::Activations, || {
            let features = unit(&self.model.features(params, query, self.train));
            let _ = features.matmul(&means.t()).affine(10.0);
        });
    }

    /// `meta::HeadFinetune` on one test task: the support's features once, `steps`
    /// AdamW steps on a head of `classes` rows, then the query's outputs.
    pub(crate) fn head_finetune(
        &self,
        params: &[T],
        support: &SimBatch,
        query: &SimBatch,
        classes: usize,
        steps: usize,
    ) {
        let sim = self.sim;
        let (w, b) = self.model.head_params();
        let features = within(sim, Category::Activations, || {
            self.model.features(params, support, self.train).detach()
        });
        let mut head: Params = within(sim, Category::Trainable, || {
            vec![
                sim.tensor(&[classes, params[w].dims()[1]], params[w].dtype()),
                sim.tensor(&[classes], params[b].dtype()),
            ]
        });
        let adamw = OptimizerSpec {
            adamw: true,
            weight_decay: false,
        };
        let mut state = None;
        for _ in 0..steps {
            let leaves = to_leaves(sim, &head);
            let loss = within(sim, Category::Activations, || {
                let logits = super::models::linear_with_bias(&features, &leaves[0], &leaves[1]);
                task_loss(&logits, support)
            });
            let g = grads(sim, &loss, &leaves, false);
            read_norm(sim, &g);
            head = optimizer_step(sim, &head, &g, adamw, &mut state);
        }
        let mut adapted = detach(params);
        adapted[w] = head[0].clone();
        adapted[b] = head[1].clone();
        let _ = self.loss(&adapted, query);
    }

    /// One supervised step of `pretrain-finetune`'s pre-training on `batch`: the
    /// gradient of every trainable tensor and an AdamW step.
    pub(crate) fn pretrain_step(
        &self,
        params: &[T],
        batch: &SimBatch,
        state: &mut Option<(Params, Params)>,
    ) -> Params {
        let g = self.gradient(params, batch, self.inner.micro);
        let adamw = OptimizerSpec {
            adamw: true,
            weight_decay: false,
        };
        optimizer_step(self.sim, params, &g, adamw, state)
    }

    /// One task's meta-gradient.
    pub(crate) fn meta_gradient(
        &self,
        learner: Learner,
        params: &[T],
        support: &SimBatch,
        query: &SimBatch,
    ) -> Params {
        let sim = self.sim;
        match learner {
            Learner::MamlFullGraph => {
                let mut leaves = to_leaves(sim, params);
                let mut steps = Vec::new();
                for _ in 0..self.inner.steps {
                    let next = self.sgd_step(&leaves, support, true);
                    let next_leaves = to_leaves(sim, &next);
                    steps.push((leaves, next));
                    leaves = next_leaves;
                }
                let mut v = self.query_gradient(&leaves, query);
                for (step_leaves, next) in steps.iter().rev() {
                    v = vjp(sim, step_leaves, next, &v);
                }
                drop(steps);
                v
            }
            // MetaSGD: MAML's passes, with θ and its step sizes α in one list (`params`
            // is θ followed by α); the step sizes' gradient is one tensor per θ's.
            Learner::MetaSgd { full_graph } => {
                let half = params.len() / 2;
                let maml = if full_graph {
                    Learner::MamlFullGraph
                } else {
                    Learner::MamlRecompute
                };
                let mut g = self.meta_gradient(maml, &params[..half], support, query);
                let alpha_grad = within(sim, Category::Gradients, || zeros_like(&g));
                g.extend(alpha_grad);
                g
            }
            Learner::MamlRecompute => {
                let (thetas, adapted) = self.adapt_storing(params, support);
                let mut v = self.query_gradient(&adapted, query);
                for theta_k in thetas.iter().rev() {
                    let scaled = scale(&v, 0.01);
                    let (_g, h_scaled) = self.gradient_and_hvp(theta_k, support, &scaled);
                    v = sub(&v, &h_scaled);
                }
                v
            }
            Learner::Fomaml => {
                let (_, adapted) = self.adapt_storing(params, support);
                self.query_gradient(&adapted, query)
            }
            Learner::Reptile => {
                let (_, adapted) = self.adapt_storing(params, support);
                // The query set is only scored: forward passes without any variable.
                for (chunk, _) in chunks(query, self.inner.micro) {
                    let _ = self.loss(&adapted, &chunk);
                }
                within(sim, Category::Gradients, || sub(&detach(params), &adapted))
            }
            Learner::Melora {
                approximation,
                damped,
            } => {
                let (thetas, adapted) = self.adapt_storing(params, support);
                let mut g = self.query_gradient(&adapted, query);
                if approximation != Approximation::None || damped {
                    for theta_k in thetas.iter().rev() {
                        let h = self.curvature(approximation, theta_k, support, &g);
                        let h = if damped { axpy(&h, 0.1, &g) } else { h };
                        g = axpy(&g, -0.01, &h);
                    }
                }
                g
            }
        }
    }
}

/// The optimiser as the simulation needs it: AdamW or SGD, and whether weight decay
/// makes a decayed copy of the parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OptimizerSpec {
    /// AdamW (moments kept) rather than SGD.
    pub(crate) adamw: bool,
    /// Weight decay above 0.
    pub(crate) weight_decay: bool,
}

/// The outer update (`train::OuterUpdate::apply`): the mean of the meta-gradients
/// (alive until the step is done, as there), its norm, the clipped copy when
/// clipping is on, and the optimiser step; returns the new parameters and leaves the
/// optimiser state in `state`.
///
/// Clipping copies the mean only when its norm exceeds the threshold, which depends
/// on values the planner does not know: it counts the copy, the larger case.
pub(crate) fn outer_update(
    sim: &Sim,
    params: &[T],
    gradients: &[Params],
    optimizer: OptimizerSpec,
    clip: bool,
    state: &mut Option<(Params, Params)>,
) -> Params {
    let mean = within(sim, Category::Gradients, || {
        let mut sum = detach(&gradients[0]);
        for g in &gradients[1..] {
            sum = add(&sum, g);
        }
        scale(&sum, 1.0 / gradients.len() as f64)
    });
    read_norm(sim, &mean);
    let grads = if clip {
        within(sim, Category::Gradients, || scale(&mean, 0.5))
    } else {
        mean.clone()
    };
    let next = optimizer_step(sim, params, &grads, optimizer, state);
    drop((grads, mean));
    next
}

/// `Optimizer::step`: the new parameters, the moments left in `state`. The squared
/// gradient lives until the step returns, as there.
pub(crate) fn optimizer_step(
    sim: &Sim,
    params: &[T],
    grads: &[T],
    optimizer: OptimizerSpec,
    state: &mut Option<(Params, Params)>,
) -> Params {
    let (p, g) = (detach(params), detach(grads));
    if !optimizer.adamw {
        let direction = if optimizer.weight_decay {
            within(sim, Category::Temporaries, || axpy(&g, 0.01, &p))
        } else {
            g
        };
        return within(sim, Category::Trainable, || axpy(&p, -0.01, &direction));
    }
    let (m, squared, v) = within(sim, Category::Optimizer, || {
        let m = match state {
            Some((m, _)) => axpy(&scale(m, 0.9), 0.1, &g),
            None => scale(&g, 0.1),
        };
        let squared = mul(&g, &g);
        let v = match state {
            Some((_, v)) => axpy(&scale(v, 0.999), 0.001, &squared),
            None => scale(&squared, 0.001),
        };
        (m, squared, v)
    });
    // (m / c1) / (sqrt(v / c2) + eps), tensor by tensor.
    let update: Params = within(sim, Category::Temporaries, || {
        m.iter()
            .zip(&v)
            .map(|(m_i, v_i)| {
                m_i.affine(2.0)
                    .div(&v_i.affine(2.0).unary(super::sim::Un::Sqrt).affine(1.0))
            })
            .collect()
    });
    let decayed = if optimizer.weight_decay {
        within(sim, Category::Trainable, || scale(&p, 0.999))
    } else {
        p
    };
    *state = Some((m, v));
    let next = within(sim, Category::Trainable, || axpy(&decayed, -0.01, &update));
    drop(squared);
    next
}
