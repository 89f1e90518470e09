//! [`ParamSet`]: the trainable parameters of a model as an ordered list of named
//! tensors, with the vector-space operations meta-learners need.
//!
//! Models are functional (see `DESIGN.md`): they never own their trainable tensors, so
//! a learner can evaluate one model at θ₀, θ₁, …, θ_K. Names follow PEFT's saved-adapter
//! convention for LoRA (`base_model.model.<module>.lora_A.weight`), so a ParamSet saved
//! as safetensors loads in other tools.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};

use crate::tensor::second_order::{ensure_second_order, first_order_backward};
use crate::{Error, Result};

/// Whether gradients keep their graph (so they can be differentiated again, as MAML
/// and Hessian-vector products need) or are detached (first-order use: optimiser steps,
/// FOMAML, Reptile), which frees the graph as soon as the gradient is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GradGraph {
    /// Keep the graph of the gradient (second order).
    Keep,
    /// Detach the gradient (first order).
    Detach,
}

/// Key of the safetensors metadata entry that records the parameters' order.
const ORDER_KEY: &str = "melora.order";

/// An ordered set of named tensors: the trainable parameters of a model, or a
/// gradient, direction or update of the same shape.
///
/// Learners move ParamSets around as vectors (`axpy`, `dot`, `norm`, …) and take
/// gradients at fresh leaves; a gradient taken with [`GradGraph::Keep`] can be
/// differentiated again, which gives Hessian-vector products:
///
/// ```
/// use melora::tensor::{GradGraph, ParamSet};
/// use candle_core::{Device, Tensor};
///
/// melora::init(); // second order needs it, before any backward pass
/// let theta = ParamSet::from_pairs([
///     ("w", Tensor::new(&[1.0f64, 2.0], &Device::Cpu)?),
///     ("b", Tensor::new(&[0.5f64], &Device::Cpu)?),
/// ])?;
/// // One SGD step along a direction: θ − 0.1·d.
/// let d = theta.map(|_, t| t.ones_like())?;
/// let stepped = theta.axpy(-0.1, &d)?;
/// assert!((stepped.sub(&theta)?.norm()? - 0.1 * 3f64.sqrt()).abs() < 1e-12);
///
/// // L(θ) = Σ w³ + b²: the gradient, then H·v as the gradient of ⟨∇L, v⟩.
/// let leaves = theta.to_leaves()?;
/// let (w, b) = (leaves.require("w")?, leaves.require("b")?);
/// let loss = ((w.sqr()? * w)?.sum_all()? + b.sqr()?.sum_all()?)?;
/// let grad = leaves.gradients(&loss, GradGraph::Keep)?; // [3w², 2b]
/// let hv = leaves.vjp(&grad, &d, GradGraph::Detach)?; // diag(6w, 2)·1
/// assert_eq!(hv.require("w")?.to_vec1::<f64>()?, [6.0, 12.0]);
/// assert_eq!(hv.require("b")?.to_vec1::<f64>()?, [2.0]);
/// # Ok::<(), melora::Error>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct ParamSet {
    entries: Vec<(String, Tensor)>,
    index: HashMap<String, usize>,
}

impl ParamSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// A set from (name, tensor) pairs in order; duplicate names are an error.
    pub fn from_pairs<S: Into<String>>(
        pairs: impl IntoIterator<Item = (S, Tensor)>,
    ) -> Result<Self> {
        let mut set = Self::new();
        for (name, tensor) in pairs {
            set.insert(name, tensor)?;
        }
        Ok(set)
    }

    /// Appends a tensor; a name already present is an error.
    pub fn insert(&mut self, name: impl Into<String>, tensor: Tensor) -> Result<()> {
        let name = name.into();
        if self.index.contains_key(&name) {
            return Err(Error::Params(format!("duplicate parameter name `{name}`")));
        }
        self.index.insert(name.clone(), self.entries.len());
        self.entries.push((name, tensor));
        Ok(())
    }

    /// Replaces the tensor named `name` in place (keeping the order), or appends it if
    /// absent.
    pub fn set(&mut self, name: impl Into<String>, tensor: Tensor) {
        let name = name.into();
        match self.index.get(&name) {
            Some(&i) => self.entries[i].1 = tensor,
            None => {
                self.index.insert(name.clone(), self.entries.len());
                self.entries.push((name, tensor));
            }
        }
    }

    /// The tensor named `name`, if present.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.index.get(name).map(|&i| &self.entries[i].1)
    }

    /// The tensor named `name`, or an error naming it.
    pub fn require(&self, name: &str) -> Result<&Tensor> {
        self.get(name)
            .ok_or_else(|| Error::Params(format!("no parameter named `{name}`")))
    }

    /// The tensors of this set named `names`, in that order; an error names the
    /// first one missing.
    pub(crate) fn restricted_to<'n>(
        &self,
        names: impl IntoIterator<Item = &'n str>,
    ) -> Result<Self> {
        Self::from_pairs(
            names
                .into_iter()
                .map(|n| Ok((n.to_string(), self.require(n)?.clone())))
                .collect::<Result<Vec<_>>>()?,
        )
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the set holds no tensor.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// (name, tensor) pairs in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.entries.iter().map(|(n, t)| (n.as_str(), t))
    }

    /// Names in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(n, _)| n.as_str())
    }

    /// Total number of scalar entries.
    pub fn numel(&self) -> usize {
        self.entries.iter().map(|(_, t)| t.elem_count()).sum()
    }

    /// Total size of the tensors' data in bytes.
    pub fn size_in_bytes(&self) -> usize {
        self.entries
            .iter()
            .map(|(_, t)| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }

    /// (name, shape) pairs in order.
    pub fn shapes(&self) -> Vec<(String, Vec<usize>)> {
        self.entries
            .iter()
            .map(|(n, t)| (n.clone(), t.dims().to_vec()))
            .collect()
    }

    /// Checks that `other` has the same names, in the same order, with the same shapes.
    pub fn check_compatible(&self, other: &ParamSet) -> Result<()> {
        if self.len() != other.len() {
            return Err(Error::Params(format!(
                "{} tensors against {}; first names: {:?} vs {:?}",
                self.len(),
                other.len(),
                self.names().next(),
                other.names().next()
            )));
        }
        for ((a, ta), (b, tb)) in self.entries.iter().zip(&other.entries) {
            if a != b {
                return Err(Error::Params(format!("`{a}` where `{b}` was expected")));
            }
            if ta.dims() != tb.dims() {
                return Err(Error::Params(format!(
                    "`{a}` has shape {:?} against {:?}",
                    ta.dims(),
                    tb.dims()
                )));
            }
        }
        Ok(())
    }

    /// A new set with `f(name, tensor)` for every tensor.
    pub fn map(
        &self,
        mut f: impl FnMut(&str, &Tensor) -> candle_core::Result<Tensor>,
    ) -> Result<Self> {
        let entries = self
            .entries
            .iter()
            .map(|(n, t)| Ok((n.clone(), f(n, t)?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            entries,
            index: self.index.clone(),
        })
    }

    fn zip_map(
        &self,
        other: &ParamSet,
        mut f: impl FnMut(&Tensor, &Tensor) -> candle_core::Result<Tensor>,
    ) -> Result<Self> {
        self.check_compatible(other)?;
        let mut others = other.entries.iter();
        self.map(|_, t| match others.next() {
            Some((_, o)) => f(t, o),
            None => candle_core::bail!("parameter sets changed length"),
        })
    }

    /// `self + other`.
    pub fn add(&self, other: &ParamSet) -> Result<Self> {
        self.zip_map(other, |a, b| a + b)
    }

    /// `self − other`.
    pub fn sub(&self, other: &ParamSet) -> Result<Self> {
        self.zip_map(other, |a, b| a - b)
    }

    /// `self + alpha·other` (the SGD step is `theta.axpy(-lr, &grad)`).
    pub fn axpy(&self, alpha: f64, other: &ParamSet) -> Result<Self> {
        self.zip_map(other, |a, b| a + (b * alpha)?)
    }

    /// `alpha·self`.
    pub fn scale(&self, alpha: f64) -> Result<Self> {
        self.map(|_, t| t * alpha)
    }

    /// Element-wise product `self ⊙ other`.
    pub fn mul(&self, other: &ParamSet) -> Result<Self> {
        self.zip_map(other, |a, b| a * b)
    }

    /// The inner product `Σ ⟨self_i, other_i⟩` as a 0-d tensor; differentiable, so
    /// `∇⟨∇L, v⟩` gives a Hessian-vector product.
    pub fn dot(&self, other: &ParamSet) -> Result<Tensor> {
        self.check_compatible(other)?;
        let mut terms = self.entries.iter().zip(&other.entries);
        let Some(((_, a), (_, b))) = terms.next() else {
            return Err(Error::Params(
                "inner product of empty parameter sets".into(),
            ));
        };
        let mut total = (a * b)?.sum_all()?;
        for ((_, a), (_, b)) in terms {
            total = (total + (a * b)?.sum_all()?)?;
        }
        Ok(total)
    }

    /// The Euclidean norm over all tensors, in f64.
    pub fn norm(&self) -> Result<f64> {
        let mut sum = 0f64;
        for (_, t) in &self.entries {
            sum += t
                .to_dtype(DType::F64)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f64>()?;
        }
        Ok(sum.sqrt())
    }

    /// Zeros of the same names, shapes and dtypes.
    pub fn zeros_like(&self) -> Result<Self> {
        self.map(|_, t| t.zeros_like())
    }

    /// The same values with no graph: what is kept of a gradient or an adapted
    /// parameter when its history is no longer needed.
    pub fn detach(&self) -> Self {
        Self {
            entries: self
                .entries
                .iter()
                .map(|(n, t)| (n.clone(), t.detach()))
                .collect(),
            index: self.index.clone(),
        }
    }

    /// Fresh leaf variables holding copies of the values, with no history: the point
    /// at which a learner differentiates (θ₀ of a meta-step, θ_k of a recomputed step).
    pub fn to_leaves(&self) -> Result<Self> {
        self.map(|_, t| Ok(Var::from_tensor(&t.detach())?.into_inner()))
    }

    /// Converts every tensor to `dtype`.
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        self.map(|_, t| t.to_dtype(dtype))
    }

    /// The gradient of the scalar `loss` with respect to every tensor of this set, which
    /// must be leaves (see [`ParamSet::to_leaves`]). A tensor the loss does not depend on
    /// gets a zero gradient. With [`GradGraph::Keep`] the gradient can be differentiated
    /// again; that needs second-order gradients enabled (see [`crate::init`]).
    ///
    /// Under a loss scale ([`crate::tensor::loss_scale`]) the pass runs on
    /// `scale·loss` and the gradients are divided by the scale in their own dtype (f32
    /// master weights), so they are the true gradients unless something overflowed.
    pub fn gradients(&self, loss: &Tensor, graph: GradGraph) -> Result<Self> {
        if loss.elem_count() != 1 {
            return Err(Error::Shape(format!(
                "gradients need a scalar loss, got shape {:?}",
                loss.dims()
            )));
        }
        if let Some((name, _)) = self.entries.iter().find(|(_, t)| !t.is_variable()) {
            return Err(Error::Params(format!(
                "`{name}` is not a leaf variable, so candle keeps no gradient for it; \
                 differentiate at `ParamSet::to_leaves()`"
            )));
        }
        let scale = super::loss_scale::current();
        let scaled;
        let loss = if scale == 1.0 {
            loss
        } else {
            scaled = (loss * scale)?;
            &scaled
        };
        let store = match graph {
            GradGraph::Keep => {
                ensure_second_order()?;
                loss.backward()?
            }
            GradGraph::Detach => first_order_backward(loss)?,
        };
        self.map(|_, t| {
            let g = match store.get(t) {
                Some(g) if graph == GradGraph::Keep => g.clone(),
                Some(g) => g.detach(),
                None => return t.zeros_like(),
            };
            if scale == 1.0 {
                Ok(g)
            } else {
                g * scale.recip()
            }
        })
    }

    /// `∇⟨outputs, v⟩` with respect to this set (leaves): the vector-Jacobian product of
    /// `outputs`, tensors computed from these leaves and named like `v`, along `v` —
    /// a Hessian-vector product when `outputs` is a gradient kept with its graph.
    ///
    /// Under a loss scale (f16 activations) `v` is normalised to unit norm for the pass
    /// and the result scaled back (exact, by linearity): a short `v`, such as an inner
    /// learning rate times a gradient, would otherwise underflow in f16 where the pass
    /// crosses the first backward's graph.
    pub fn vjp(&self, outputs: &ParamSet, v: &ParamSet, graph: GradGraph) -> Result<Self> {
        if super::loss_scale::current() == 1.0 {
            return self.gradients(&outputs.dot(v)?, graph);
        }
        let norm = v.norm()?;
        if norm == 0.0 || !norm.is_finite() {
            return self.gradients(&outputs.dot(v)?, graph);
        }
        self.gradients(&outputs.dot(&v.scale(norm.recip())?)?, graph)?
            .scale(norm)
    }

    /// Saves the tensors as safetensors at `path` (atomically), recording their order in
    /// the metadata so that [`ParamSet::load`] restores it.
    pub fn save(&self, path: &Path) -> Result<()> {
        let tensors = self
            .entries
            .iter()
            .map(|(n, t)| Ok((n.clone(), t.contiguous()?)))
            .collect::<Result<Vec<_>>>()?;
        let order = serde_json::to_string(&self.names().collect::<Vec<_>>()).map_err(|e| {
            Error::Format {
                path: path.into(),
                message: e.to_string(),
            }
        })?;
        let metadata = HashMap::from([
            ("format".to_string(), "pt".to_string()),
            (ORDER_KEY.to_string(), order),
        ]);
        let bytes = safetensors::serialize(tensors, Some(metadata)).map_err(|e| Error::Format {
            path: path.into(),
            message: format!("cannot serialise tensors: {e}"),
        })?;
        crate::io::write_atomic(path, &bytes)
    }

    /// Loads a safetensors file, in the order recorded by [`ParamSet::save`] or, for
    /// files written elsewhere, in name order.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let format_error = |message: String| Error::Format {
            path: path.into(),
            message,
        };
        let (_, metadata) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| format_error(format!("not a safetensors file: {e}")))?;
        let mut tensors = candle_core::safetensors::load_buffer(&bytes, device)
            .map_err(|e| format_error(format!("cannot read tensors: {e}")))?;
        let order: Vec<String> = match metadata.metadata().as_ref().and_then(|m| m.get(ORDER_KEY)) {
            Some(order) => serde_json::from_str(order)
                .map_err(|e| format_error(format!("malformed `{ORDER_KEY}` metadata: {e}")))?,
            None => {
                let mut names: Vec<String> = tensors.keys().cloned().collect();
                names.sort();
                names
            }
        };
        let mut set = Self::new();
        for name in order {
            let tensor = tensors
                .remove(&name)
                .ok_or_else(|| format_error(format!("metadata lists `{name}`, which is absent")))?;
            set.insert(name, tensor)?;
        }
        if let Some(extra) = tensors.keys().next() {
            return Err(format_error(format!(
                "tensor `{extra}` is missing from the order metadata"
            )));
        }
        Ok(set)
    }

    /// Loads a safetensors file that must hold exactly the names and shapes of
    /// `template` (e.g. an adapter for a given model), returned in the template's order
    /// and dtype.
    pub fn load_like(path: &Path, template: &ParamSet) -> Result<Self> {
        Self::load(path, &template.device())?.conformed_to(template, path)
    }

    /// The device of the first tensor (the CPU for an empty set).
    pub(crate) fn device(&self) -> Device {
        self.entries
            .first()
            .map(|(_, t)| t.device().clone())
            .unwrap_or(Device::Cpu)
    }

    /// The tensors of `self` in `template`'s order and dtypes; a tensor missing, of
    /// another shape or not in `template` is an [`Error::Format`] naming `path` (the
    /// file `self` was read from).
    pub(crate) fn conformed_to(&self, template: &ParamSet, path: &Path) -> Result<Self> {
        let loaded = self;
        let mismatch = |message: String| Error::Format {
            path: path.into(),
            message,
        };
        let mut set = Self::new();
        for (name, t) in &template.entries {
            let Some(found) = loaded.get(name) else {
                return Err(mismatch(format!("tensor `{name}` is missing")));
            };
            if found.dims() != t.dims() {
                return Err(mismatch(format!(
                    "tensor `{name}` has shape {:?}, expected {:?}",
                    found.dims(),
                    t.dims()
                )));
            }
            set.insert(name.clone(), found.to_dtype(t.dtype())?)?;
        }
        if let Some(extra) = loaded.names().find(|n| template.get(n).is_none()) {
            return Err(mismatch(format!("unexpected tensor `{extra}`")));
        }
        Ok(set)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::gradcheck::random_tensor;

    fn set(seed: u64) -> ParamSet {
        let dev = Device::Cpu;
        ParamSet::from_pairs([
            (
                "layer.lora_A.weight",
                random_tensor(&[2, 3], seed, &dev).unwrap(),
            ),
            (
                "layer.lora_B.weight",
                random_tensor(&[4, 2], seed + 1, &dev).unwrap(),
            ),
            (
                "classifier.bias",
                random_tensor(&[4], seed + 2, &dev).unwrap(),
            ),
        ])
        .unwrap()
    }

    fn values(p: &ParamSet) -> Vec<f64> {
        p.iter()
            .flat_map(|(_, t)| t.flatten_all().unwrap().to_vec1::<f64>().unwrap())
            .collect()
    }

    #[test]
    fn arithmetic_matches_element_wise_definitions() {
        let (a, b) = (set(1), set(10));
        let (va, vb) = (values(&a), values(&b));
        let axpy = values(&a.axpy(-0.5, &b).unwrap());
        let sum = values(&a.add(&b).unwrap());
        let diff = values(&a.sub(&b).unwrap());
        let scaled = values(&a.scale(3.0).unwrap());
        for i in 0..va.len() {
            assert!((axpy[i] - (va[i] - 0.5 * vb[i])).abs() < 1e-15);
            assert!((sum[i] - (va[i] + vb[i])).abs() < 1e-15);
            assert!((diff[i] - (va[i] - vb[i])).abs() < 1e-15);
            assert!((scaled[i] - 3.0 * va[i]).abs() < 1e-15);
        }
        let dot = a.dot(&b).unwrap().to_scalar::<f64>().unwrap();
        let expect: f64 = va.iter().zip(&vb).map(|(x, y)| x * y).sum();
        assert!((dot - expect).abs() < 1e-13);
        let norm = a.norm().unwrap();
        assert!((norm - va.iter().map(|x| x * x).sum::<f64>().sqrt()).abs() < 1e-13);
        assert_eq!(a.numel(), 6 + 8 + 4);
        assert_eq!(a.size_in_bytes(), 18 * 8);
        assert!(values(&a.zeros_like().unwrap()).iter().all(|&v| v == 0.0));
    }

    #[test]
    fn mismatched_sets_are_errors_naming_the_tensor() {
        let a = set(1);
        let mut b = ParamSet::new();
        for (n, t) in a.iter() {
            let t = if n == "classifier.bias" {
                random_tensor(&[5], 3, &Device::Cpu).unwrap()
            } else {
                t.clone()
            };
            b.insert(n, t).unwrap();
        }
        let err = a.add(&b).unwrap_err().to_string();
        assert!(
            err.contains("classifier.bias") && err.contains("[5]"),
            "{err}"
        );
        let renamed =
            ParamSet::from_pairs(a.iter().map(|(n, t)| (format!("x.{n}"), t.clone()))).unwrap();
        assert!(a
            .dot(&renamed)
            .unwrap_err()
            .to_string()
            .contains("was expected"));
        let mut dup = set(1);
        assert!(dup
            .insert(
                "classifier.bias",
                random_tensor(&[4], 0, &Device::Cpu).unwrap()
            )
            .is_err());
        assert!(a
            .require("nope")
            .unwrap_err()
            .to_string()
            .contains("`nope`"));
    }

    /// Gradients of L(θ) = ½‖θ‖² + Σθ³ are θ + 3θ², and the Hessian-vector product
    /// through the kept graph is v + 6θ⊙v.
    #[test]
    fn gradients_first_and_second_order() {
        let theta = set(3).to_leaves().unwrap();
        let loss = |p: &ParamSet| -> Result<Tensor> {
            let cubes = p.map(|_, t| t.sqr()?.mul(t))?;
            let ones = p.map(|_, t| t.ones_like())?;
            Ok((p.dot(p)? * 0.5 + cubes.dot(&ones)?)?)
        };
        let g = theta
            .gradients(&loss(&theta).unwrap(), GradGraph::Keep)
            .unwrap();
        let (vt, vg) = (values(&theta), values(&g));
        for i in 0..vt.len() {
            assert!((vg[i] - (vt[i] + 3.0 * vt[i] * vt[i])).abs() < 1e-13);
        }
        let v = set(20);
        let hv = theta
            .gradients(&g.dot(&v).unwrap(), GradGraph::Detach)
            .unwrap();
        let (vv, vh) = (values(&v), values(&hv));
        for i in 0..vt.len() {
            assert!((vh[i] - (vv[i] + 6.0 * vt[i] * vv[i])).abs() < 1e-12);
        }
        // Detached gradients carry no graph.
        let g = theta
            .gradients(&loss(&theta).unwrap(), GradGraph::Detach)
            .unwrap();
        assert!(g.iter().all(|(_, t)| !t.track_op()));
    }

    #[test]
    fn gradients_need_leaves_and_a_scalar() {
        let theta = set(4).to_leaves().unwrap();
        let moved = theta.scale(2.0).unwrap();
        let loss = moved.dot(&moved).unwrap();
        let err = moved
            .gradients(&loss, GradGraph::Detach)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a leaf"), "{err}");
        let not_scalar = theta.iter().next().unwrap().1.clone();
        assert!(theta.gradients(&not_scalar, GradGraph::Detach).is_err());
        // A parameter the loss ignores gets a zero gradient.
        let first = theta.iter().next().unwrap().1.sum_all().unwrap();
        let g = theta.gradients(&first, GradGraph::Detach).unwrap();
        assert_eq!(values(&g).iter().filter(|&&v| v != 0.0).count(), 6);
    }

    #[test]
    fn safetensors_round_trip_keeps_order_and_values() {
        let dir = std::env::temp_dir().join(format!("melora-params-{}", std::process::id()));
        let path = dir.join("adapter_model.safetensors");
        let a = set(5);
        a.save(&path).unwrap();
        let b = ParamSet::load(&path, &Device::Cpu).unwrap();
        assert_eq!(a.shapes(), b.shapes());
        assert_eq!(values(&a), values(&b));
        let f32_template = a.to_dtype(DType::F32).unwrap();
        let c = ParamSet::load_like(&path, &f32_template).unwrap();
        assert_eq!(c.iter().next().unwrap().1.dtype(), DType::F32);
        let mut bigger = a.clone();
        bigger
            .insert("extra", random_tensor(&[1], 0, &Device::Cpu).unwrap())
            .unwrap();
        let err = ParamSet::load_like(&path, &bigger).unwrap_err().to_string();
        assert!(err.contains("`extra` is missing"), "{err}");
        std::fs::write(dir.join("bad.safetensors"), b"garbage").unwrap();
        let err = ParamSet::load(&dir.join("bad.safetensors"), &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("bad.safetensors") && err.contains("not a safetensors"),
            "{err}"
        );
        let err = ParamSet::load(&dir.join("absent.safetensors"), &Device::Cpu).unwrap_err();
        assert!(err.to_string().contains("absent.safetensors"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
