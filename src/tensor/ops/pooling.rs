//! Sequence pooling under an attention mask.

use candle_core::{DType, Result, Tensor};

/// Mean of `hidden` `[b, t, d]` over the positions where `mask` `[b, t]` is non-zero:
/// `Σ_t mask·h / Σ_t mask` → `[b, d]`. A row with an empty mask is an error (it has
/// no tokens to pool).
pub fn masked_mean_pool(hidden: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let (b, t, _) = hidden.dims3()?;
    if mask.dims() != [b, t] {
        candle_core::bail!(
            "mask {:?} does not match hidden states [{b}, {t}, _]",
            mask.dims()
        );
    }
    let weights = mask.ne(0f64)?.to_dtype(hidden.dtype())?;
    let counts = weights.sum_keepdim(1)?;
    if counts
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?
        .contains(&0.0)
    {
        candle_core::bail!("masked mean pooling: a sequence has no unmasked token");
    }
    hidden
        .broadcast_mul(&weights.unsqueeze(2)?)?
        .sum(1)?
        .broadcast_div(&counts)
}

/// The hidden state `[b, d]` of each sequence's last position whose `mask` `[b, t]` is
/// non-zero (the last real token, for decoders), whatever the padding side.
pub fn last_token(hidden: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let (b, t, d) = hidden.dims3()?;
    if mask.dims() != [b, t] {
        candle_core::bail!(
            "mask {:?} does not match hidden states [{b}, {t}, _]",
            mask.dims()
        );
    }
    let mask = mask.to_dtype(DType::F64)?.to_vec2::<f64>()?;
    let mut rows = Vec::with_capacity(b);
    for (i, row) in mask.iter().enumerate() {
        let Some(last) = row.iter().rposition(|&m| m != 0.0) else {
            candle_core::bail!("last-token selection: sequence {i} has no unmasked token");
        };
        rows.push((i * t + last) as u32);
    }
    let rows = Tensor::from_vec(rows, b, hidden.device())?;
    hidden.reshape((b * t, d))?.index_select(&rows, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::gradcheck::random_tensor;
    use candle_core::Device;

    fn mask() -> Tensor {
        Tensor::new(&[[1u32, 1, 0, 0], [1, 1, 1, 1], [0, 1, 1, 0]], &Device::Cpu).unwrap()
    }

    #[test]
    fn mean_pool_ignores_masked_positions() {
        let h = random_tensor(&[3, 4, 2], 1, &Device::Cpu).unwrap();
        let p = masked_mean_pool(&h, &mask())
            .unwrap()
            .to_vec2::<f64>()
            .unwrap();
        let hv = h.to_vec3::<f64>().unwrap();
        assert!((p[0][1] - (hv[0][0][1] + hv[0][1][1]) / 2.0).abs() < 1e-15);
        assert!((p[2][0] - (hv[2][1][0] + hv[2][2][0]) / 2.0).abs() < 1e-15);
    }

    #[test]
    fn last_token_picks_last_unmasked_position() {
        let h = random_tensor(&[3, 4, 2], 2, &Device::Cpu).unwrap();
        let l = last_token(&h, &mask()).unwrap().to_vec2::<f64>().unwrap();
        let hv = h.to_vec3::<f64>().unwrap();
        assert_eq!(
            l,
            vec![hv[0][1].clone(), hv[1][3].clone(), hv[2][2].clone()]
        );
    }

    #[test]
    fn empty_rows_are_errors() {
        let h = random_tensor(&[1, 2, 2], 3, &Device::Cpu).unwrap();
        let empty = Tensor::new(&[[0u32, 0]], &Device::Cpu).unwrap();
        assert!(masked_mean_pool(&h, &empty).is_err());
        assert!(last_token(&h, &empty).is_err());
    }
}
