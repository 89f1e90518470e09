//! Frozen matrices stored in int8 with one f32 scale per output channel (absmax/127),
//! dequantized one layer at a time where they are used (QLoRA-style storage of the
//! frozen base; the trainable tensors stay in full precision).
//!
//! candle has no int8 dtype, so the values live in a plain `Vec<i8>` that the ops own
//! (a custom op can hold arbitrary Rust data); nothing dense outlives one call.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use half::{bf16, f16};

use super::frozen_linear::Stored;

/// A frozen matrix in int8, per-output-channel absmax scaling: `W ≈ q·scale[channel]`
/// with `q ∈ [−127, 127]` and `scale = max |W[channel, ·]| / 127`, so each channel's
/// largest entry is exact and the rounding error is at most `scale / 2` per entry.
#[derive(Debug)]
pub(crate) struct Int8Matrix {
    /// The values in the dense matrix's own layout (row-major `dims`).
    values: Vec<i8>,
    /// One scale per output channel.
    scales: Vec<f32>,
    /// `(rows, cols)` of the stored matrix.
    dims: (usize, usize),
    /// Which axis indexes the output channels: rows for `OutIn` (`nn.Linear`, embedding
    /// tables), columns for `InOut` (GPT-2's `Conv1D`).
    stored: Stored,
    /// The dtype of the dense matrix, which dequantization returns by default.
    dtype: DType,
    /// The device of the dense matrix (of the run), where the adapters beside it
    /// are made; the int8 values themselves are on the host.
    device: candle_core::Device,
}

impl Int8Matrix {
    /// Quantizes the 2-D `weight` whose output channels are its rows (`OutIn`) or
    /// columns (`InOut`).
    pub(crate) fn quantize(weight: &Tensor, stored: Stored) -> Result<Self> {
        let (rows, cols) = weight.dims2()?;
        let dense = weight
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()?;
        let channels = match stored {
            Stored::OutIn => rows,
            Stored::InOut => cols,
        };
        let channel = |r: usize, c: usize| match stored {
            Stored::OutIn => r,
            Stored::InOut => c,
        };
        if let Some(bad) = dense.iter().find(|v| !v.is_finite()) {
            candle_core::bail!("int8 quantization: the weight holds a non-finite value ({bad})");
        }
        let mut absmax = vec![0f64; channels];
        for r in 0..rows {
            for c in 0..cols {
                let m = &mut absmax[channel(r, c)];
                *m = m.max(dense[r * cols + c].abs());
            }
        }
        let scales: Vec<f32> = absmax.iter().map(|&m| (m / 127.0) as f32).collect();
        let mut values = vec![0i8; rows * cols];
        for r in 0..rows {
            for c in 0..cols {
                let scale = scales[channel(r, c)] as f64;
                if scale > 0.0 {
                    let q = (dense[r * cols + c] / scale).round().clamp(-127.0, 127.0);
                    values[r * cols + c] = q as i8;
                }
            }
        }
        Ok(Self {
            values,
            scales,
            dims: (rows, cols),
            stored,
            dtype: weight.dtype(),
            device: weight.device().clone(),
        })
    }

    /// `(rows, cols)` of the stored matrix.
    pub(crate) fn dims(&self) -> (usize, usize) {
        self.dims
    }

    /// The device of the matrix before quantization.
    pub(crate) fn device(&self) -> &candle_core::Device {
        &self.device
    }

    /// The dtype of the matrix before quantization.
    pub(crate) fn dtype(&self) -> DType {
        self.dtype
    }

    /// Bytes held: one per value and four per scale.
    pub(crate) fn nbytes(&self) -> usize {
        self.values.len() + 4 * self.scales.len()
    }

    /// The dequantized matrix as a row-major buffer of `T`.
    pub(crate) fn dequantize<T>(&self, from: impl Fn(f32) -> T) -> Vec<T> {
        let cols = self.dims.1;
        self.values
            .iter()
            .enumerate()
            .map(|(i, &q)| {
                let scale = match self.stored {
                    Stored::OutIn => self.scales[i / cols],
                    Stored::InOut => self.scales[i % cols],
                };
                from(q as f32 * scale)
            })
            .collect()
    }

    /// The dequantized matrix as a tensor of `dtype`.
    pub(crate) fn to_tensor(&self, dtype: DType) -> Result<Tensor> {
        Tensor::from_vec(self.dequantize(|v| v), self.dims, &candle_core::Device::Cpu)?
            .to_dtype(dtype)
    }

    /// Row `row` dequantized (for tables whose channels are rows).
    fn row(&self, row: usize) -> impl Iterator<Item = f32> + '_ {
        let cols = self.dims.1;
        let scale = self.scales[row];
        self.values[row * cols..(row + 1) * cols]
            .iter()
            .map(move |&q| q as f32 * scale)
    }
}

/// Rows of an int8 table at integer ids, dequantized to `dtype`. The table is frozen
/// and ids carry no gradient, so the op has no backward.
struct Int8LookupOp {
    table: Arc<Int8Matrix>,
    dtype: DType,
}

fn ids_of(storage: &CpuStorage, layout: &Layout) -> Result<Vec<usize>> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("int8 embedding: expects contiguous ids");
    };
    Ok(match storage {
        CpuStorage::U32(v) => v[start..end].iter().map(|&i| i as usize).collect(),
        CpuStorage::U8(v) => v[start..end].iter().map(|&i| i as usize).collect(),
        CpuStorage::I64(v) => v[start..end]
            .iter()
            .map(|&i| usize::try_from(i).unwrap_or(usize::MAX))
            .collect(),
        _ => candle_core::bail!("int8 embedding: integer ids expected"),
    })
}

impl CustomOp1 for Int8LookupOp {
    fn name(&self) -> &'static str {
        "int8-embedding"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let ids = ids_of(storage, layout)?;
        let (vocab, dim) = self.table.dims;
        if let Some(&bad) = ids.iter().find(|&&id| id >= vocab) {
            candle_core::bail!("token id {bad} is outside the embedding table of {vocab} rows");
        }
        fn gather<T>(table: &Int8Matrix, ids: &[usize], from: impl Fn(f32) -> T) -> Vec<T> {
            ids.iter()
                .flat_map(|&id| table.row(id).map(&from).collect::<Vec<_>>())
                .collect()
        }
        let out = match self.dtype {
            DType::F32 => CpuStorage::F32(gather(&self.table, &ids, |v| v)),
            DType::F64 => CpuStorage::F64(gather(&self.table, &ids, f64::from)),
            DType::BF16 => CpuStorage::BF16(gather(&self.table, &ids, bf16::from_f32)),
            DType::F16 => CpuStorage::F16(gather(&self.table, &ids, f16::from_f32)),
            other => candle_core::bail!("int8 embedding: cannot produce {other:?} rows"),
        };
        let mut dims = layout.dims().to_vec();
        dims.push(dim);
        Ok((out, Shape::from(dims)))
    }
}

/// Rows of the int8 `table` at `ids` (any shape), dequantized to `dtype`: the result
/// has shape `ids.shape() + [dim]`.
pub(crate) fn int8_embedding(
    ids: &Tensor,
    table: &Arc<Int8Matrix>,
    dtype: DType,
) -> Result<Tensor> {
    if table.stored != Stored::OutIn {
        candle_core::bail!("int8 embedding: the table must be quantized per row");
    }
    if !super::composite::fused_kernels(ids.device()) {
        return super::composite::int8_embedding(ids, table, dtype);
    }
    ids.contiguous()?.apply_op1(Int8LookupOp {
        table: table.clone(),
        dtype,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::gradcheck::random_tensor;
    use crate::tensor::test_support::max_abs_diff;
    use candle_core::Device;

    #[test]
    fn quantization_error_is_at_most_half_a_step_per_channel() {
        for stored in [Stored::OutIn, Stored::InOut] {
            let w = (random_tensor(&[7, 5], 3, &Device::Cpu).unwrap() * 0.1).unwrap();
            let q = Int8Matrix::quantize(&w, stored).unwrap();
            assert_eq!(
                q.nbytes(),
                35 + 4 * if stored == Stored::OutIn { 7 } else { 5 }
            );
            let dense = w.to_vec2::<f64>().unwrap();
            let back = q.to_tensor(DType::F64).unwrap().to_vec2::<f64>().unwrap();
            for r in 0..7 {
                for c in 0..5 {
                    let (channel, others): (usize, Vec<f64>) = match stored {
                        Stored::OutIn => (r, dense[r].clone()),
                        Stored::InOut => (c, dense.iter().map(|row| row[c]).collect()),
                    };
                    let absmax = others.iter().fold(0f64, |m, v| m.max(v.abs()));
                    let step = q.scales[channel] as f64;
                    assert!((step - absmax / 127.0).abs() < 1e-9);
                    // Half a step, plus the f32 rounding of the scale.
                    assert!(
                        (back[r][c] - dense[r][c]).abs() <= 0.5 * step + 1e-7 * absmax,
                        "{stored:?} ({r},{c}): {} vs {}",
                        back[r][c],
                        dense[r][c]
                    );
                }
            }
        }
    }

    #[test]
    fn zero_channels_and_non_finite_weights() {
        // A zero channel stays zero (no division by a zero scale); each channel's
        // absmax entry is exact.
        let w = Tensor::new(&[[0.0f64, 0.0], [0.25, -1.0]], &Device::Cpu).unwrap();
        let q = Int8Matrix::quantize(&w, Stored::OutIn).unwrap();
        let back = q.to_tensor(DType::F64).unwrap().to_vec2::<f64>().unwrap();
        assert_eq!((back[0].clone(), back[1][1]), (vec![0.0, 0.0], -1.0));
        let bad = Tensor::new(&[[f64::NAN, 1.0]], &Device::Cpu).unwrap();
        let err = Int8Matrix::quantize(&bad, Stored::OutIn)
            .unwrap_err()
            .to_string();
        assert!(err.contains("non-finite"), "{err}");
    }

    #[test]
    fn lookup_returns_dequantized_rows_in_the_requested_dtype() {
        let table = random_tensor(&[6, 4], 9, &Device::Cpu).unwrap();
        let q = Arc::new(Int8Matrix::quantize(&table, Stored::OutIn).unwrap());
        let reference = q.to_tensor(DType::F64).unwrap();
        let ids = Tensor::new(&[[5u32, 0, 2], [1, 1, 3]], &Device::Cpu).unwrap();
        let expected = reference
            .index_select(&ids.flatten_all().unwrap(), 0)
            .unwrap()
            .reshape((2, 3, 4))
            .unwrap();
        for dtype in [DType::F64, DType::F32, DType::BF16, DType::F16] {
            let rows = int8_embedding(&ids, &q, dtype).unwrap();
            assert_eq!((rows.dims(), rows.dtype()), (&[2usize, 3, 4][..], dtype));
            let diff = max_abs_diff(&rows, &expected);
            let tolerance = match dtype {
                DType::F64 | DType::F32 => 1e-6,
                _ => 2e-2,
            };
            assert!(diff < tolerance, "{dtype:?}: {diff}");
        }
        let err = int8_embedding(&Tensor::new(&[6u32], &Device::Cpu).unwrap(), &q, DType::F32)
            .unwrap_err()
            .to_string();
        assert!(err.contains("token id 6"), "{err}");
    }
}
