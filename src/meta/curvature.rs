//! Curvature products of the support loss at one point θ: exact Hessian-vector
//! products and the approximations MELoRA uses in their place.
//!
//! Each function builds the forward graph (and, where needed, the gradient's graph)
//! once and differentiates it as many times as it needs. On a model with gradient
//! checkpointing ([`FewShotModel::checkpointing`]) no whole graph is ever built: the
//! same products come from the engine's segment sweeps (exact Hessian-vector products
//! by the R-operator, several vectors per sweep), with the same probes in the same
//! order, so the results agree to float rounding.

use candle_core::{DType, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::data::Batch;
use crate::models::FewShotModel;
use crate::nn::Mode;
use crate::tensor::{GradGraph, ParamSet};
use crate::Result;

use super::loss::{batch_loss, output_hessian_product, task_loss};

/// The support loss's gradient at fresh leaves of `theta`, graph kept.
fn gradient_with_graph(
    model: &dyn FewShotModel,
    theta: &ParamSet,
    batch: &Batch,
    mode: Mode,
) -> Result<(ParamSet, ParamSet)> {
    let leaves = theta.to_leaves()?;
    let loss = batch_loss(model, &leaves, batch, mode)?;
    let grads = leaves.gradients(&loss, GradGraph::Keep)?;
    Ok((leaves, grads))
}

/// A ParamSet like `like` with `tensor`'s slot filled by `value` and zeros elsewhere.
fn only(like: &ParamSet, name: &str, value: &Tensor) -> Result<ParamSet> {
    like.map(|n, t| {
        if n == name {
            Ok(value.clone())
        } else {
            t.zeros_like()
        }
    })
}

/// Rademacher vectors (±1 entries) shaped like `like`.
fn rademacher(like: &ParamSet, rng: &mut ChaCha8Rng) -> Result<ParamSet> {
    like.map(|_, t| {
        let signs: Vec<f64> = (0..t.elem_count())
            .map(|_| if rng.random::<bool>() { 1.0 } else { -1.0 })
            .collect();
        Tensor::from_vec(signs, t.dims(), t.device())?.to_dtype(t.dtype())
    })
}

/// Hutchinson's estimate of diag(H): the mean over `probes` Rademacher vectors z of
/// z ⊙ Hz (unbiased; one double-backward per probe).
pub fn hutchinson_diagonal(
    model: &dyn FewShotModel,
    theta: &ParamSet,
    batch: &Batch,
    probes: usize,
    seed: u64,
    mode: Mode,
) -> Result<ParamSet> {
    if let Some(engine) = model.checkpointing() {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let probes = (0..probes.max(1))
            .map(|_| rademacher(theta, &mut rng))
            .collect::<Result<Vec<_>>>()?;
        let (_, products) = engine.gradient_and_hvps(theta, batch, &probes, mode, &task_loss)?;
        let mut sum = theta.zeros_like()?.detach();
        for (z, hz) in probes.iter().zip(&products) {
            sum = sum.add(&z.mul(hz)?)?;
        }
        return sum.scale(1.0 / probes.len() as f64);
    }
    let (leaves, grads) = gradient_with_graph(model, theta, batch, mode)?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut sum = theta.zeros_like()?.detach();
    for _ in 0..probes.max(1) {
        let z = rademacher(theta, &mut rng)?;
        let hz = leaves.gradients(&grads.dot(&z)?, GradGraph::Detach)?;
        sum = sum.add(&z.mul(&hz)?)?;
    }
    sum.scale(1.0 / probes.max(1) as f64)
}

/// The exact diagonal of the Hessian, one double-backward per coordinate: for tiny
/// parameter sets and tests. With `names`, only those tensors' entries are computed
/// (the others are zero).
pub fn exact_hessian_diagonal(
    model: &dyn FewShotModel,
    theta: &ParamSet,
    batch: &Batch,
    names: Option<&[&str]>,
    mode: Mode,
) -> Result<ParamSet> {
    if model.checkpointing().is_some() {
        return checkpointed_hessian_diagonal(model, theta, batch, names, mode);
    }
    let (leaves, grads) = gradient_with_graph(model, theta, batch, mode)?;
    let zeros = theta.zeros_like()?.detach();
    zeros.map(|name, t| {
        if names.is_some_and(|n| !n.contains(&name)) {
            return Ok(t.clone());
        }
        let n = t.elem_count();
        let mut diagonal = vec![0f64; n];
        for (i, entry) in diagonal.iter_mut().enumerate() {
            let mut basis = vec![0f64; n];
            basis[i] = 1.0;
            let e = Tensor::from_vec(basis, t.dims(), t.device())?.to_dtype(t.dtype())?;
            let probe = only(&zeros, name, &e).map_err(candle_core::Error::wrap)?;
            let h = leaves
                .gradients(
                    &grads.dot(&probe).map_err(candle_core::Error::wrap)?,
                    GradGraph::Detach,
                )
                .map_err(candle_core::Error::wrap)?;
            let column = h
                .get(name)
                .expect("same names")
                .flatten_all()?
                .to_dtype(DType::F64)?;
            *entry = column.get(i)?.to_scalar::<f64>()?;
        }
        Tensor::from_vec(diagonal, t.dims(), t.device())?.to_dtype(t.dtype())
    })
}

/// Basis vectors per checkpointed sweep of [`exact_hessian_diagonal`]: bounds the
/// probes held at once (each as large as θ).
const BASIS_BATCH: usize = 64;

/// [`exact_hessian_diagonal`] from the checkpointing engine's block products,
/// [`BASIS_BATCH`] basis vectors at a time.
fn checkpointed_hessian_diagonal(
    model: &dyn FewShotModel,
    theta: &ParamSet,
    batch: &Batch,
    names: Option<&[&str]>,
    mode: Mode,
) -> Result<ParamSet> {
    let engine = model
        .checkpointing()
        .expect("called for checkpointing models only");
    let zeros = theta.zeros_like()?.detach();
    let mut diagonal = ParamSet::new();
    for (tensor, (name, t)) in zeros.iter().enumerate() {
        if names.is_some_and(|n| !n.contains(&name)) {
            diagonal.insert(name, t.clone())?;
            continue;
        }
        let n = t.elem_count();
        let mut entries = vec![0f64; n];
        for start in (0..n).step_by(BASIS_BATCH) {
            let indices = start..(start + BASIS_BATCH).min(n);
            let probes = indices
                .clone()
                .map(|i| {
                    let mut basis = vec![0f64; n];
                    basis[i] = 1.0;
                    let e = Tensor::from_vec(basis, t.dims(), t.device())?.to_dtype(t.dtype())?;
                    only(&zeros, name, &e)
                })
                .collect::<Result<Vec<_>>>()?;
            let blocks: Vec<(usize, &ParamSet)> = probes.iter().map(|p| (tensor, p)).collect();
            let columns = engine.block_products(theta, batch, &blocks, mode, &task_loss)?;
            for (i, column) in indices.zip(&columns) {
                let column = column.flatten_all()?.to_dtype(DType::F64)?;
                entries[i] = column.get(i)?.to_scalar::<f64>()?;
            }
        }
        diagonal.insert(
            name,
            Tensor::from_vec(entries, t.dims(), t.device())?.to_dtype(t.dtype())?,
        )?;
    }
    Ok(diagonal)
}

/// Block-diagonal Hessian product: each tensor's block applied to that tensor's part
/// of `v`, cross-tensor terms dropped (one double-backward per tensor). `v` must have
/// `theta`'s names and shapes, in its order ([`crate::Error::Params`] otherwise).
pub fn block_diagonal_product(
    model: &dyn FewShotModel,
    theta: &ParamSet,
    batch: &Batch,
    v: &ParamSet,
    mode: Mode,
) -> Result<ParamSet> {
    theta.check_compatible(v)?;
    if let Some(engine) = model.checkpointing() {
        // Each block product reads only its own tensor of `v`: no zero-padded copies.
        let blocks: Vec<(usize, &ParamSet)> = (0..v.len()).map(|i| (i, v)).collect();
        let products = engine.block_products(theta, batch, &blocks, mode, &task_loss)?;
        let mut products = products.into_iter();
        return v.map(|_, _| Ok(products.next().expect("one product per tensor")));
    }
    let (leaves, grads) = gradient_with_graph(model, theta, batch, mode)?;
    v.map(|name, v_i| {
        // ⟨∇_i L, v_i⟩ alone, not ⟨∇L, probe⟩ with zeros elsewhere: the backward then
        // walks only the part of the double-backward graph this tensor's gradient
        // depends on, instead of the whole graph once per tensor.
        let g_i = grads.get(name).expect("same names");
        let h = leaves
            .gradients(&(g_i * v_i)?.sum_all()?, GradGraph::Detach)
            .map_err(candle_core::Error::wrap)?;
        Ok(h.get(name).expect("same names").clone())
    })
}

/// Generalised Gauss-Newton product `Jᵀ·H_z·J·v` of the task's own loss, with J the
/// Jacobian of the outputs z and H_z the loss's Hessian in z (see
/// [`output_hessian_product`]: `(diag(p) − ppᵀ)/N` per example for the mean
/// cross-entropy, `2/(N·d)` times the identity for the mean squared error): positive
/// semi-definite; equal to the Hessian for a model linear in θ. `J·v` comes from the
/// double-backward trick (∇_u⟨Jᵀu, v⟩ with a zero variable u), `Jᵀr` from one
/// backward: three passes over one forward graph.
pub fn gauss_newton_product(
    model: &dyn FewShotModel,
    theta: &ParamSet,
    batch: &Batch,
    v: &ParamSet,
    mode: Mode,
) -> Result<ParamSet> {
    theta.check_compatible(v)?;
    if let Some(engine) = model.checkpointing() {
        return engine.gauss_newton_product(theta, batch, v, mode, &output_hessian_product);
    }
    let leaves = theta.to_leaves()?;
    let logits = model.logits(&leaves, batch, mode)?;
    let u = ParamSet::from_pairs([(
        "u",
        Var::zeros(logits.dims(), logits.dtype(), logits.device())?.into_inner(),
    )])?;
    let j_t_u = leaves.gradients(&(&logits * u.require("u")?)?.sum_all()?, GradGraph::Keep)?;
    let jv = u.gradients(&j_t_u.dot(v)?, GradGraph::Detach)?;
    let r = output_hessian_product(&logits, batch, jv.require("u")?)?;
    leaves.gradients(&(&logits * r)?.sum_all()?, GradGraph::Detach)
}
