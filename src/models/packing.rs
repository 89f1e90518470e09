//! Token packing: a padded batch's hidden states `[b, t, width]` as the rows of its
//! real tokens only, `[1, n, width]`, so that every row-wise part of a transformer
//! layer (linears and their adapters, norms, activations, residuals) runs on the `n`
//! real tokens and none of the `b·t − n` padding positions. Attention, the one part
//! that mixes positions, moves its queries, keys and values into the padded head
//! layout (where the key mask keeps sequences apart and away from padding; padding
//! positions hold zeros there) and its result back, one op each way
//! ([`TokenPacking::head_layout`]); pooling unpacks the last layer's output.
//!
//! Both directions are row selections (`index_select`), whose backward is an
//! `index_add` and whose second derivative is a selection again: packing is exact at
//! every order. Padding positions of an unpacked tensor hold a copy of packed row 0;
//! the attention mask gives them probability zero as keys, their query rows are
//! dropped by the next pack, and pooling skips them, so that copy receives a zero
//! gradient and changes no result.

use std::sync::Arc;

use candle_core::Tensor;

use crate::tensor::ops::HeadLayout;
use crate::{Error, Result};

/// Where a batch's real tokens sit in its padded layout.
#[derive(Debug, Clone)]
pub(crate) struct TokenPacking {
    /// Rows of the flattened padded layout `[b·t, width]` that hold real tokens, in
    /// order: `[n]`.
    real_rows: Tensor,
    /// For each position of the padded layout, its row of the packed layout `[n]`
    /// (padding: row 0): `[b·t]`.
    padded_rows: Tensor,
    /// `padded_rows` on the host, padding marked as attention's head layout wants it.
    rows_of_positions: Arc<[u32]>,
    batch: usize,
    length: usize,
}

impl TokenPacking {
    /// The packing of a batch with attention mask `mask` `[b, t]` (non-zero at real
    /// tokens, any padding side). `None` when nothing is padding (packing would only
    /// copy) or when nothing is real (there is nothing to pack; pooling reports it).
    pub(crate) fn of_mask(mask: &Tensor) -> Result<Option<Self>> {
        let (batch, length) = mask.dims2()?;
        let flags = mask.ne(0u32)?.flatten_all()?.to_vec1::<u8>()?;
        let real: Vec<u32> = (0u32..)
            .zip(&flags)
            .filter(|(_, &flag)| flag != 0)
            .map(|(row, _)| row)
            .collect();
        if real.len() == flags.len() || real.is_empty() {
            return Ok(None);
        }
        let mut next = 0u32;
        let padded: Vec<u32> = flags
            .iter()
            .map(|&flag| {
                if flag == 0 {
                    0
                } else {
                    next += 1;
                    next - 1
                }
            })
            .collect();
        let device = mask.device();
        let n = real.len();
        let rows_of_positions = flags
            .iter()
            .zip(&padded)
            .map(|(&flag, &row)| {
                if flag == 0 {
                    HeadLayout::padding()
                } else {
                    row
                }
            })
            .collect();
        Ok(Some(Self {
            real_rows: Tensor::from_vec(real, n, device)?,
            padded_rows: Tensor::from_vec(padded, batch * length, device)?,
            rows_of_positions,
            batch,
            length,
        }))
    }

    /// Number of real tokens.
    pub(crate) fn tokens(&self) -> usize {
        self.real_rows.dim(0).unwrap_or(0)
    }

    /// Attention's move between the packed rows and `heads` heads of the padded
    /// layout (see [`HeadLayout`]).
    pub(crate) fn head_layout(&self, heads: usize) -> HeadLayout {
        HeadLayout::packed(
            self.batch,
            self.length,
            heads,
            Arc::clone(&self.rows_of_positions),
            self.tokens(),
        )
    }

    /// `[b, t, width]` → `[1, n, width]`: the rows of the real tokens.
    pub(crate) fn pack(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, width) = x.dims3()?;
        if (b, t) != (self.batch, self.length) {
            return Err(Error::InvalidArgument(format!(
                "token packing: hidden states [{b}, {t}, _] do not match the batch's \
                 [{}, {}] mask",
                self.batch, self.length
            )));
        }
        let rows = x
            .reshape((b * t, width))?
            .index_select(&self.real_rows, 0)?;
        Ok(rows.unsqueeze(0)?)
    }

    /// `[1, n, width]` → `[b, t, width]`: the padded layout again (padding positions
    /// hold packed row 0).
    pub(crate) fn unpack(&self, x: &Tensor) -> Result<Tensor> {
        let (one, n, width) = x.dims3()?;
        if one != 1 || n != self.tokens() {
            return Err(Error::InvalidArgument(format!(
                "token packing: [{one}, {n}, _] is not a packed batch of {} tokens",
                self.tokens()
            )));
        }
        let rows = x.squeeze(0)?.index_select(&self.padded_rows, 0)?;
        Ok(rows.reshape((self.batch, self.length, width))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::gradcheck::{
        check_derivatives, random_tensor, FIRST_ORDER_TOLERANCE, SECOND_ORDER_TOLERANCE,
    };
    use candle_core::{DType, Device};

    fn mask(rows: &[&[u32]]) -> Tensor {
        let t = rows[0].len();
        let flat: Vec<u32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_vec(flat, (rows.len(), t), &Device::Cpu).unwrap()
    }

    #[test]
    fn packs_the_real_tokens_in_order_and_unpacks_them_in_place() {
        let m = mask(&[&[1, 1, 0], &[0, 1, 1]]);
        let packing = TokenPacking::of_mask(&m).unwrap().unwrap();
        assert_eq!(packing.tokens(), 4);
        let x = Tensor::arange(0f64, 12.0, &Device::Cpu)
            .unwrap()
            .reshape((2, 3, 2))
            .unwrap();
        let packed = packing.pack(&x).unwrap();
        assert_eq!(
            packed.squeeze(0).unwrap().to_vec2::<f64>().unwrap(),
            vec![
                vec![0.0, 1.0],
                vec![2.0, 3.0],
                vec![8.0, 9.0],
                vec![10.0, 11.0]
            ]
        );
        let back = packing.unpack(&packed).unwrap().to_vec3::<f64>().unwrap();
        let x = x.to_vec3::<f64>().unwrap();
        let m = m.to_vec2::<u32>().unwrap();
        for b in 0..2 {
            for t in 0..3 {
                if m[b][t] != 0 {
                    assert_eq!(back[b][t], x[b][t]);
                }
            }
        }
    }

    #[test]
    fn no_packing_without_padding() {
        assert!(TokenPacking::of_mask(&mask(&[&[1, 1], &[1, 1]]))
            .unwrap()
            .is_none());
    }

    #[test]
    fn refuses_hidden_states_of_another_batch() {
        let packing = TokenPacking::of_mask(&mask(&[&[1, 0]])).unwrap().unwrap();
        let x = random_tensor(&[2, 2, 3], 1, &Device::Cpu).unwrap();
        let err = packing.pack(&x).unwrap_err().to_string();
        assert!(err.contains("do not match"), "{err}");
    }

    /// Pack and unpack are selections: the gradient and the Hessian-vector product
    /// of a function through them match central finite differences.
    #[test]
    fn second_order_through_pack_and_unpack() {
        let m = mask(&[&[1, 1, 0], &[1, 0, 0]]);
        let packing = TokenPacking::of_mask(&m).unwrap().unwrap();
        let keep = m.to_dtype(DType::F64).unwrap().unsqueeze(2).unwrap();
        let x = random_tensor(&[2, 3, 2], 7, &Device::Cpu).unwrap();
        let errors = check_derivatives(&[x], |t| {
            // A row-wise nonlinearity on the packed rows, then the padded layout
            // masked, as pooling sees it.
            let packed = packing.pack(&t[0]).map_err(candle_core::Error::wrap)?;
            let y = (packed.tanh()? * packed.sqr()?)?;
            let padded = packing.unpack(&y).map_err(candle_core::Error::wrap)?;
            padded.broadcast_mul(&keep)
        })
        .unwrap();
        assert!(errors.first_order < FIRST_ORDER_TOLERANCE, "{errors:?}");
        assert!(errors.second_order < SECOND_ORDER_TOLERANCE, "{errors:?}");
    }

    /// Every transformer family: the packed computation (what training runs) gives the
    /// padded one's pooled features on a padded batch (the derivatives through packing
    /// are checked against finite differences by each family's tests and the fixtures).
    #[test]
    fn packed_and_padded_stacks_agree_in_every_family() {
        use crate::models::test_support::{lora, max_abs_diff, padded_batch};
        use crate::models::{load, pool, Weights};
        use crate::nn::Mode;
        let batch = padded_batch([0, 0]);
        for name in ["tiny-bert", "tiny-distilbert", "tiny-gpt2", "tiny-t5"] {
            let (family, config) = load::builtin_config(name).unwrap();
            let weights = Weights::random(3, DType::F64, &Device::Cpu);
            let model = load::build(family, config, weights, Some(lora(None)), 3, name).unwrap();
            let stack = model.transformer().unwrap();
            let params = model.init_params(1).unwrap().to_leaves().unwrap();
            let padded = pool(
                stack,
                &stack.encode(&params, &batch, Mode::Eval).unwrap(),
                &batch,
            );
            let packed = model.features(&params, &batch, Mode::Eval).unwrap();
            let gap = max_abs_diff(&padded.unwrap(), &packed);
            assert!(gap <= 1e-12, "{name}: features differ by {gap}");
        }
    }
}
