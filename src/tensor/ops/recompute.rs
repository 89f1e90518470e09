//! Selective recomputation: a parameter-free block of the frozen base (an attention
//! core, a feed-forward block without adapters) as one op that keeps only its inputs
//! for the backward pass and rebuilds its internals there.
//!
//! candle keeps every intermediate of a graph alive until the backward pass: for a
//! transformer layer that is the head-split copies, the attention scores and
//! probabilities and the feed-forward intermediate and its activation, most of a
//! layer's activations. A [`Recomputed`] block runs its forward on detached copies of
//! its inputs (no graph; everything it allocates is freed before it returns), and
//! its backward evaluates the block's vector-Jacobian product, written by the caller
//! with differentiable tensor ops on the op's inputs and the incoming gradient. That
//! product is a graph again whenever the backward keeps its graph, so second
//! derivatives (MAML, Hessian-vector products) stay exact.
//!
//! The cost is the block's forward once more in the backward pass; the saving is every
//! intermediate of the block for as long as the graph lives (across all K inner
//! steps in full-graph MAML).

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Device, Layout, Result, Shape, Tensor};
use half::{bf16, f16};

/// A block's forward on its inputs (detached copies: no graph is recorded).
pub(crate) type BlockForward = dyn Fn(&[Tensor]) -> Result<Tensor> + Send + Sync;

/// A block's vector-Jacobian product: for inputs `x` and output gradient `g`, the
/// gradient of `⟨f(x), g⟩` with respect to each input, written with differentiable ops.
pub(crate) type BlockVjp = dyn Fn(&[Tensor], &Tensor) -> Result<Vec<Tensor>> + Send + Sync;

/// A block recomputed in the backward pass.
#[derive(Clone)]
pub(crate) struct Recomputed {
    name: &'static str,
    forward: Arc<BlockForward>,
    vjp: Arc<BlockVjp>,
}

impl Recomputed {
    /// The block `name` with its forward and vector-Jacobian product.
    pub(crate) fn new(name: &'static str, forward: Arc<BlockForward>, vjp: Arc<BlockVjp>) -> Self {
        Self { name, forward, vjp }
    }

    /// The block on one input; the graph keeps `x` and the output only.
    pub(crate) fn apply1(&self, x: &Tensor) -> Result<Tensor> {
        x.contiguous()?.apply_op1(self.clone())
    }

    /// The block on three inputs; the graph keeps them and the output only.
    pub(crate) fn apply3(&self, a: &Tensor, b: &Tensor, c: &Tensor) -> Result<Tensor> {
        a.contiguous()?
            .apply_op3(&b.contiguous()?, &c.contiguous()?, self.clone())
    }

    fn run(&self, inputs: &[Tensor]) -> Result<(CpuStorage, Shape)> {
        let out = (self.forward)(inputs)?;
        let shape = out.shape().clone();
        Ok((storage_of(&out)?, shape))
    }

    fn gradients(&self, inputs: &[Tensor], grad: &Tensor) -> Result<Vec<Tensor>> {
        let grads = (self.vjp)(inputs, grad)?;
        if grads.len() != inputs.len() {
            candle_core::bail!(
                "{}: the vector-Jacobian product gave {} gradients for {} inputs",
                self.name,
                grads.len(),
                inputs.len()
            );
        }
        Ok(grads)
    }
}

/// A detached CPU tensor holding the contiguous elements `layout` addresses.
fn tensor_of(storage: &CpuStorage, layout: &Layout) -> Result<Tensor> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("recomputed block: expects contiguous inputs");
    };
    let (shape, cpu) = (layout.shape(), &Device::Cpu);
    match storage {
        CpuStorage::F64(v) => Tensor::from_slice(&v[start..end], shape, cpu),
        CpuStorage::F32(v) => Tensor::from_slice(&v[start..end], shape, cpu),
        CpuStorage::BF16(v) => Tensor::from_slice(&v[start..end], shape, cpu),
        CpuStorage::F16(v) => Tensor::from_slice(&v[start..end], shape, cpu),
        _ => candle_core::bail!("recomputed block: floating-point inputs expected"),
    }
}

/// The elements of `t` as a CPU storage of its dtype.
fn storage_of(t: &Tensor) -> Result<CpuStorage> {
    let flat = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::F64 => CpuStorage::F64(flat.to_vec1::<f64>()?),
        DType::F32 => CpuStorage::F32(flat.to_vec1::<f32>()?),
        DType::BF16 => CpuStorage::BF16(flat.to_vec1::<bf16>()?),
        DType::F16 => CpuStorage::F16(flat.to_vec1::<f16>()?),
        other => candle_core::bail!("recomputed block: cannot produce {other:?}"),
    })
}

/// The block's forward on the GPU: candle hands a custom op raw device buffers, so
/// the inputs are copied into detached tensors, the forward runs on them with
/// candle's CUDA ops, and its output is copied back into a buffer.
#[cfg(feature = "cuda")]
mod on_cuda {
    use candle_core::backend::{BackendDevice, BackendStorage};
    use candle_core::op::BackpropOp;
    use candle_core::{CudaStorage, Layout, Result, Shape, Storage, Tensor};

    /// A contiguous copy of the elements `layout` addresses.
    fn contiguous_copy(storage: &CudaStorage, layout: &Layout) -> Result<CudaStorage> {
        let mut copy = storage
            .device()
            .zeros_impl(layout.shape(), storage.dtype())?;
        storage.copy_strided_src(&mut copy, 0, layout)?;
        Ok(copy)
    }

    /// A detached tensor holding the elements `layout` addresses.
    pub(super) fn tensor_of(storage: &CudaStorage, layout: &Layout) -> Result<Tensor> {
        let copy = contiguous_copy(storage, layout)?;
        Ok(Tensor::from_storage(
            Storage::Cuda(copy),
            layout.shape().clone(),
            BackpropOp::none(),
            false,
        ))
    }

    /// `forward`'s output as a contiguous device buffer and its shape.
    pub(super) fn run(
        forward: &super::BlockForward,
        inputs: &[Tensor],
    ) -> Result<(CudaStorage, Shape)> {
        let out = forward(inputs)?;
        let (storage, layout) = out.storage_and_layout();
        match &*storage {
            Storage::Cuda(s) => Ok((contiguous_copy(s, layout)?, layout.shape().clone())),
            _ => candle_core::bail!("recomputed block: the forward left the CUDA device"),
        }
    }
}

impl CustomOp1 for Recomputed {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        self.run(&[tensor_of(storage, layout)?])
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        on_cuda::run(&*self.forward, &[on_cuda::tensor_of(storage, layout)?])
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let mut grads = self.gradients(std::slice::from_ref(arg), grad)?;
        Ok(grads.pop())
    }
}

impl CustomOp3 for Recomputed {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.run(&[tensor_of(s1, l1)?, tensor_of(s2, l2)?, tensor_of(s3, l3)?])
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let inputs = [
            on_cuda::tensor_of(s1, l1)?,
            on_cuda::tensor_of(s2, l2)?,
            on_cuda::tensor_of(s3, l3)?,
        ];
        on_cuda::run(&*self.forward, &inputs)
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let inputs = [a.clone(), b.clone(), c.clone()];
        let mut grads = self.gradients(&inputs, grad)?.into_iter();
        Ok((grads.next(), grads.next(), grads.next()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::gradcheck::{check_derivatives, random_tensor};
    use crate::tensor::ops::gelu_erf;
    use crate::tensor::test_support::max_abs_diff;

    /// `f(x, y, z) = gelu(x)·y + z²`, with its hand-written product.
    fn block() -> Recomputed {
        Recomputed::new(
            "test-block",
            Arc::new(|x: &[Tensor]| (gelu_erf(&x[0])? * &x[1])? + x[2].sqr()?),
            Arc::new(|x: &[Tensor], g: &Tensor| {
                let d_gelu = crate::tensor::ops::pointwise_derivative(
                    &x[0],
                    crate::tensor::ops::Pointwise::GeluErf,
                )?;
                Ok(vec![
                    ((g * &x[1])? * d_gelu)?,
                    (g * gelu_erf(&x[0])?)?,
                    ((g * &x[2])? * 2.0)?,
                ])
            }),
        )
    }

    /// Values equal the plain composite; first derivatives and Hessian-vector
    /// products (through the product's own backward) match finite differences.
    #[test]
    fn recomputed_block_has_exact_first_and_second_derivatives() {
        let cpu = Device::Cpu;
        let inputs: Vec<Tensor> = (0..3)
            .map(|i| random_tensor(&[3, 4], 10 + i, &cpu).unwrap())
            .collect();
        let b = block();
        let fused = b.apply3(&inputs[0], &inputs[1], &inputs[2]).unwrap();
        let plain = (b.forward)(&inputs).unwrap();
        assert!(max_abs_diff(&fused, &plain) < 1e-15);
        let errors = check_derivatives(&inputs, |x| b.apply3(&x[0], &x[1], &x[2])).unwrap();
        assert!(errors.first_order < 1e-6, "{errors:?}");
        assert!(errors.second_order < 1e-4, "{errors:?}");

        let single = Recomputed::new(
            "test-gelu",
            Arc::new(|x: &[Tensor]| gelu_erf(&x[0])),
            Arc::new(|x: &[Tensor], g: &Tensor| {
                let d = crate::tensor::ops::pointwise_derivative(
                    &x[0],
                    crate::tensor::ops::Pointwise::GeluErf,
                )?;
                Ok(vec![(g * d)?])
            }),
        );
        let errors = check_derivatives(&inputs[..1], |x| single.apply1(&x[0])).unwrap();
        assert!(errors.first_order < 1e-6, "{errors:?}");
        assert!(errors.second_order < 1e-4, "{errors:?}");
    }
}
