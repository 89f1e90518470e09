//! Moving hidden-state rows into attention's head layout and back, as one op each.
//!
//! Attention works on `[b, h, t, d]` (queries, values, results) and `[b, h, d, t]`
//! (keys, transposed for `q·kᵀ`), while every other part of a layer holds one row of
//! `h·d` features per token, and with packing only the real tokens' rows. Written
//! with candle's primitives each direction is a row selection and a transposed copy
//! (two tensors), and their backward passes a zero-filled `index_add` and another
//! copy: a graph that is differentiated again (full-graph MAML keeps one per inner
//! step) holds all of them. [`HeadLayout::split`] and [`HeadLayout::merge`] make one
//! tensor each. They are linear and adjoint to each other, so each one's backward is
//! the other and their derivatives are exact at every order.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use half::{bf16, f16};

/// Marks a padding position in [`HeadLayout`]'s map.
const PADDING: u32 = u32::MAX;

/// Where each position `(sequence, token)` of a `[b, t]` grid finds its row among a
/// tensor's rows, and how many heads split a row.
#[derive(Debug, Clone)]
pub(crate) struct HeadLayout {
    batch: usize,
    length: usize,
    heads: usize,
    /// For each of the `b·t` positions, its row, or [`PADDING`]; `None`: position `i`
    /// is row `i` (no padding).
    rows_of_positions: Option<Arc<[u32]>>,
    /// The dimensions of the rows tensor but the last (`[b, t]` or `[1, n]`).
    row_dims: Vec<usize>,
}

impl HeadLayout {
    /// `b·t` positions, each its own row of a `[b, t, h·d]` tensor.
    pub(crate) fn dense(batch: usize, length: usize, heads: usize) -> Self {
        Self {
            batch,
            length,
            heads,
            rows_of_positions: None,
            row_dims: vec![batch, length],
        }
    }

    /// `b·t` positions of which those with a row in `rows_of_positions` (the others
    /// [`PADDING`]) are the rows of a packed `[1, n, h·d]` tensor.
    pub(crate) fn packed(
        batch: usize,
        length: usize,
        heads: usize,
        rows_of_positions: Arc<[u32]>,
        rows: usize,
    ) -> Self {
        Self {
            batch,
            length,
            heads,
            rows_of_positions: Some(rows_of_positions),
            row_dims: vec![1, rows],
        }
    }

    /// The value marking a padding position in a packed layout's map.
    pub(crate) const fn padding() -> u32 {
        PADDING
    }

    fn rows(&self) -> usize {
        self.row_dims.iter().product()
    }

    fn row_of(&self, position: usize) -> Option<usize> {
        match &self.rows_of_positions {
            None => Some(position),
            Some(map) => (map[position] != PADDING).then_some(map[position] as usize),
        }
    }

    /// Rows `[.., n, h·d]` → `[b, h, t, d]`, or `[b, h, d, t]` when `transposed`;
    /// padding positions hold zeros.
    pub(crate) fn split(&self, x: &Tensor, transposed: bool) -> Result<Tensor> {
        if !super::composite::fused_kernels(x.device()) {
            return self.split_composite(x, transposed);
        }
        let x = if x.stride().last() == Some(&1) {
            x.clone()
        } else {
            x.contiguous()?
        };
        x.apply_op1(HeadOp {
            layout: self.clone(),
            transposed,
            merge: false,
        })
    }

    /// The adjoint of [`split`](Self::split): `[b, h, t, d]` (or `[b, h, d, t]`) → the
    /// rows `[.., n, h·d]`, padding positions dropped.
    pub(crate) fn merge(&self, x: &Tensor, transposed: bool) -> Result<Tensor> {
        if !super::composite::fused_kernels(x.device()) {
            return self.merge_composite(x, transposed);
        }
        x.contiguous()?.apply_op1(HeadOp {
            layout: self.clone(),
            transposed,
            merge: true,
        })
    }

    /// [`split`](Self::split) with candle's ops, for devices without melora's
    /// kernels (see `composite`): padding positions select an appended zero row, then
    /// a reshape and a transposed copy. Its backward is candle's (`index_add`, copies).
    fn split_composite(&self, x: &Tensor, transposed: bool) -> Result<Tensor> {
        let op = HeadOp {
            layout: self.clone(),
            transposed,
            merge: false,
        };
        let x = if x.stride().last() == Some(&1) {
            x.clone()
        } else {
            x.contiguous()?
        };
        let width = op.check_split_input(x.layout())?;
        let rows = x.reshape((self.rows(), width))?;
        let positions = match &self.rows_of_positions {
            None => rows,
            Some(map) => {
                let zero = Tensor::zeros((1, width), x.dtype(), x.device())?;
                let padded = Tensor::cat(&[&rows, &zero], 0)?;
                let zero_row = self.rows() as u32;
                let picks: Vec<u32> = map
                    .iter()
                    .map(|&r| if r == PADDING { zero_row } else { r })
                    .collect();
                let picks = Tensor::from_vec(picks, map.len(), x.device())?;
                padded.index_select(&picks, 0)?
            }
        };
        let grid = positions.reshape((self.batch, self.length, self.heads, width / self.heads))?;
        let heads = if transposed {
            grid.permute((0, 2, 3, 1))?
        } else {
            grid.transpose(1, 2)?
        };
        heads.contiguous()
    }

    /// [`merge`](Self::merge) with candle's ops: a transposed copy back to one row
    /// per position, then each row picked from its position.
    fn merge_composite(&self, x: &Tensor, transposed: bool) -> Result<Tensor> {
        let op = HeadOp {
            layout: self.clone(),
            transposed,
            merge: true,
        };
        let width = op.check_merge_input(&x.contiguous()?.layout().clone())?;
        let grid = if transposed {
            x.permute((0, 3, 1, 2))?
        } else {
            x.transpose(1, 2)?
        };
        let positions = grid
            .contiguous()?
            .reshape((self.batch * self.length, width))?;
        let rows = match &self.rows_of_positions {
            None => positions,
            Some(map) => {
                let mut position_of_row = vec![0u32; self.rows()];
                for (position, &row) in map.iter().enumerate() {
                    if row != PADDING {
                        position_of_row[row as usize] = position as u32;
                    }
                }
                let picks = Tensor::from_vec(position_of_row, self.rows(), x.device())?;
                positions.index_select(&picks, 0)?
            }
        };
        let mut dims = self.row_dims.clone();
        dims.push(width);
        rows.reshape(dims)
    }
}

/// One direction of the move between rows and heads.
#[derive(Clone)]
struct HeadOp {
    layout: HeadLayout,
    transposed: bool,
    merge: bool,
}

/// Element offsets of a strided tensor's rows (all dimensions but the last), whose
/// last stride is 1.
fn row_offsets(layout: &Layout) -> Vec<usize> {
    let dims = layout.dims();
    let strides = layout.stride();
    let leading = &dims[..dims.len() - 1];
    let count: usize = leading.iter().product();
    (0..count)
        .map(|mut row| {
            let mut offset = layout.start_offset();
            for k in (0..leading.len()).rev() {
                offset += (row % leading[k]) * strides[k];
                row /= leading[k];
            }
            offset
        })
        .collect()
}

impl HeadOp {
    fn heads_shape(&self, width: usize) -> Vec<usize> {
        let l = &self.layout;
        let d = width / l.heads;
        if self.transposed {
            vec![l.batch, l.heads, d, l.length]
        } else {
            vec![l.batch, l.heads, l.length, d]
        }
    }

    /// Index of element `(sequence, head, token, feature)` in the heads layout.
    fn heads_index(&self, (s, h, t, f): (usize, usize, usize, usize), d: usize) -> usize {
        let l = &self.layout;
        if self.transposed {
            ((s * l.heads + h) * d + f) * l.length + t
        } else {
            ((s * l.heads + h) * l.length + t) * d + f
        }
    }

    fn split_typed<T: Copy>(&self, src: &[T], offsets: &[usize], width: usize, zero: T) -> Vec<T> {
        let l = &self.layout;
        let d = width / l.heads;
        let mut out = vec![zero; l.batch * l.length * width];
        for s in 0..l.batch {
            for t in 0..l.length {
                let Some(row) = l.row_of(s * l.length + t) else {
                    continue;
                };
                let row = &src[offsets[row]..offsets[row] + width];
                for h in 0..l.heads {
                    for f in 0..d {
                        out[self.heads_index((s, h, t, f), d)] = row[h * d + f];
                    }
                }
            }
        }
        out
    }

    fn merge_typed<T: Copy>(&self, src: &[T], width: usize, zero: T) -> Vec<T> {
        let l = &self.layout;
        let d = width / l.heads;
        let mut out = vec![zero; l.rows() * width];
        for s in 0..l.batch {
            for t in 0..l.length {
                let Some(row) = l.row_of(s * l.length + t) else {
                    continue;
                };
                let row = &mut out[row * width..(row + 1) * width];
                for h in 0..l.heads {
                    for f in 0..d {
                        row[h * d + f] = src[self.heads_index((s, h, t, f), d)];
                    }
                }
            }
        }
        out
    }

    fn check_split_input(&self, layout: &Layout) -> Result<usize> {
        let dims = layout.dims();
        let l = &self.layout;
        let width = dims.last().copied().unwrap_or(0);
        if dims[..dims.len().saturating_sub(1)] != l.row_dims[..] {
            candle_core::bail!(
                "attention heads: rows {dims:?} do not match the batch's {:?}",
                l.row_dims
            );
        }
        if width == 0 || !width.is_multiple_of(l.heads) || layout.stride().last() != Some(&1) {
            candle_core::bail!(
                "attention heads: {width} features cannot split into {} heads",
                l.heads
            );
        }
        Ok(width)
    }

    fn check_merge_input(&self, layout: &Layout) -> Result<usize> {
        let dims = layout.dims();
        let l = &self.layout;
        let fits = dims.len() == 4
            && dims[0] == l.batch
            && dims[1] == l.heads
            && (if self.transposed { dims[3] } else { dims[2] }) == l.length;
        if !fits || !layout.is_contiguous() {
            candle_core::bail!(
                "attention heads: {dims:?} is not the heads layout of {} sequences of {} \
                 tokens in {} heads",
                l.batch,
                l.length,
                l.heads
            );
        }
        let d = if self.transposed { dims[2] } else { dims[3] };
        Ok(d * l.heads)
    }
}

impl CustomOp1 for HeadOp {
    fn name(&self) -> &'static str {
        match (self.merge, self.transposed) {
            (false, false) => "split-heads",
            (false, true) => "split-heads-transposed",
            (true, false) => "merge-heads",
            (true, true) => "merge-heads-transposed",
        }
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        if self.merge {
            let width = self.check_merge_input(layout)?;
            let start = layout.start_offset();
            let end = start + layout.shape().elem_count();
            let out = match storage {
                CpuStorage::F64(v) => CpuStorage::F64(self.merge_typed(&v[start..end], width, 0.0)),
                CpuStorage::F32(v) => CpuStorage::F32(self.merge_typed(&v[start..end], width, 0.0)),
                CpuStorage::BF16(v) => {
                    CpuStorage::BF16(self.merge_typed(&v[start..end], width, bf16::ZERO))
                }
                CpuStorage::F16(v) => {
                    CpuStorage::F16(self.merge_typed(&v[start..end], width, f16::ZERO))
                }
                _ => candle_core::bail!("attention heads: floating-point input expected"),
            };
            let mut dims = self.layout.row_dims.clone();
            dims.push(width);
            Ok((out, Shape::from(dims)))
        } else {
            let width = self.check_split_input(layout)?;
            let offsets = row_offsets(layout);
            let out = match storage {
                CpuStorage::F64(v) => CpuStorage::F64(self.split_typed(v, &offsets, width, 0.0)),
                CpuStorage::F32(v) => CpuStorage::F32(self.split_typed(v, &offsets, width, 0.0)),
                CpuStorage::BF16(v) => {
                    CpuStorage::BF16(self.split_typed(v, &offsets, width, bf16::ZERO))
                }
                CpuStorage::F16(v) => {
                    CpuStorage::F16(self.split_typed(v, &offsets, width, f16::ZERO))
                }
                _ => candle_core::bail!("attention heads: floating-point input expected"),
            };
            Ok((out, Shape::from(self.heads_shape(width))))
        }
    }

    /// The adjoint move: split's backward merges the gradient, merge's splits it.
    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let back = if self.merge {
            self.layout.split(grad, self.transposed)?
        } else {
            self.layout.merge(grad, self.transposed)?
        };
        Ok(Some(back))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::gradcheck::{
        check_derivatives, random_tensor, FIRST_ORDER_TOLERANCE, SECOND_ORDER_TOLERANCE,
    };
    use crate::tensor::test_support::max_abs_diff;
    use candle_core::{DType, Device, D};

    /// Two sequences of three positions; the first has two real tokens, the second
    /// one: packed rows 0, 1 and 2.
    fn packed() -> HeadLayout {
        let map: Arc<[u32]> = Arc::from(vec![0, 1, PADDING, PADDING, 2, PADDING]);
        HeadLayout::packed(2, 3, 2, map, 3)
    }

    /// The reference: candle's reshape, transpose and row selection.
    fn reference_split(rows: &Tensor, transposed: bool) -> Tensor {
        let dev = rows.device();
        // Padded [2·3, 4] with zeros at padding: rows 0, 1, _, _, 2, _.
        let zero = Tensor::zeros((1, 4), rows.dtype(), dev).unwrap();
        let r = rows.squeeze(0).unwrap();
        let pick = |i: usize| r.narrow(0, i, 1).unwrap();
        let padded = Tensor::cat(
            &[pick(0), pick(1), zero.clone(), zero.clone(), pick(2), zero],
            0,
        )
        .unwrap();
        let heads = padded
            .reshape((2, 3, 2, 2))
            .unwrap()
            .transpose(1, 2)
            .unwrap();
        let heads = if transposed {
            heads.transpose(2, 3).unwrap()
        } else {
            heads
        };
        heads.contiguous().unwrap()
    }

    #[test]
    fn split_places_rows_and_zeros_padding_and_merge_inverts_it() {
        let dev = Device::Cpu;
        let rows = random_tensor(&[1, 3, 4], 1, &dev).unwrap();
        let layout = packed();
        for transposed in [false, true] {
            let heads = layout.split(&rows, transposed).unwrap();
            let reference = reference_split(&rows, transposed);
            assert_eq!(heads.dims(), reference.dims());
            assert_eq!(max_abs_diff(&heads, &reference), 0.0);
            let back = layout.merge(&heads, transposed).unwrap();
            assert_eq!(back.dims(), &[1, 3, 4]);
            assert_eq!(max_abs_diff(&back, &rows), 0.0);
        }
        // Without packing, a [b, t, h·d] tensor is the usual head split.
        let dense = random_tensor(&[2, 3, 4], 2, &dev).unwrap();
        let heads = HeadLayout::dense(2, 3, 2).split(&dense, false).unwrap();
        let reference = dense
            .reshape((2, 3, 2, 2))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap();
        assert_eq!(max_abs_diff(&heads, &reference), 0.0);
    }

    /// A narrowed view (GPT-2's fused q|k|v columns) is read in place, any dtype.
    #[test]
    fn split_reads_strided_rows_in_any_float_dtype() {
        let dev = Device::Cpu;
        let wide = random_tensor(&[1, 3, 12], 3, &dev).unwrap();
        let layout = packed();
        for dtype in [DType::F64, DType::F32, DType::BF16, DType::F16] {
            let wide = wide.to_dtype(dtype).unwrap();
            let view = wide.narrow(D::Minus1, 4, 4).unwrap();
            let heads = layout.split(&view, false).unwrap();
            let reference = reference_split(&view.contiguous().unwrap(), false);
            assert_eq!(heads.dtype(), dtype);
            assert_eq!(max_abs_diff(&heads, &reference), 0.0);
        }
    }

    type Direction = fn(&HeadLayout, &Tensor, bool) -> Result<Tensor>;

    /// First derivatives and Hessian-vector products of `split` and `merge` (a
    /// square of each, so that second order is tested) against finite differences.
    fn assert_exact_derivatives(split: Direction, merge: Direction) {
        let dev = Device::Cpu;
        let layout = packed();
        for transposed in [false, true] {
            let shape: &[usize] = if transposed {
                &[2, 2, 2, 3]
            } else {
                &[2, 2, 3, 2]
            };
            let cases: [(&str, Direction, &[usize]); 2] =
                [("split", split, &[1, 3, 4]), ("merge", merge, shape)];
            for (name, direction, input_shape) in cases {
                let input = random_tensor(input_shape, 4, &dev).unwrap();
                let errors =
                    check_derivatives(&[input], |t| direction(&layout, &t[0], transposed)?.sqr())
                        .unwrap();
                assert!(
                    errors.first_order < FIRST_ORDER_TOLERANCE
                        && errors.second_order < SECOND_ORDER_TOLERANCE,
                    "{name} {transposed}: {errors:?}"
                );
            }
        }
    }

    #[test]
    fn both_directions_have_exact_derivatives() {
        assert_exact_derivatives(HeadLayout::split, HeadLayout::merge);
    }

    /// The compositions other devices use: the fused ops' values (packed and dense,
    /// strided rows, every float dtype), exact derivatives, the same errors.
    #[test]
    fn compositions_match_the_fused_ops() {
        let dev = Device::Cpu;
        let wide = random_tensor(&[1, 3, 12], 9, &dev).unwrap();
        let dense_rows = random_tensor(&[2, 3, 4], 10, &dev).unwrap();
        for dtype in [DType::F64, DType::F32, DType::BF16] {
            let view = wide
                .to_dtype(dtype)
                .unwrap()
                .narrow(D::Minus1, 4, 4)
                .unwrap();
            let dense = dense_rows.to_dtype(dtype).unwrap();
            for (layout, rows) in [(packed(), view), (HeadLayout::dense(2, 3, 2), dense)] {
                for transposed in [false, true] {
                    let fused = layout.split(&rows, transposed).unwrap();
                    let composed = layout.split_composite(&rows, transposed).unwrap();
                    assert_eq!(composed.dims(), fused.dims());
                    assert_eq!(max_abs_diff(&fused, &composed), 0.0);
                    let fused_back = layout.merge(&fused, transposed).unwrap();
                    let composed_back = layout.merge_composite(&fused, transposed).unwrap();
                    assert_eq!(composed_back.dims(), fused_back.dims());
                    assert_eq!(max_abs_diff(&fused_back, &composed_back), 0.0);
                }
            }
        }
        assert_exact_derivatives(HeadLayout::split_composite, HeadLayout::merge_composite);
        let layout = packed();
        let wrong_rows = random_tensor(&[1, 4, 4], 6, &dev).unwrap();
        let err = layout.split_composite(&wrong_rows, false).unwrap_err();
        assert!(err.to_string().contains("do not match"), "{err}");
        let wrong_heads = random_tensor(&[2, 2, 4, 2], 8, &dev).unwrap();
        let err = layout.merge_composite(&wrong_heads, false).unwrap_err();
        assert!(err.to_string().contains("not the heads layout"), "{err}");
    }

    #[test]
    fn mismatched_shapes_are_clear_errors() {
        let dev = Device::Cpu;
        let layout = packed();
        let wrong_rows = random_tensor(&[1, 4, 4], 6, &dev).unwrap();
        let err = layout.split(&wrong_rows, false).unwrap_err().to_string();
        assert!(err.contains("do not match"), "{err}");
        let odd = random_tensor(&[1, 3, 5], 7, &dev).unwrap();
        let err = layout.split(&odd, false).unwrap_err().to_string();
        assert!(err.contains("cannot split"), "{err}");
        let wrong_heads = random_tensor(&[2, 2, 4, 2], 8, &dev).unwrap();
        let err = layout.merge(&wrong_heads, false).unwrap_err().to_string();
        assert!(err.contains("not the heads layout"), "{err}");
    }
}
