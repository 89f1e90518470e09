//! Convolution and pooling for small vision backbones.

use candle_core::{Result, Tensor};

/// 2-D cross-correlation of `x` `[n, c_in, h, w]` with `kernel` `[c_out, c_in, k, k]`
/// (stride 1, zero padding `padding`), plus a per-channel `bias` `[c_out]`. candle's
/// `conv2d` is exact to second order in both arguments.
pub fn conv2d(
    x: &Tensor,
    kernel: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
) -> Result<Tensor> {
    let y = x.conv2d(kernel, padding, 1, 1, 1)?;
    match bias {
        Some(b) => y.broadcast_add(&b.reshape((1, b.elem_count(), 1, 1))?),
        None => Ok(y),
    }
}

/// Max-pooling over non-overlapping `k × k` windows, flooring odd sizes (PyTorch's
/// `MaxPool2d(k)`). Built from reshapes and `max` so that its gradient is exact at
/// every order (candle's `max_pool2d` scales the gradient by 1/k²).
pub fn max_pool(x: &Tensor, k: usize) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let (ho, wo) = (h / k, w / k);
    if ho == 0 || wo == 0 {
        candle_core::bail!("max-pool window {k} is larger than the {h}×{w} input");
    }
    let x = x.narrow(2, 0, ho * k)?.narrow(3, 0, wo * k)?.contiguous()?;
    x.reshape((n, c, ho, k, wo, k))?.max(5)?.max(3)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn max_pool_takes_window_maxima_and_floors() {
        let x = Tensor::arange(0f64, 25.0, &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 5, 5))
            .unwrap();
        let y = max_pool(&x, 2).unwrap();
        assert_eq!(y.dims(), &[1, 1, 2, 2]);
        assert_eq!(
            y.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
            vec![6.0, 8.0, 16.0, 18.0]
        );
        assert!(max_pool(&x, 6).is_err());
    }

    #[test]
    fn conv2d_with_identity_kernel_and_bias() {
        let x = Tensor::arange(0f64, 9.0, &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 3, 3))
            .unwrap();
        let mut k = vec![0f64; 9];
        k[4] = 1.0;
        let k = Tensor::from_vec(k, (1, 1, 3, 3), &Device::Cpu).unwrap();
        let b = Tensor::new(&[0.5f64], &Device::Cpu).unwrap();
        let y = conv2d(&x, &k, Some(&b), 1).unwrap();
        assert_eq!(
            y.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
            (0..9).map(|v| v as f64 + 0.5).collect::<Vec<_>>()
        );
    }
}
