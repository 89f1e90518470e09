//! Embedding lookup.

use candle_core::{Result, Tensor};

/// Rows of `table` `[vocab, dim]` at integer `ids` of any shape: the result has
/// shape `ids.shape() + [dim]`. Differentiable in `table` (the backward is an
/// `index_add`, whose own backward is an `index_select`).
pub fn embedding(ids: &Tensor, table: &Tensor) -> Result<Tensor> {
    let (vocab, dim) = table.dims2()?;
    let flat = ids.flatten_all()?;
    if let Some(&bad) = flat
        .to_dtype(candle_core::DType::U32)?
        .to_vec1::<u32>()?
        .iter()
        .find(|&&id| id as usize >= vocab)
    {
        candle_core::bail!("token id {bad} is outside the embedding table of {vocab} rows");
    }
    let mut shape = ids.dims().to_vec();
    shape.push(dim);
    table.index_select(&flat, 0)?.reshape(shape)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::gradcheck::random_tensor;
    use candle_core::Device;

    #[test]
    fn looks_up_rows() {
        let table = Tensor::new(&[[1.0f64, 2.0], [3.0, 4.0], [5.0, 6.0]], &Device::Cpu).unwrap();
        let ids = Tensor::new(&[[2u32, 0], [1, 1]], &Device::Cpu).unwrap();
        let e = embedding(&ids, &table).unwrap();
        assert_eq!(e.dims(), &[2, 2, 2]);
        assert_eq!(
            e.to_vec3::<f64>().unwrap(),
            vec![
                vec![vec![5.0, 6.0], vec![1.0, 2.0]],
                vec![vec![3.0, 4.0], vec![3.0, 4.0]]
            ]
        );
    }

    #[test]
    fn out_of_range_id_is_an_error() {
        let table = random_tensor(&[3, 2], 1, &Device::Cpu).unwrap();
        let ids = Tensor::new(&[3u32], &Device::Cpu).unwrap();
        let err = embedding(&ids, &table).unwrap_err().to_string();
        assert!(err.contains("token id 3"), "{err}");
    }
}
