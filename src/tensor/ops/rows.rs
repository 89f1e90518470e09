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

/// Applies `f` to every element of a contiguous float tensor, in parallel, in f64.
pub(crate) fn map_elements(
    storage: &CpuStorage,
    layout: &Layout,
    f: impl Fn(f64) -> f64 + Sync,
) -> Result<CpuStorage> {
    fn typed<T: Copy + Send + Sync>(
        input: &[T],
        to: fn(T) -> f64,
        from: fn(f64) -> T,
        f: &(impl Fn(f64) -> f64 + Sync),
    ) -> Vec<T> {
        if input.len() < PARALLEL_THRESHOLD {
            input.iter().map(|&v| from(f(to(v)))).collect()
        } else {
            input.par_iter().map(|&v| from(f(to(v)))).collect()
        }
    }
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("fused op: expects a contiguous input");
    };
    Ok(match storage {
        CpuStorage::F64(v) => CpuStorage::F64(typed(&v[start..end], |x| x, |x| x, &f)),
        CpuStorage::F32(v) => {
            CpuStorage::F32(typed(&v[start..end], |x| x as f64, |x| x as f32, &f))
        }
        CpuStorage::BF16(v) => CpuStorage::BF16(typed(
            &v[start..end],
            |x| x.to_f64(),
            half::bf16::from_f64,
            &f,
        )),
        CpuStorage::F16(v) => CpuStorage::F16(typed(
            &v[start..end],
            |x| x.to_f64(),
            half::f16::from_f64,
            &f,
        )),
        _ => candle_core::bail!("fused op: floating-point input expected"),
    })
}
