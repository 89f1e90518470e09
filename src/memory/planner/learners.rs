//! The learners' meta-gradients and the meta-step, replayed on simulated tensors.
//!
//! Mirrors `crate::meta` (inner loop, MAML in both modes, FOMAML, Reptile, MELoRA
//! with each Hessian approximation), `crate::train::meta_step` and the outer update,
//! including what each keeps alive: full-graph MAML holds every inner step's forward
//! and gradient graphs until the meta-backward has crossed them; recompute-MAML and
//! MELoRA rebuild one step's graphs at a time; FOMAML and Reptile never keep a
//! gradient's graph.
//!
//! Learning rates, scales and other numbers appear only where an op takes one; they
//! do not change a single size.

use super::autograd::gradients;
use super::models::{cross_entropy, SimBatch, SimModel};
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
}

impl Ctx<'_> {
    fn loss(&self, params: &[T], batch: &SimBatch) -> T {
        within(self.sim, Category::Activations, || {
            cross_entropy(&self.model.logits(params, batch, self.train))
        })
    }

    /// One SGD step from `leaves` (`inner::sgd_step`): θ − α∇L, the gradient's graph
    /// kept when `keep`.
    fn sgd_step(&self, leaves: &[T], support: &SimBatch, keep: bool) -> Params {
        let g = weighted_sum(support, self.inner.micro, |chunk| {
            let loss = self.loss(leaves, chunk);
            grads(self.sim, &loss, leaves, keep)
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
        let leaves = to_leaves(self.sim, theta);
        let g = weighted_sum(query, self.inner.micro, |chunk| {
            let loss = self.loss(&leaves, chunk);
            grads(self.sim, &loss, &leaves, false)
        });
        read_norm(self.sim, &g);
        g
    }

    /// The gradient and H·v at `theta`, each micro-batch's from one graph.
    fn gradient_and_hvp(&self, theta: &[T], batch: &SimBatch, v: &[T]) -> (Params, Params) {
        let leaves = to_leaves(self.sim, theta);
        let mut total: Option<(Params, Params)> = None;
        for (chunk, w) in chunks(batch, self.inner.micro) {
            let loss = self.loss(&leaves, &chunk);
            let g = grads(self.sim, &loss, &leaves, true);
            let hv = {
                let surrogate = dot(&g, v);
                grads(self.sim, &surrogate, &leaves, false)
            };
            let (g, hv) = (scale(&detach(&g), w), scale(&hv, w));
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
                    let (leaves, gr) = self.gradient_with_graph(theta, b);
                    let mut sum = detach(&zeros_like(theta));
                    for _ in 0..probes.max(1) {
                        // Rademacher signs drawn in f64, then converted.
                        let z: Params = within(sim, Category::Temporaries, || {
                            theta
                                .iter()
                                .map(|t| {
                                    sim.spike(8 * t.elem_count() as u64);
                                    sim.tensor(&t.dims(), DType::F64).to_dtype(t.dtype())
                                })
                                .collect()
                        });
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
                    let p = super::models::softmax(&logits.detach());
                    let p_dot = p.mul(&jv[0]).sum_keepdim(&[1]);
                    p.mul(&jv[0])
                        .sub(&p.broadcast_binary(&p_dot, super::sim::Bin::Mul))
                        .affine(0.5)
                });
                let surrogate = within(sim, Category::Activations, || logits.mul(&r).sum_all());
                let out = grads(sim, &surrogate, &leaves, false);
                drop(j_t_u);
                out
            }),
            Approximation::BlockDiagonal => weighted_sum(support, self.inner.micro, |b| {
                let (leaves, gr) = self.gradient_with_graph(theta, b);
                let zeros = detach(&zeros_like(g));
                (0..g.len())
                    .map(|i| {
                        let probe: Params = zeros
                            .iter()
                            .enumerate()
                            .map(|(j, z)| if j == i { g[i].clone() } else { z.zeros_like() })
                            .collect();
                        let h = {
                            let surrogate = dot(&gr, &probe);
                            grads(sim, &surrogate, &leaves, false)
                        };
                        h[i].clone()
                    })
                    .collect()
            }),
        }
    }

    /// A fine-tuning baseline's adaptation (`meta::baseline`): `steps` full-batch
    /// AdamW steps on the support set, first order.
    pub(crate) fn finetune(&self, params: &[T], support: &SimBatch, steps: usize) -> Params {
        let mut theta = detach(params);
        let mut state = None;
        for _ in 0..steps {
            let leaves = to_leaves(self.sim, &theta);
            let g = {
                let loss = self.loss(&leaves, support);
                grads(self.sim, &loss, &leaves, false)
            };
            read_norm(self.sim, &g);
            theta = outer_update(self.sim, &theta, &[g], true, &mut state);
        }
        theta
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
                    let surrogate = dot(next, &v);
                    v = grads(sim, &surrogate, step_leaves, false);
                }
                drop(steps);
                v
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

/// The outer update (`train::OuterUpdate::apply` with AdamW or SGD): the mean of the
/// meta-gradients, its norm, and the optimiser step; returns the new parameters and
/// leaves the optimiser state in `state`.
pub(crate) fn outer_update(
    sim: &Sim,
    params: &[T],
    gradients: &[Params],
    adamw: bool,
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
    let grads = scale(&mean, 0.5);
    drop(mean);
    let (p, g) = (detach(params), detach(&grads));
    if !adamw {
        return within(sim, Category::Trainable, || axpy(&p, -0.01, &g));
    }
    let (m, v) = within(sim, Category::Optimizer, || {
        let m = match state {
            Some((m, _)) => axpy(&scale(m, 0.9), 0.1, &g),
            None => scale(&g, 0.1),
        };
        let squared = mul(&g, &g);
        let v = match state {
            Some((_, v)) => axpy(&scale(v, 0.999), 0.001, &squared),
            None => scale(&squared, 0.001),
        };
        (m, v)
    });
    let update: Params = within(sim, Category::Temporaries, || {
        m.iter()
            .zip(&v)
            .map(|(m_i, v_i)| {
                m_i.affine(2.0)
                    .div(&v_i.affine(2.0).unary(super::sim::Un::Sqrt).affine(1.0))
            })
            .collect()
    });
    *state = Some((m, v));
    within(sim, Category::Trainable, || axpy(&p, -0.01, &update))
}
