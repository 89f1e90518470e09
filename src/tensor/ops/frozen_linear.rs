//! The affine map of a frozen weight, `x·Wᵀ + b`, as one op whose backward returns
//! only the input's gradient `grad·W`: candle's matmul backward would also compute the
//! weight's gradient (one more GEMM and a weight-sized buffer per layer per backward)
//! for a weight nobody trains.
//!
//! The input gradient `grad·W` is the same op with the weight's roles swapped
//! ([`FrozenLinearOp::transposed`]), whose own backward swaps them back: derivatives of
//! every order are exact, and none computes a weight gradient.
//!
//! The weight may be stored in any float dtype or in int8 ([`Int8Matrix`]); the input
//! in f32, f64, bf16 or f16. When they differ (mixed precision, quantized base) the
//! weight is converted into a temporary buffer for this one call, the product is
//! accumulated in f32 (f64 for f64 inputs) and the result has the input's dtype:
//! nothing dense or wide outlives the call.

use std::borrow::Cow;
use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Storage, Tensor};
use half::{bf16, f16};

use super::quantized::Int8Matrix;

/// How the frozen weight is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stored {
    /// `[out, in]` (PyTorch `nn.Linear`).
    OutIn,
    /// `[in, out]` (GPT-2 `Conv1D`).
    InOut,
}

/// A frozen matrix: a dense tensor of any float dtype, or int8 with per-channel scales.
/// Cloning shares the data.
#[derive(Debug, Clone)]
pub(crate) enum FrozenMatrix {
    /// A dense tensor.
    Dense(Tensor),
    /// Int8 values with one scale per output channel.
    Int8(Arc<Int8Matrix>),
}

impl FrozenMatrix {
    /// `(rows, cols)` as stored.
    pub(crate) fn dims(&self) -> Result<(usize, usize)> {
        match self {
            FrozenMatrix::Dense(t) => t.dims2(),
            FrozenMatrix::Int8(q) => Ok(q.dims()),
        }
    }

    /// The dtype of the dense matrix (before quantization, for int8).
    pub(crate) fn dtype(&self) -> DType {
        match self {
            FrozenMatrix::Dense(t) => t.dtype(),
            FrozenMatrix::Int8(q) => q.dtype(),
        }
    }

    /// The matrix as a dense tensor (dequantized for int8, in its original dtype).
    pub(crate) fn to_dense(&self) -> Result<Tensor> {
        match self {
            FrozenMatrix::Dense(t) => Ok(t.clone()),
            FrozenMatrix::Int8(q) => q.to_tensor(q.dtype()),
        }
    }

    /// The device of the run the matrix belongs to (an int8 matrix's values live on
    /// the host, but it remembers where its dense original was).
    pub(crate) fn device(&self) -> candle_core::Device {
        match self {
            FrozenMatrix::Dense(t) => t.device().clone(),
            FrozenMatrix::Int8(q) => q.device().clone(),
        }
    }

    /// Bytes of the stored representation.
    pub(crate) fn nbytes(&self) -> usize {
        match self {
            FrozenMatrix::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            FrozenMatrix::Int8(q) => q.nbytes(),
        }
    }
}

/// The type products are accumulated in: f32, or f64 for f64 inputs.
trait Accumulator:
    'static + Copy + Send + Sync + num_traits::Zero + num_traits::One + std::ops::AddAssign
{
    const DTYPE: DType;
    fn borrow(storage: &CpuStorage) -> Option<&[Self]>;
    fn wrap(values: Vec<Self>) -> CpuStorage;
    fn from_f32(v: f32) -> Self;
    fn from_f64(v: f64) -> Self;
    fn to_f64(self) -> f64;
}

impl Accumulator for f32 {
    const DTYPE: DType = DType::F32;
    fn borrow(storage: &CpuStorage) -> Option<&[f32]> {
        match storage {
            CpuStorage::F32(v) => Some(v),
            _ => None,
        }
    }
    fn wrap(values: Vec<f32>) -> CpuStorage {
        CpuStorage::F32(values)
    }
    fn from_f32(v: f32) -> f32 {
        v
    }
    fn from_f64(v: f64) -> f32 {
        v as f32
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
}

impl Accumulator for f64 {
    const DTYPE: DType = DType::F64;
    fn borrow(storage: &CpuStorage) -> Option<&[f64]> {
        match storage {
            CpuStorage::F64(v) => Some(v),
            _ => None,
        }
    }
    fn wrap(values: Vec<f64>) -> CpuStorage {
        CpuStorage::F64(values)
    }
    fn from_f32(v: f32) -> f64 {
        v as f64
    }
    fn from_f64(v: f64) -> f64 {
        v
    }
    fn to_f64(self) -> f64 {
        self
    }
}

/// Elements `start..end` of `storage` as `T` (borrowed when already `T`).
fn cast<T: Accumulator>(storage: &CpuStorage, start: usize, end: usize) -> Result<Cow<'_, [T]>> {
    if let Some(v) = T::borrow(storage) {
        return Ok(Cow::Borrowed(&v[start..end]));
    }
    Ok(Cow::Owned(match storage {
        CpuStorage::F64(v) => v[start..end].iter().map(|&x| T::from_f64(x)).collect(),
        CpuStorage::F32(v) => v[start..end].iter().map(|&x| T::from_f32(x)).collect(),
        CpuStorage::BF16(v) => v[start..end]
            .iter()
            .map(|x| T::from_f32(x.to_f32()))
            .collect(),
        CpuStorage::F16(v) => v[start..end]
            .iter()
            .map(|x| T::from_f32(x.to_f32()))
            .collect(),
        _ => candle_core::bail!("frozen linear: floating-point tensors expected"),
    }))
}

/// `values` converted to `dtype`.
fn store<T: Accumulator>(values: Vec<T>, dtype: DType) -> Result<CpuStorage> {
    if dtype == T::DTYPE {
        return Ok(T::wrap(values));
    }
    let values = T::wrap(values);
    // An f32 accumulator rounds straight to half precision: the same values as
    // through f64 (widening f32 is exact), without the slower f64 conversions.
    if let CpuStorage::F32(v) = &values {
        match dtype {
            DType::BF16 => {
                return Ok(CpuStorage::BF16(
                    v.iter().map(|&x| bf16::from_f32(x)).collect(),
                ))
            }
            DType::F16 => {
                return Ok(CpuStorage::F16(
                    v.iter().map(|&x| f16::from_f32(x)).collect(),
                ))
            }
            _ => {}
        }
    }
    let values = T::borrow(&values).expect("wrapped as T");
    let it = values.iter().map(|&v| v.to_f64());
    Ok(match dtype {
        DType::F64 => CpuStorage::F64(it.collect()),
        DType::F32 => CpuStorage::F32(it.map(|v| v as f32).collect()),
        DType::BF16 => CpuStorage::BF16(it.map(bf16::from_f64).collect()),
        DType::F16 => CpuStorage::F16(it.map(f16::from_f64).collect()),
        other => candle_core::bail!("frozen linear: cannot produce {other:?}"),
    })
}

/// `x·Wᵀ + b` (or, [`transposed`](Self::transposed), `g·W`) for a frozen `W`.
#[derive(Clone)]
struct FrozenLinearOp {
    weight: FrozenMatrix,
    /// Added to the forward map only (the transposed map is a gradient).
    bias: Option<Tensor>,
    stored: Stored,
    n_in: usize,
    n_out: usize,
    /// `false`: `[.., in] → [.., out]`, `x·Wᵀ + b`. `true`: `[.., out] → [.., in]`,
    /// `g·W`, the input gradient of the other.
    transposed: bool,
}

/// `dst[rows × k_out] = x[rows × k_in] · R` with gemm on raw slices, `R[k, n]` at
/// `k·rhs_rs + n·rhs_cs` in `w`.
fn gemm_into<T: Accumulator>(
    x: &[T],
    w: &[T],
    rows: usize,
    (k_in, k_out): (usize, usize),
    (rhs_cs, rhs_rs): (usize, usize),
) -> Vec<T> {
    let mut dst = vec![T::zero(); rows * k_out];
    let threads = candle_core::utils::get_num_threads();
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // Timed as candle times its own products, for the benchmarks' share in GEMM.
    // SAFETY: dst is rows×k_out, x is rows×k_in contiguous, w holds k_in·k_out entries;
    // the strides address exactly those ranges.
    candle_core::utils::time_matmul(|| unsafe {
        gemm::gemm(
            rows,
            k_out,
            k_in,
            dst.as_mut_ptr(),
            1,
            k_out as isize,
            false,
            x.as_ptr(),
            1,
            k_in as isize,
            w.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            T::zero(),
            T::one(),
            false,
            false,
            false,
            parallelism,
        );
    });
    dst
}

fn add_bias<T: Copy + std::ops::AddAssign>(dst: &mut [T], bias: &[T]) {
    for row in dst.chunks_mut(bias.len()) {
        for (v, b) in row.iter_mut().zip(bias) {
            *v += *b;
        }
    }
}

/// Runs `f` on the contiguous elements of a CPU tensor.
fn with_storage<R>(
    t: &Tensor,
    f: impl FnOnce(&CpuStorage, usize, usize) -> Result<R>,
) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("frozen linear: the weight and bias must be contiguous");
    };
    match &*storage {
        Storage::Cpu(s) => f(s, start, end),
        _ => candle_core::bail!("frozen linear: CPU tensors only"),
    }
}

impl FrozenLinearOp {
    fn run<T: Accumulator>(
        &self,
        x: &CpuStorage,
        (start, end): (usize, usize),
        out_dtype: DType,
    ) -> Result<CpuStorage> {
        let (k_in, k_out) = if self.transposed {
            (self.n_out, self.n_in)
        } else {
            (self.n_in, self.n_out)
        };
        // R[k, n] of x·R in the stored weight: W[o, i] at o·in + i (OutIn) or
        // i·out + o (InOut), with (k, n) = (i, o) forward and (o, i) transposed.
        let strides = match (self.stored, self.transposed) {
            (Stored::OutIn, false) => (self.n_in, 1),
            (Stored::InOut, false) => (1, self.n_out),
            (Stored::OutIn, true) => (1, self.n_in),
            (Stored::InOut, true) => (self.n_out, 1),
        };
        let rows = (end - start) / k_in;
        let x = cast::<T>(x, start, end)?;
        let mut dst = match &self.weight {
            FrozenMatrix::Dense(w) => with_storage(w, |s, a, b| {
                Ok(gemm_into(
                    &x,
                    &cast::<T>(s, a, b)?,
                    rows,
                    (k_in, k_out),
                    strides,
                ))
            })?,
            FrozenMatrix::Int8(q) => {
                // One layer's dense copy, alive for this product only.
                let w = q.dequantize(T::from_f32);
                gemm_into(&x, &w, rows, (k_in, k_out), strides)
            }
        };
        if let (Some(bias), false) = (&self.bias, self.transposed) {
            with_storage(bias, |s, a, b| {
                add_bias(&mut dst, &cast::<T>(s, a, b)?);
                Ok(())
            })?;
        }
        store(dst, out_dtype)
    }
}

fn dtype_of(storage: &CpuStorage) -> DType {
    match storage {
        CpuStorage::BF16(_) => DType::BF16,
        CpuStorage::F16(_) => DType::F16,
        CpuStorage::F64(_) => DType::F64,
        _ => DType::F32,
    }
}

impl CustomOp1 for FrozenLinearOp {
    fn name(&self) -> &'static str {
        if self.transposed {
            "frozen-linear-transposed"
        } else {
            "frozen-linear"
        }
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let Some(range) = layout.contiguous_offsets() else {
            candle_core::bail!("frozen linear: expects a contiguous input");
        };
        let mut out_dims = layout.dims().to_vec();
        *out_dims.last_mut().expect("rank ≥ 1") = if self.transposed {
            self.n_in
        } else {
            self.n_out
        };
        let out = match storage {
            CpuStorage::F64(_) => self.run::<f64>(storage, range, DType::F64)?,
            CpuStorage::F32(_) | CpuStorage::BF16(_) | CpuStorage::F16(_) => {
                self.run::<f32>(storage, range, dtype_of(storage))?
            }
            _ => candle_core::bail!("frozen linear: floating-point input expected"),
        };
        Ok((out, Shape::from(out_dims)))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let swapped = FrozenLinearOp {
            bias: None,
            transposed: !self.transposed,
            ..self.clone()
        };
        Ok(Some(grad.contiguous()?.apply_op1(swapped)?))
    }
}

/// `x·Wᵀ + b` for a frozen `W` (never differentiated) stored as `stored`.
pub(crate) fn frozen_linear(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stored: Stored,
) -> Result<Tensor> {
    frozen_linear_matrix(x, &FrozenMatrix::Dense(weight.clone()), bias, stored)
}

impl FrozenLinearOp {
    /// The op of `weight` stored as `stored`: the forward map with `bias`, or
    /// (`transposed`) the input-gradient map.
    fn new(
        weight: &FrozenMatrix,
        bias: Option<&Tensor>,
        stored: Stored,
        transposed: bool,
    ) -> Result<Self> {
        let (rows_w, cols_w) = weight.dims()?;
        let (n_in, n_out) = match stored {
            Stored::OutIn => (cols_w, rows_w),
            Stored::InOut => (rows_w, cols_w),
        };
        if let Some(b) = bias {
            if b.dims() != [n_out] {
                candle_core::bail!("linear: bias {:?}, expected [{n_out}]", b.dims());
            }
        }
        let weight = match weight {
            FrozenMatrix::Dense(w) => FrozenMatrix::Dense(w.contiguous()?),
            int8 => int8.clone(),
        };
        Ok(Self {
            weight,
            bias: bias.map(Tensor::contiguous).transpose()?,
            stored,
            n_in,
            n_out,
            transposed,
        })
    }
}

/// `g·W`, the input gradient of [`frozen_linear_matrix`] for output gradient `g`
/// (differentiable: its backward is the forward map without bias).
pub(crate) fn frozen_linear_matrix_transposed(
    g: &Tensor,
    weight: &FrozenMatrix,
    stored: Stored,
) -> Result<Tensor> {
    if !super::composite::fused_kernels(g.device()) {
        return super::composite::frozen_linear(g, weight, None, stored, true);
    }
    let op = FrozenLinearOp::new(weight, None, stored, true)?;
    let last = g.dims().last().copied().unwrap_or(0);
    if last != op.n_out {
        candle_core::bail!(
            "linear: gradient has {last} features, the weight gives {}",
            op.n_out
        );
    }
    g.contiguous()?.apply_op1(op)
}

/// `x·Wᵀ + b` for a frozen matrix in any storage (dense or int8).
pub(crate) fn frozen_linear_matrix(
    x: &Tensor,
    weight: &FrozenMatrix,
    bias: Option<&Tensor>,
    stored: Stored,
) -> Result<Tensor> {
    if !super::composite::fused_kernels(x.device()) {
        return super::composite::frozen_linear(x, weight, bias, stored, false);
    }
    let op = FrozenLinearOp::new(weight, bias, stored, false)?;
    let last = x.dims().last().copied().unwrap_or(0);
    if last != op.n_in {
        candle_core::bail!(
            "linear: input has {last} features, the weight expects {}",
            op.n_in
        );
    }
    x.contiguous()?.apply_op1(op)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::gradcheck::{check_derivatives, random_tensor};
    use crate::tensor::test_support::max_abs_diff;
    use candle_core::Device;

    /// Every storage and input dtype against the f64 product with the dequantized
    /// weight, forward and input gradient, both layouts.
    #[test]
    fn mixed_dtypes_and_int8_match_the_f64_product() {
        let dev = Device::Cpu;
        let x = random_tensor(&[2, 3, 8], 1, &dev).unwrap();
        let g = random_tensor(&[2, 3, 5], 4, &dev).unwrap();
        let b = random_tensor(&[5], 3, &dev).unwrap();
        for stored in [Stored::OutIn, Stored::InOut] {
            let shape = match stored {
                Stored::OutIn => [5, 8],
                Stored::InOut => [8, 5],
            };
            let w = random_tensor(&shape, 2, &dev).unwrap();
            let int8 = FrozenMatrix::Int8(Arc::new(Int8Matrix::quantize(&w, stored).unwrap()));
            for (matrix, label) in [(FrozenMatrix::Dense(w.clone()), "dense"), (int8, "int8")] {
                let w64 = matrix.to_dense().unwrap().to_dtype(DType::F64).unwrap();
                let w_out_in = match stored {
                    Stored::OutIn => w64.clone(),
                    Stored::InOut => w64.t().unwrap(),
                };
                let expect = x
                    .broadcast_matmul(&w_out_in.t().unwrap())
                    .unwrap()
                    .broadcast_add(&b)
                    .unwrap();
                let expect_grad = g.broadcast_matmul(&w_out_in).unwrap();
                for (x_dtype, w_dtype, tolerance) in [
                    (DType::F64, DType::F64, 1e-12),
                    (DType::F32, DType::F32, 1e-5),
                    (DType::F32, DType::BF16, 3e-2),
                    (DType::BF16, DType::BF16, 6e-2),
                    (DType::F16, DType::F16, 1e-2),
                ] {
                    let matrix = match &matrix {
                        FrozenMatrix::Dense(w) => FrozenMatrix::Dense(w.to_dtype(w_dtype).unwrap()),
                        q => q.clone(),
                    };
                    let xv = candle_core::Var::from_tensor(&x.to_dtype(x_dtype).unwrap()).unwrap();
                    let bias = b.to_dtype(x_dtype).unwrap();
                    let y = frozen_linear_matrix(&xv, &matrix, Some(&bias), stored).unwrap();
                    assert_eq!(y.dtype(), x_dtype);
                    let err = max_abs_diff(&y, &expect);
                    assert!(
                        err < tolerance * 4.0,
                        "{label} {stored:?} {x_dtype:?}/{w_dtype:?}: {err}"
                    );
                    let grads = (y * g.to_dtype(x_dtype).unwrap())
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .backward()
                        .unwrap();
                    let gx = grads.get(&xv).unwrap();
                    assert_eq!(gx.dtype(), x_dtype);
                    let err = max_abs_diff(gx, &expect_grad);
                    assert!(
                        err < tolerance * 4.0,
                        "{label} {stored:?} grad {x_dtype:?}: {err}"
                    );
                }
            }
        }
    }

    /// The int8 map is linear in x with the dequantized weight, to every order.
    #[test]
    fn int8_derivatives_match_finite_differences() {
        let dev = Device::Cpu;
        for stored in [Stored::OutIn, Stored::InOut] {
            let shape = match stored {
                Stored::OutIn => [3, 4],
                Stored::InOut => [4, 3],
            };
            let q = FrozenMatrix::Int8(Arc::new(
                Int8Matrix::quantize(&random_tensor(&shape, 5, &dev).unwrap(), stored).unwrap(),
            ));
            let bias = random_tensor(&[3], 6, &dev).unwrap();
            let errors = check_derivatives(&[random_tensor(&[2, 4], 7, &dev).unwrap()], |t| {
                frozen_linear_matrix(&t[0], &q, Some(&bias), stored)
            })
            .unwrap();
            assert!(
                errors.first_order < 1e-6 && errors.second_order < 1e-4,
                "{stored:?}: {errors:?}"
            );
        }
    }
}
