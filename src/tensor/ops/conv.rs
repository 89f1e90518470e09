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
    conv2d_strided(x, kernel, bias, padding, 1)
}

/// [`conv2d`] with a `stride` (ResNets' down-sampling convolutions): outputs
/// `⌊(h + 2·padding − k) / stride⌋ + 1` rows, non-square inputs included. candle's
/// backward pass of a strided convolution (a transposed convolution with output
/// padding for the input, a dilated convolution for the kernel) is itself
/// differentiable, so second order stays exact.
pub fn conv2d_strided(
    x: &Tensor,
    kernel: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
    stride: usize,
) -> Result<Tensor> {
    if stride == 0 {
        candle_core::bail!("convolution stride must be at least 1");
    }
    // candle's backward pass derives the transposed convolution's output padding
    // from the height alone and applies it to the width too: for an input whose two
    // axes leave different remainders r = (size + 2·padding − k) mod stride, the
    // input gradient would have the wrong size. The last r rows (columns) of the
    // padded input are never read by a window, so padding explicitly and dropping
    // them gives the same output with remainder 0 on both axes.
    let (_, _, h, w) = x.dims4()?;
    let (_, _, kh, kw) = kernel.dims4()?;
    let remainder = |size: usize, k: usize| (size + 2 * padding).saturating_sub(k) % stride;
    let (rh, rw) = (remainder(h, kh), remainder(w, kw));
    let y = if stride > 1 && rh != rw && h + 2 * padding >= kh && w + 2 * padding >= kw {
        let trim = |x: &Tensor, dim: usize, size: usize, r: usize| -> Result<Tensor> {
            // Unread: the far padding first, then real rows.
            let kept = x.narrow(dim, 0, size - r.saturating_sub(padding))?;
            kept.pad_with_zeros(dim, padding, padding.saturating_sub(r))
        };
        trim(&trim(x, 2, h, rh)?, 3, w, rw)?.conv2d(kernel, 0, stride, 1, 1)?
    } else {
        x.conv2d(kernel, padding, stride, 1, 1)?
    };
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

/// Max-pooling over `k × k` windows every `stride` pixels with `padding` pixels of
/// −∞ around the input (PyTorch's `MaxPool2d(k, stride, padding)`, e.g. the ResNet
/// stem's 3/2/1): `⌊(h + 2·padding − k) / stride⌋ + 1` rows. Each window offset is a
/// strided view of the padded input (narrow and reshape), and `max` runs over the
/// `k²` views stacked, so the gradient is exact at every order as in [`max_pool`].
pub fn max_pool_strided(x: &Tensor, k: usize, stride: usize, padding: usize) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    if k == 0 || stride == 0 || padding >= k || h + 2 * padding < k || w + 2 * padding < k {
        candle_core::bail!(
            "max-pool window {k} (stride {stride}, padding {padding}) does not fit the {h}×{w} \
             input (the window must be at least 1, larger than the padding, and fit the \
             padded input)"
        );
    }
    let (ho, wo) = (
        (h + 2 * padding - k) / stride + 1,
        (w + 2 * padding - k) / stride + 1,
    );
    // Pad so that every offset's view spans whole strides: rows up to
    // (k − 1) + stride·ho, with the padding on the far side beyond PyTorch's never
    // selected by a window that PyTorch has.
    let (hp, wp) = (k - 1 + stride * ho, k - 1 + stride * wo);
    let fill = |rows: usize, cols: usize| -> Result<Tensor> {
        Tensor::full(f32::MIN, (n, c, rows, cols), x.device())?.to_dtype(x.dtype())
    };
    let mut rows = vec![];
    if padding > 0 {
        rows.push(fill(padding, w)?);
    }
    rows.push(x.clone());
    if hp > h + padding {
        rows.push(fill(hp - h - padding, w)?);
    }
    let tall = Tensor::cat(&rows, 2)?;
    let mut cols = vec![];
    if padding > 0 {
        cols.push(fill(hp, padding)?);
    }
    cols.push(tall);
    if wp > w + padding {
        cols.push(fill(hp, wp - w - padding)?);
    }
    let padded = Tensor::cat(&cols, 3)?;
    let mut views = Vec::with_capacity(k * k);
    for di in 0..k {
        for dj in 0..k {
            let view = padded
                .narrow(2, di, stride * ho)?
                .narrow(3, dj, stride * wo)?
                .contiguous()?
                .reshape((n, c, ho, stride, wo, stride))?
                .narrow(3, 0, 1)?
                .narrow(5, 0, 1)?
                .reshape((n, c, ho, wo))?;
            views.push(view);
        }
    }
    Tensor::stack(&views, 4)?.max(4)
}

/// The mean over every pixel of each channel, `[n, c, h, w]` → `[n, c]` (PyTorch's
/// `AdaptiveAvgPool2d(1)` and flatten): the ResNets' feature vector.
pub fn global_avg_pool(x: &Tensor) -> Result<Tensor> {
    let (n, c, _, _) = x.dims4()?;
    x.reshape((n, c, ()))?.mean(2)
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

    /// PyTorch's `MaxPool2d(3, 2, 1)` on a 5×5 ramp: windows centred on every other
    /// pixel, the border windows clipped by the −∞ padding.
    #[test]
    fn strided_max_pool_matches_pytorch() {
        let x = Tensor::arange(0f64, 25.0, &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 5, 5))
            .unwrap();
        let y = max_pool_strided(&x, 3, 2, 1).unwrap();
        assert_eq!(y.dims(), &[1, 1, 3, 3]);
        assert_eq!(
            y.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
            vec![6.0, 8.0, 9.0, 16.0, 18.0, 19.0, 21.0, 23.0, 24.0]
        );
        // Negative inputs are not mistaken for the padding; 14×14 → 7×7 as in the stem.
        let neg = (Tensor::ones((2, 3, 14, 14), candle_core::DType::F32, &Device::Cpu).unwrap()
            * -5.0)
            .unwrap();
        let y = max_pool_strided(&neg, 3, 2, 1).unwrap();
        assert_eq!(y.dims(), &[2, 3, 7, 7]);
        assert!(y
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .all(|v| *v == -5.0));
        assert!(max_pool_strided(&x, 3, 2, 3).is_err());
    }

    /// A 7×6 input leaves remainders 0 and 1 at stride 2: the same output as
    /// candle's convolution, and an input gradient of the input's shape (candle's
    /// own backward pass gives 7×5 here).
    #[test]
    fn strided_convolution_of_a_non_square_input() {
        crate::init();
        let x = crate::tensor::gradcheck::random_tensor(&[2, 2, 7, 6], 1, &Device::Cpu).unwrap();
        let k = crate::tensor::gradcheck::random_tensor(&[3, 2, 3, 3], 2, &Device::Cpu).unwrap();
        let y = conv2d_strided(&x, &k, None, 1, 2).unwrap();
        let reference = x.conv2d(&k, 1, 2, 1, 1).unwrap();
        assert_eq!(y.dims(), &[2, 3, 4, 3]);
        let gap = (y - &reference).unwrap().abs().unwrap().max_all().unwrap();
        assert!(gap.to_scalar::<f64>().unwrap() < 1e-12);
        let leaf = candle_core::Var::from_tensor(&x).unwrap();
        let grads = conv2d_strided(leaf.as_tensor(), &k, None, 1, 2)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert_eq!(grads.get(leaf.as_tensor()).unwrap().dims(), x.dims());
    }

    #[test]
    fn strided_convolution_and_global_pool_sizes() {
        let x = Tensor::ones((2, 3, 28, 28), candle_core::DType::F32, &Device::Cpu).unwrap();
        let k = Tensor::ones((4, 3, 7, 7), candle_core::DType::F32, &Device::Cpu).unwrap();
        let y = conv2d_strided(&x, &k, None, 3, 2).unwrap();
        assert_eq!(y.dims(), &[2, 4, 14, 14]);
        let pooled = global_avg_pool(&y).unwrap();
        assert_eq!(pooled.dims(), &[2, 4]);
        // Interior pixels see all 147 ones; the mean over the border is lower.
        let v = pooled.to_vec2::<f32>().unwrap()[0][0];
        assert!(v > 100.0 && v < 147.0, "{v}");
        assert!(conv2d_strided(&x, &k, None, 3, 0).is_err());
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
