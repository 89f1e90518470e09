//! Activation functions, composed from primitives with exact derivatives.

use candle_core::{Result, Tensor};

use super::pointwise::{pointwise, Pointwise};

/// GELU with the exact error function, `0.5·x·(1 + erf(x/√2))`: Hugging Face's `gelu`
/// (BERT, MiniLM, DistilBERT). Fused: keeps only its input for the backward pass.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    pointwise(x, Pointwise::GeluErf)
}

/// GELU with the tanh approximation, `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`:
/// Hugging Face's `gelu_new` (GPT-2). Fused.
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    pointwise(x, Pointwise::GeluTanh)
}

/// ReLU, `max(x, 0)`. Its second derivative is zero away from the kink.
pub fn relu(x: &Tensor) -> Result<Tensor> {
    x.relu()
}

/// Leaky ReLU, `x` for `x > 0` and `slope·x` otherwise (ResNet-12 uses slope 0.1):
/// `relu(x) − slope·relu(−x)`, so its derivatives are ReLU's.
pub fn leaky_relu(x: &Tensor, slope: f64) -> Result<Tensor> {
    x.relu()? - (x.neg()?.relu()? * slope)?
}

/// The logistic function `1 / (1 + e^(−x))`. Fused.
pub fn sigmoid(x: &Tensor) -> Result<Tensor> {
    pointwise(x, Pointwise::Sigmoid)
}

/// SiLU (swish), `x·σ(x)`. Fused.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    pointwise(x, Pointwise::Silu)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn gelu_erf_matches_reference_values() {
        // gelu(1) = 0.5·(1 + erf(1/√2)) = 0.8413447460685429...
        let x = Tensor::new(&[1.0f64, -2.0, 0.0], &Device::Cpu).unwrap();
        let y = gelu_erf(&x).unwrap().to_vec1::<f64>().unwrap();
        assert!((y[0] - 0.841_344_746_068_542_9).abs() < 1e-15);
        assert!((y[1] - (-0.045_500_263_896_358_42)).abs() < 1e-15);
        assert_eq!(y[2], 0.0);
    }

    #[test]
    fn gelu_tanh_matches_reference_values() {
        // gelu_new(1) = 0.5·(1 + tanh(√(2/π)·1.044715)) = 0.8411919906082768
        let x = Tensor::new(&[1.0f64], &Device::Cpu).unwrap();
        let y = gelu_tanh(&x).unwrap().to_vec1::<f64>().unwrap();
        assert!((y[0] - 0.841_191_990_608_276_8).abs() < 1e-15);
    }
}
