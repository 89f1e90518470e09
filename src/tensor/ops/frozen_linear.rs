//! The affine map of a frozen weight, `x·Wᵀ + b`, as one op whose backward returns
//! only the input's gradient `grad·W`: candle's matmul backward would also compute the
//! weight's gradient (one more GEMM and a weight-sized buffer per layer per backward)
//! for a weight nobody trains. The input gradient is a tensor matmul with the constant
//! `W`, so it stays differentiable for second order.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Storage, Tensor};

/// How the frozen weight is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stored {
    /// `[out, in]` (PyTorch `nn.Linear`).
    OutIn,
    /// `[in, out]` (GPT-2 `Conv1D`).
    InOut,
}

struct FrozenLinearOp {
    weight: Tensor,
    bias: Option<Tensor>,
    stored: Stored,
    n_in: usize,
    n_out: usize,
}

/// `dst[rows × n_out] = x[rows × n_in] · Wᵀ` with gemm on raw slices, W in `stored` layout.
fn gemm_into<T: 'static + Copy + num_traits::Zero + num_traits::One>(
    x: &[T],
    w: &[T],
    rows: usize,
    n_in: usize,
    n_out: usize,
    stored: Stored,
) -> Vec<T> {
    let mut dst = vec![T::zero(); rows * n_out];
    // rhs element (k, n) = W[n, k] (OutIn: n·in + k) or W[k, n] (InOut: k·out + n).
    let (rhs_cs, rhs_rs) = match stored {
        Stored::OutIn => (n_in as isize, 1isize),
        Stored::InOut => (1isize, n_out as isize),
    };
    let threads = candle_core::utils::get_num_threads();
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: dst is rows×n_out, x is rows×n_in contiguous, w holds n_in·n_out entries;
    // the strides above address exactly those ranges.
    unsafe {
        gemm::gemm(
            rows,
            n_out,
            n_in,
            dst.as_mut_ptr(),
            1,
            n_out as isize,
            false,
            x.as_ptr(),
            1,
            n_in as isize,
            w.as_ptr(),
            rhs_cs,
            rhs_rs,
            T::zero(),
            T::one(),
            false,
            false,
            false,
            parallelism,
        );
    }
    dst
}

fn add_bias<T: Copy + std::ops::AddAssign>(dst: &mut [T], bias: &[T]) {
    for row in dst.chunks_mut(bias.len()) {
        for (v, b) in row.iter_mut().zip(bias) {
            *v += *b;
        }
    }
}

impl CustomOp1 for FrozenLinearOp {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("frozen linear: expects a contiguous input");
        };
        let rows = (end - start) / self.n_in;
        let mut out_dims = layout.dims().to_vec();
        *out_dims.last_mut().expect("rank ≥ 1") = self.n_out;
        let (w_storage, w_layout) = self.weight.storage_and_layout();
        let (w_start, w_end) = w_layout
            .contiguous_offsets()
            .expect("weight made contiguous");
        let bias_guard = self.bias.as_ref().map(|b| b.storage_and_layout());
        let out = match (storage, &*w_storage) {
            (CpuStorage::F32(x), Storage::Cpu(CpuStorage::F32(w))) => {
                let mut dst = gemm_into(
                    &x[start..end],
                    &w[w_start..w_end],
                    rows,
                    self.n_in,
                    self.n_out,
                    self.stored,
                );
                if let Some((b, l)) = &bias_guard {
                    if let Storage::Cpu(CpuStorage::F32(b)) = &**b {
                        let (s, e) = l.contiguous_offsets().expect("bias made contiguous");
                        add_bias(&mut dst, &b[s..e]);
                    }
                }
                CpuStorage::F32(dst)
            }
            (CpuStorage::F64(x), Storage::Cpu(CpuStorage::F64(w))) => {
                let mut dst = gemm_into(
                    &x[start..end],
                    &w[w_start..w_end],
                    rows,
                    self.n_in,
                    self.n_out,
                    self.stored,
                );
                if let Some((b, l)) = &bias_guard {
                    if let Storage::Cpu(CpuStorage::F64(b)) = &**b {
                        let (s, e) = l.contiguous_offsets().expect("bias made contiguous");
                        add_bias(&mut dst, &b[s..e]);
                    }
                }
                CpuStorage::F64(dst)
            }
            _ => candle_core::bail!("frozen linear: f32/f64 only on this path"),
        };
        Ok((out, Shape::from(out_dims)))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let w_out_in = match self.stored {
            Stored::OutIn => self.weight.clone(),
            Stored::InOut => self.weight.t()?,
        };
        Ok(Some(grad.broadcast_matmul(&w_out_in)?))
    }
}

/// `x·Wᵀ + b` for a frozen `W` (never differentiated) stored as `stored`.
pub(crate) fn frozen_linear(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stored: Stored,
) -> Result<Tensor> {
    let (rows_w, cols_w) = weight.dims2()?;
    let (n_in, n_out) = match stored {
        Stored::OutIn => (cols_w, rows_w),
        Stored::InOut => (rows_w, cols_w),
    };
    let last = x.dims().last().copied().unwrap_or(0);
    if last != n_in {
        candle_core::bail!("linear: input has {last} features, the weight expects {n_in}");
    }
    let same_dtype = weight.dtype() == x.dtype() && bias.is_none_or(|b| b.dtype() == x.dtype());
    if !matches!(x.dtype(), candle_core::DType::F32 | candle_core::DType::F64) || !same_dtype {
        // Half precision: candle's matmul; the weight is not a variable, so nothing flows to it.
        let w = match stored {
            Stored::OutIn => weight.t()?,
            Stored::InOut => weight.clone(),
        };
        let y = x.broadcast_matmul(&w)?;
        return match bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        };
    }
    let op = FrozenLinearOp {
        weight: weight.contiguous()?,
        bias: bias.map(Tensor::contiguous).transpose()?,
        stored,
        n_in,
        n_out,
    };
    x.contiguous()?.apply_op1(op)
}
