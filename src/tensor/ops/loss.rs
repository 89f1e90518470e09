//! Losses built without `gather`, which fails at second order in candle.

use candle_core::{DType, Result, Tensor, D};

use super::log_softmax;

/// One-hot rows `[n, num_classes]` of `dtype` for integer `labels` `[n]`.
pub fn one_hot(labels: &Tensor, num_classes: usize, dtype: DType) -> Result<Tensor> {
    let device = labels.device().clone();
    let labels = labels.to_dtype(DType::U32)?.to_vec1::<u32>()?;
    let mut data = vec![0f64; labels.len() * num_classes];
    for (row, &label) in labels.iter().enumerate() {
        let label = label as usize;
        if label >= num_classes {
            candle_core::bail!("label {label} is out of range for {num_classes} classes");
        }
        data[row * num_classes + label] = 1.0;
    }
    // Built on the host, made on the labels' device (f64 is cast before the move:
    // not every device has f64).
    Tensor::from_vec(data, (labels.len(), num_classes), &candle_core::Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(&device)
}

/// Mean cross-entropy of `logits` `[n, c]` against integer `labels` `[n]`, with label
/// smoothing `smoothing` in [0, 1): the target puts `1 − smoothing` on the label and
/// spreads `smoothing` uniformly over all `c` classes (PyTorch's definition).
pub fn cross_entropy(logits: &Tensor, labels: &Tensor, smoothing: f64) -> Result<Tensor> {
    if !(0.0..1.0).contains(&smoothing) {
        candle_core::bail!("label smoothing must be in [0, 1), got {smoothing}");
    }
    let (_, classes) = logits.dims2()?;
    let targets = one_hot(labels, classes, logits.dtype())?.to_device(logits.device())?;
    let targets = if smoothing > 0.0 {
        ((targets * (1.0 - smoothing))? + smoothing / classes as f64)?
    } else {
        targets
    };
    cross_entropy_one_hot(logits, &targets)
}

/// Mean cross-entropy of `logits` `[n, c]` against target distributions `[n, c]`
/// (one-hot or soft): `mean_i −Σ_c t[i,c]·log_softmax(z_i)[c]`.
pub fn cross_entropy_one_hot(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if logits.dims() != targets.dims() {
        candle_core::bail!(
            "cross-entropy: logits {:?} and targets {:?} differ in shape",
            logits.dims(),
            targets.dims()
        );
    }
    (log_softmax(logits)? * targets)?
        .sum(D::Minus1)?
        .mean_all()?
        .neg()
}

/// Mean squared error between `prediction` and `target` of the same shape.
pub fn mse(prediction: &Tensor, target: &Tensor) -> Result<Tensor> {
    if prediction.dims() != target.dims() {
        candle_core::bail!(
            "mse: prediction {:?} and target {:?} differ in shape",
            prediction.dims(),
            target.dims()
        );
    }
    (prediction - target)?.sqr()?.mean_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::gradcheck::random_tensor;
    use candle_core::Device;

    #[test]
    fn cross_entropy_matches_logsumexp_formula() {
        let dev = Device::Cpu;
        let logits = random_tensor(&[4, 3], 1, &dev).unwrap();
        let labels = Tensor::new(&[2u32, 0, 1, 1], &dev).unwrap();
        let ce = cross_entropy(&logits, &labels, 0.0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let z = logits.to_vec2::<f64>().unwrap();
        let expect = [2usize, 0, 1, 1]
            .iter()
            .enumerate()
            .map(|(i, &y)| z[i].iter().map(|v| v.exp()).sum::<f64>().ln() - z[i][y])
            .sum::<f64>()
            / 4.0;
        assert!((ce - expect).abs() < 1e-14, "{ce} vs {expect}");
    }

    #[test]
    fn label_smoothing_matches_pytorch_definition() {
        let dev = Device::Cpu;
        let logits = random_tensor(&[2, 4], 2, &dev).unwrap();
        let labels = Tensor::new(&[3u32, 1], &dev).unwrap();
        let eps = 0.2;
        let ce = cross_entropy(&logits, &labels, eps)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let lp = log_softmax(&logits).unwrap().to_vec2::<f64>().unwrap();
        let expect = [3usize, 1]
            .iter()
            .enumerate()
            .map(|(i, &y)| -(1.0 - eps) * lp[i][y] - eps / 4.0 * lp[i].iter().sum::<f64>())
            .sum::<f64>()
            / 2.0;
        assert!((ce - expect).abs() < 1e-14);
    }

    #[test]
    fn bad_labels_are_errors() {
        let dev = Device::Cpu;
        let logits = random_tensor(&[2, 3], 1, &dev).unwrap();
        let labels = Tensor::new(&[0u32, 3], &dev).unwrap();
        let err = cross_entropy(&logits, &labels, 0.0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("label 3"), "{err}");
        let err = cross_entropy(&logits, &Tensor::new(&[0u32, 1], &dev).unwrap(), 1.0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("smoothing"), "{err}");
    }
}
