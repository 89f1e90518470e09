//! Curvature products built on any [`GradEngine`]: Hessian-vector products, the
//! diagonal of the Hessian (Hutchinson's estimate or exact) and its block-diagonal
//! part — the stand-ins MELoRA uses for the support Hessian.

use candle_core::{DType, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::data::Batch;
use crate::nn::Mode;
use crate::tensor::ParamSet;
use crate::Result;

use super::GradEngine;

/// `H·v` with `H` the Hessian of the engine's loss on `batch` at `theta`
/// (Pearlmutter: the gradient of ⟨∇L, v⟩).
///
/// ```
/// use melora::engine::{hessian_vector_product, WholeGraph};
/// use melora::models::{mlp::Mlp, FewShotModel};
/// use melora::data::{EpisodeSource, SinusoidTasks};
/// use melora::nn::Mode;
///
/// melora::init();
/// let model = Mlp::new(1, &[8], 1, candle_core::DType::F32, &candle_core::Device::Cpu)?;
/// let theta = model.init_params(0)?;
/// let task = SinusoidTasks { k_shot: 4, n_query: 4, seed: 1 }.episode(0)?;
/// let engine = WholeGraph::new(&model);
/// let v = theta.map(|_, t| Ok(t.ones_like()?))?;
/// let hv = hessian_vector_product(&engine, &theta, &task.support, &v, Mode::Eval)?;
/// // H is symmetric: ⟨v, Hv⟩ is the curvature along v, real and finite.
/// assert!(v.dot(&hv)?.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?.is_finite());
/// # Ok::<(), melora::Error>(())
/// ```
pub fn hessian_vector_product(
    engine: &dyn GradEngine,
    theta: &ParamSet,
    batch: &Batch,
    v: &ParamSet,
    mode: Mode,
) -> Result<ParamSet> {
    let (_, mut products) =
        engine.gradient_and_hvps(theta, batch, std::slice::from_ref(v), mode)?;
    Ok(products.pop().expect("one product per vector"))
}

/// A ParamSet like `like` with `name`'s slot filled by `value` and zeros elsewhere.
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
/// z ⊙ Hz (unbiased; the probes are drawn from `seed` and share one gradient graph).
pub fn hutchinson_diagonal(
    engine: &dyn GradEngine,
    theta: &ParamSet,
    batch: &Batch,
    probes: usize,
    seed: u64,
    mode: Mode,
) -> Result<ParamSet> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let probes = (0..probes.max(1))
        .map(|_| rademacher(theta, &mut rng))
        .collect::<Result<Vec<_>>>()?;
    let (_, products) = engine.gradient_and_hvps(theta, batch, &probes, mode)?;
    let mut sum = theta.zeros_like()?.detach();
    for (z, hz) in probes.iter().zip(&products) {
        sum = sum.add(&z.mul(hz)?)?;
    }
    sum.scale(1.0 / probes.len() as f64)
}

/// Basis vectors per call of [`GradEngine::block_products`] in
/// [`exact_hessian_diagonal`]: bounds the probes held at once (each as large as θ).
const BASIS_BATCH: usize = 64;

/// The exact diagonal of the Hessian, one block product per coordinate: for tiny
/// parameter sets and tests. With `names`, only those tensors' entries are computed
/// (the others are zero).
pub fn exact_hessian_diagonal(
    engine: &dyn GradEngine,
    theta: &ParamSet,
    batch: &Batch,
    names: Option<&[&str]>,
    mode: Mode,
) -> Result<ParamSet> {
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
            let columns = engine.block_products(theta, batch, &blocks, mode)?;
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
/// of `v`, cross-tensor terms dropped. `v` must have `theta`'s names and shapes, in
/// its order ([`crate::Error::Params`] otherwise).
pub fn block_diagonal_product(
    engine: &dyn GradEngine,
    theta: &ParamSet,
    batch: &Batch,
    v: &ParamSet,
    mode: Mode,
) -> Result<ParamSet> {
    theta.check_compatible(v)?;
    // Each block product reads only its own tensor of `v`: no zero-padded copies.
    let blocks: Vec<(usize, &ParamSet)> = (0..v.len()).map(|i| (i, v)).collect();
    let mut products = engine
        .block_products(theta, batch, &blocks, mode)?
        .into_iter();
    v.map(|_, _| Ok(products.next().expect("one product per tensor")))
}
