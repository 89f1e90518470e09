//! How a model stores its frozen base and its trainable tensors: one dtype for all
//! (`ModelPrecision::from(DType)`), or mixed precision (frozen base and activations in
//! bf16/f16, trainable tensors, head and loss in f32), optionally with the frozen
//! matrices in int8.

use candle_core::DType;

use crate::{Error, Result};

pub use crate::nn::Quantization;

/// The dtypes of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelPrecision {
    /// Frozen tensors and activations (the hidden states and everything kept for the
    /// backward pass).
    pub frozen: DType,
    /// Trainable tensors (LoRA `A`/`B`, head), the head's computation and the loss: the
    /// master weights the optimiser updates.
    pub trainable: DType,
    /// Storage of the frozen matrices.
    pub quantization: Quantization,
}

impl From<DType> for ModelPrecision {
    /// Everything in `dtype`, dense.
    fn from(dtype: DType) -> Self {
        Self {
            frozen: dtype,
            trainable: dtype,
            quantization: Quantization::None,
        }
    }
}

impl ModelPrecision {
    /// Frozen base and activations in `frozen`, trainable tensors in f32.
    pub fn mixed(frozen: DType) -> Self {
        Self {
            frozen,
            trainable: DType::F32,
            quantization: Quantization::None,
        }
    }

    /// The same with the frozen matrices stored as `quantization`.
    pub fn with_quantization(mut self, quantization: Quantization) -> Self {
        self.quantization = quantization;
        self
    }

    /// Whether the frozen part differs from the trainable part (dtype or storage).
    pub fn is_mixed(&self) -> bool {
        self.frozen != self.trainable || self.quantization != Quantization::None
    }

    /// Rejects combinations the ops do not implement.
    pub fn validate(&self) -> Result<()> {
        let float = |d: DType| matches!(d, DType::F32 | DType::F64 | DType::BF16 | DType::F16);
        if !float(self.frozen) || !float(self.trainable) {
            return Err(Error::Model(format!(
                "model dtypes must be f32, f64, bf16 or f16, got frozen {:?} and trainable {:?}",
                self.frozen, self.trainable
            )));
        }
        let half = |d: DType| matches!(d, DType::BF16 | DType::F16);
        if self.frozen != self.trainable && !(half(self.frozen) && self.trainable == DType::F32) {
            return Err(Error::Model(format!(
                "mixed precision means a bf16/f16 frozen base with f32 trainable tensors \
                 (master weights); got frozen {:?} with trainable {:?}",
                self.frozen, self.trainable
            )));
        }
        Ok(())
    }
}
