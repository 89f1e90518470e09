//! Frozen base weights by their Hugging Face names.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::{Error, Result};

/// Frozen tensors of a pre-trained model, looked up by Hugging Face name with their
/// expected shape, so a wrong file gives an error naming the tensor.
#[derive(Debug, Clone)]
pub struct Weights {
    tensors: HashMap<String, Tensor>,
    /// Where the tensors came from, for error messages.
    origin: String,
    dtype: DType,
}

/// Prefixes task-specific Hugging Face checkpoints put before the base model's names
/// (`bert.encoder…` in `BertForSequenceClassification`, `transformer.h…` in
/// `GPT2LMHeadModel`, …).
const KNOWN_PREFIXES: &[&str] = &["bert.", "transformer.", "distilbert.", "model.", "encoder."];

impl Weights {
    /// Reads every tensor of a safetensors file, converted to `dtype`.
    pub fn from_safetensors(path: &Path, dtype: DType, device: &Device) -> Result<Self> {
        if !path.exists() {
            return Err(Error::io(
                path,
                std::io::Error::from(std::io::ErrorKind::NotFound),
            ));
        }
        let tensors = candle_core::safetensors::load(path, device).map_err(|e| Error::Format {
            path: path.into(),
            message: format!("cannot read safetensors: {e}"),
        })?;
        Self::from_tensors(tensors, dtype, path.display().to_string())
    }

    /// Wraps tensors already in memory (tests, built-in random models).
    pub fn from_tensors(
        tensors: HashMap<String, Tensor>,
        dtype: DType,
        origin: impl Into<String>,
    ) -> Result<Self> {
        let tensors = tensors
            .into_iter()
            .map(|(n, t)| {
                Ok((
                    n,
                    if t.dtype() == dtype {
                        t
                    } else {
                        t.to_dtype(dtype)?
                    },
                ))
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            tensors,
            origin: origin.into(),
            dtype,
        })
    }

    /// The dtype every tensor was converted to.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device of the tensors (CPU when empty).
    pub fn device(&self) -> Device {
        self.tensors
            .values()
            .next()
            .map(|t| t.device().clone())
            .unwrap_or(Device::Cpu)
    }

    /// The tensor `name` (also found under a task head's prefix such as `bert.`),
    /// which must have shape `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let found = self.tensors.get(name).or_else(|| {
            KNOWN_PREFIXES
                .iter()
                .find_map(|prefix| self.tensors.get(&format!("{prefix}{name}")))
        });
        let Some(tensor) = found else {
            return Err(Error::Model(format!(
                "weight `{name}` is missing from {} (is this the right model family?)",
                self.origin
            )));
        };
        if tensor.dims() != shape {
            return Err(Error::Model(format!(
                "weight `{name}` in {} has shape {:?}, the model's config implies {:?}",
                self.origin,
                tensor.dims(),
                shape
            )));
        }
        Ok(tensor.clone())
    }
}
