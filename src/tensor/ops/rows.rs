//! Parallel row and element loops for the fused ops' forward passes, computing in
//! f64 whatever the storage dtype, one row at a time in reusable scratch buffers.

use candle_core::{CpuStorage, Layout, Result};
use rayon::prelude::*;

/// Rows of a tensor smaller than this many elements in total run on one thread.
const PARALLEL_THRESHOLD: usize = 1 << 14;

fn rows_typed<T: Copy + Send + Sync>(
    input: &[T],
    width: usize,
    to: fn(T) -> f64,
    from: fn(f64) -> T,
    f: &(impl Fn(usize, &[f64], &mut [f64]) + Sync),
) -> Vec<T> {
    let mut out = vec![from(0.0); input.len()];
    let run = |scratch: &mut (Vec<f64>, Vec<f64>), (row, (dst, src)): (usize, (&mut [T], &[T]))| {
        let (x, y) = scratch;
        x.clear();
        x.extend(src.iter().map(|&v| to(v)));
        y.resize(width, 0.0);
        f(row, x, y);
        for (d, &v) in dst.iter_mut().zip(y.iter()) {
            *d = from(v);
        }
    };
    if input.len() < PARALLEL_THRESHOLD {
        let mut scratch = (Vec::with_capacity(width), Vec::with_capacity(width));
        for item in out.chunks_mut(width).zip(input.chunks(width)).enumerate() {
            run(&mut scratch, item);
        }
    } else {
        out.par_chunks_mut(width)
            .zip(input.par_chunks(width))
            .enumerate()
            .for_each_init(
                || (Vec::with_capacity(width), Vec::with_capacity(width)),
                run,
            );
    }
    out
}

/// Applies `f(row index, input row, output row)` to every row of `width` elements of
/// a contiguous float tensor, in parallel, in f64; the result has the input's dtype.
pub(crate) fn map_rows(
    storage: &CpuStorage,
    layout: &Layout,
    width: usize,
    f: impl Fn(usize, &[f64], &mut [f64]) + Sync,
) -> Result<CpuStorage> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("fused op: expects a contiguous input");
    };
    Ok(match storage {
        CpuStorage::F64(v) => CpuStorage::F64(rows_typed(&v[start..end], width, |x| x, |x| x, &f)),
        CpuStorage::F32(v) => CpuStorage::F32(rows_typed(
            &v[start..end],
            width,
            |x| x as f64,
            |x| x as f32,
            &f,
        )),
        CpuStorage::BF16(v) => CpuStorage::BF16(rows_typed(
            &v[start..end],
            width,
            |x| x.to_f64(),
            half::bf16::from_f64,
            &f,
        )),
        CpuStorage::F16(v) => CpuStorage::F16(rows_typed(
            &v[start..end],
            width,
            |x| x.to_f64(),
            half::f16::from_f64,
            &f,
        )),
        _ => candle_core::bail!("fused op: floating-point input expected"),
    })
}

/// Elements per parallel chunk of [`map_elements`]: long enough for SIMD loops and
/// to amortise a task, short enough to share between threads.
const ELEMENT_CHUNK: usize = 1 << 13;

/// `out[i] = f(to(input[i]))` converted back by `from`, in parallel chunks.
fn map_chunks<T: Copy + Send + Sync, U: Copy + Send + Sync>(
    input: &[T],
    to: impl Fn(T) -> U + Sync,
    from: impl Fn(U) -> T + Sync,
    f: &(impl Fn(U) -> U + Sync),
) -> Vec<T> {
    let run = |(dst, src): (&mut [T], &[T])| {
        for (d, &v) in dst.iter_mut().zip(src) {
            *d = from(f(to(v)));
        }
    };
    let mut out = input.to_vec();
    if input.len() < PARALLEL_THRESHOLD {
        run((&mut out, input));
    } else {
        out.par_chunks_mut(ELEMENT_CHUNK)
            .zip(input.par_chunks(ELEMENT_CHUNK))
            .for_each(run);
    }
    out
}

/// Applies a function to every element of a contiguous float tensor, in parallel:
/// `f64` to f64 tensors, `f32` to f32, bf16 and f16 ones (computed in f32, so that it
/// can be straight-line SIMD arithmetic; see `fast_math`).
pub(crate) fn map_elements(
    storage: &CpuStorage,
    layout: &Layout,
    f64: impl Fn(f64) -> f64 + Sync,
    f32: impl Fn(f32) -> f32 + Sync,
) -> Result<CpuStorage> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("fused op: expects a contiguous input");
    };
    Ok(match storage {
        CpuStorage::F64(v) => CpuStorage::F64(map_chunks(&v[start..end], |x| x, |x| x, &f64)),
        CpuStorage::F32(v) => CpuStorage::F32(map_chunks(&v[start..end], |x| x, |x| x, &f32)),
        CpuStorage::BF16(v) => CpuStorage::BF16(map_chunks(
            &v[start..end],
            half::bf16::to_f32,
            half::bf16::from_f32,
            &f32,
        )),
        CpuStorage::F16(v) => CpuStorage::F16(map_chunks(
            &v[start..end],
            half::f16::to_f32,
            half::f16::from_f32,
            &f32,
        )),
        _ => candle_core::bail!("fused op: floating-point input expected"),
    })
}

/// `out[i] = f(to(a[i]), to(b[i]))` converted back by `from`, in parallel chunks.
fn map_chunks2<T: Copy + Send + Sync, U: Copy + Send + Sync>(
    a: &[T],
    b: &[T],
    to: impl Fn(T) -> U + Sync,
    from: impl Fn(U) -> T + Sync,
    f: &(impl Fn(U, U) -> U + Sync),
) -> Vec<T> {
    let run = |(dst, (x, y)): (&mut [T], (&[T], &[T]))| {
        for ((d, &u), &v) in dst.iter_mut().zip(x).zip(y) {
            *d = from(f(to(u), to(v)));
        }
    };
    let mut out = a.to_vec();
    if a.len() < PARALLEL_THRESHOLD {
        run((&mut out, (a, b)));
    } else {
        out.par_chunks_mut(ELEMENT_CHUNK)
            .zip(a.par_chunks(ELEMENT_CHUNK).zip(b.par_chunks(ELEMENT_CHUNK)))
            .for_each(run);
    }
    out
}

/// [`map_elements`] of two contiguous tensors of the same dtype and size:
/// `out[i] = f(a[i], b[i])`.
pub(crate) fn map_elements2(
    (a, a_layout): (&CpuStorage, &Layout),
    (b, b_layout): (&CpuStorage, &Layout),
    f64: impl Fn(f64, f64) -> f64 + Sync,
    f32: impl Fn(f32, f32) -> f32 + Sync,
) -> Result<CpuStorage> {
    let (Some((a0, a1)), Some((b0, b1))) =
        (a_layout.contiguous_offsets(), b_layout.contiguous_offsets())
    else {
        candle_core::bail!("fused op: expects contiguous inputs");
    };
    if a1 - a0 != b1 - b0 {
        candle_core::bail!("fused op: inputs of {} and {} elements", a1 - a0, b1 - b0);
    }
    Ok(match (a, b) {
        (CpuStorage::F64(a), CpuStorage::F64(b)) => {
            CpuStorage::F64(map_chunks2(&a[a0..a1], &b[b0..b1], |x| x, |x| x, &f64))
        }
        (CpuStorage::F32(a), CpuStorage::F32(b)) => {
            CpuStorage::F32(map_chunks2(&a[a0..a1], &b[b0..b1], |x| x, |x| x, &f32))
        }
        (CpuStorage::BF16(a), CpuStorage::BF16(b)) => CpuStorage::BF16(map_chunks2(
            &a[a0..a1],
            &b[b0..b1],
            half::bf16::to_f32,
            half::bf16::from_f32,
            &f32,
        )),
        (CpuStorage::F16(a), CpuStorage::F16(b)) => CpuStorage::F16(map_chunks2(
            &a[a0..a1],
            &b[b0..b1],
            half::f16::to_f32,
            half::f16::from_f32,
            &f32,
        )),
        _ => candle_core::bail!("fused op: floating-point inputs of one dtype expected"),
    })
}

/// Contiguous float elements of any dtype, read as f64.
#[derive(Clone, Copy)]
enum Floats<'a> {
    F64(&'a [f64]),
    F32(&'a [f32]),
    BF16(&'a [half::bf16]),
    F16(&'a [half::f16]),
}

impl<'a> Floats<'a> {
    fn new(storage: &'a CpuStorage, layout: &Layout) -> Result<Self> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("fused op: expects a contiguous input");
        };
        Ok(match storage {
            CpuStorage::F64(v) => Floats::F64(&v[start..end]),
            CpuStorage::F32(v) => Floats::F32(&v[start..end]),
            CpuStorage::BF16(v) => Floats::BF16(&v[start..end]),
            CpuStorage::F16(v) => Floats::F16(&v[start..end]),
            _ => candle_core::bail!("fused op: floating-point input expected"),
        })
    }

    fn len(&self) -> usize {
        match self {
            Floats::F64(v) => v.len(),
            Floats::F32(v) => v.len(),
            Floats::BF16(v) => v.len(),
            Floats::F16(v) => v.len(),
        }
    }

    /// Elements `offset..offset + dst.len()` into `dst`.
    fn read(&self, offset: usize, dst: &mut [f64]) {
        let n = dst.len();
        match self {
            Floats::F64(v) => dst.copy_from_slice(&v[offset..offset + n]),
            Floats::F32(v) => dst
                .iter_mut()
                .zip(&v[offset..offset + n])
                .for_each(|(d, &s)| *d = s as f64),
            Floats::BF16(v) => dst
                .iter_mut()
                .zip(&v[offset..offset + n])
                .for_each(|(d, s)| *d = s.to_f64()),
            Floats::F16(v) => dst
                .iter_mut()
                .zip(&v[offset..offset + n])
                .for_each(|(d, s)| *d = s.to_f64()),
        }
    }
}

type RowFn<'f> = &'f (dyn Fn(usize, &[f64], &[f64], &mut [f64]) + Sync);

fn rows2_typed<T: Copy + Send + Sync>(
    a: Floats<'_>,
    b: Floats<'_>,
    width: usize,
    from: fn(f64) -> T,
    f: RowFn<'_>,
) -> Vec<T> {
    let mut out = vec![from(0.0); a.len()];
    let run = |scratch: &mut (Vec<f64>, Vec<f64>, Vec<f64>), (row, dst): (usize, &mut [T])| {
        let (x, y, z) = scratch;
        x.resize(width, 0.0);
        y.resize(width, 0.0);
        z.resize(width, 0.0);
        a.read(row * width, x);
        b.read(row * width, y);
        f(row, x, y, z);
        for (d, &v) in dst.iter_mut().zip(z.iter()) {
            *d = from(v);
        }
    };
    if out.len() < PARALLEL_THRESHOLD {
        let mut scratch = (Vec::new(), Vec::new(), Vec::new());
        for item in out.chunks_mut(width).enumerate() {
            run(&mut scratch, item);
        }
    } else {
        out.par_chunks_mut(width)
            .enumerate()
            .for_each_init(|| (Vec::new(), Vec::new(), Vec::new()), run);
    }
    out
}

/// Applies `f(row index, a row, b row, output row)` to every row of `width` elements of
/// two contiguous float tensors with the same number of elements (any float dtypes),
/// in parallel, in f64; the result has `a`'s dtype.
pub(crate) fn map_rows2(
    a: (&CpuStorage, &Layout),
    b: (&CpuStorage, &Layout),
    width: usize,
    f: impl Fn(usize, &[f64], &[f64], &mut [f64]) + Sync,
) -> Result<CpuStorage> {
    let (fa, fb) = (Floats::new(a.0, a.1)?, Floats::new(b.0, b.1)?);
    if fa.len() != fb.len() || width == 0 || fa.len() % width != 0 {
        candle_core::bail!(
            "fused op: inputs of {} and {} elements do not form rows of {width}",
            fa.len(),
            fb.len()
        );
    }
    Ok(match fa {
        Floats::F64(_) => CpuStorage::F64(rows2_typed(fa, fb, width, |x| x, &f)),
        Floats::F32(_) => CpuStorage::F32(rows2_typed(fa, fb, width, |x| x as f32, &f)),
        Floats::BF16(_) => CpuStorage::BF16(rows2_typed(fa, fb, width, half::bf16::from_f64, &f)),
        Floats::F16(_) => CpuStorage::F16(rows2_typed(fa, fb, width, half::f16::from_f64, &f)),
    })
}
