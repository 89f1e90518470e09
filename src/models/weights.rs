//! Frozen base weights by their Hugging Face names.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

use super::precision::{ModelPrecision, Quantization};
use crate::{Error, Result};

/// Frozen tensors of a pre-trained model, looked up by Hugging Face name with their
/// expected shape, so a wrong file gives an error naming the tensor.
#[derive(Debug, Clone)]
pub struct Weights {
    tensors: HashMap<String, Tensor>,
    /// `Some(seed)`: tensors are drawn on demand (built-in random models).
    random_seed: Option<u64>,
    device: Device,
    /// Where the tensors came from, for error messages.
    origin: String,
    dtype: DType,
    /// Dtype of the trainable tensors built beside these weights (LoRA, head).
    trainable: DType,
    /// How frozen matrices are stored by the layers that load them.
    quantization: Quantization,
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

    /// Wraps tensors already in memory (tests, converted checkpoints).
    pub fn from_tensors(
        tensors: HashMap<String, Tensor>,
        dtype: DType,
        origin: impl Into<String>,
    ) -> Result<Self> {
        let device = tensors
            .values()
            .next()
            .map(|t| t.device().clone())
            .unwrap_or(Device::Cpu);
        let tensors = tensors
            .into_iter()
            .map(|(n, t)| {
                // Integer buffers (BERT's `position_ids`) stay as they are.
                let keep = t.dtype() == dtype || !t.dtype().is_float();
                Ok((n, if keep { t } else { t.to_dtype(dtype)? }))
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            tensors,
            random_seed: None,
            device,
            origin: origin.into(),
            dtype,
            trainable: dtype,
            quantization: Quantization::None,
        })
    }

    /// Seeded random weights for built-in tiny models: each tensor is drawn when asked
    /// for, from its name and shape, so every family gets a random model without a
    /// list of names. Weights ~ N(0, 0.02²) as BERT and GPT-2 initialise them, norm
    /// scales 1, biases 0.
    pub fn random(seed: u64, dtype: DType, device: &Device) -> Self {
        Self {
            tensors: HashMap::new(),
            random_seed: Some(seed),
            device: device.clone(),
            origin: format!("built-in random weights (seed {seed})"),
            dtype,
            trainable: dtype,
            quantization: Quantization::None,
        }
    }

    /// The same weights for a model of `precision`: frozen tensors converted to
    /// `precision.frozen` (the dtype they were read in, when it already is), trainable
    /// tensors to be made in `precision.trainable`, matrices stored as
    /// `precision.quantization`.
    pub fn with_precision(mut self, precision: ModelPrecision) -> Result<Self> {
        precision.validate()?;
        if precision.frozen != self.dtype {
            for t in self.tensors.values_mut() {
                if t.dtype().is_float() {
                    *t = t.to_dtype(precision.frozen)?;
                }
            }
            self.dtype = precision.frozen;
        }
        self.trainable = precision.trainable;
        self.quantization = precision.quantization;
        Ok(self)
    }

    /// The weights' settings without their tensors: what a built model keeps, so that
    /// the file's tensors (dense copies of matrices the model stores in int8, tensors
    /// it does not use) are freed once the model holds its own.
    pub fn without_tensors(&self) -> Self {
        Self {
            tensors: HashMap::new(),
            random_seed: self.random_seed,
            device: self.device.clone(),
            origin: self.origin.clone(),
            dtype: self.dtype,
            trainable: self.trainable,
            quantization: self.quantization,
        }
    }

    /// The dtype trainable tensors are made in (the frozen dtype unless mixed).
    pub fn trainable_dtype(&self) -> DType {
        self.trainable
    }

    /// How frozen matrices are stored.
    pub fn quantization(&self) -> Quantization {
        self.quantization
    }

    fn draw(&self, seed: u64, name: &str, shape: &[usize]) -> Result<Tensor> {
        let is_norm = ["LayerNorm", "layer_norm", "ln_"]
            .iter()
            .any(|k| name.contains(k));
        let tensor = if name.ends_with(".bias") {
            Tensor::zeros(shape, self.dtype, &self.device)?
        } else if is_norm {
            Tensor::ones(shape, self.dtype, &self.device)?
        } else {
            // A per-name stream: the same tensor whatever order the model asks in.
            let salt = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
            });
            let mut rng = ChaCha8Rng::seed_from_u64(crate::tensor::ops::mix_seed(seed, salt));
            let n: usize = shape.iter().product();
            let data: Vec<f64> = (0..n)
                .map(|_| 0.02 * rng.sample::<f64, _>(StandardNormal))
                .collect();
            Tensor::from_vec(data, shape, &self.device)?.to_dtype(self.dtype)?
        };
        Ok(tensor)
    }

    /// The dtype every frozen tensor was converted to (the activations' dtype).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device of the tensors (CPU when empty).
    pub fn device(&self) -> Device {
        self.device.clone()
    }

    /// The tensor `name` (also found under a task head's prefix such as `bert.`),
    /// which must have shape `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        if let Some(seed) = self.random_seed {
            return self.draw(seed, name, shape);
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_mis_shaped_weights_name_the_tensor_and_the_file() {
        let tensors = HashMap::from([(
            "bert.embeddings.word_embeddings.weight".to_string(),
            Tensor::zeros((10, 4), DType::F32, &Device::Cpu).unwrap(),
        )]);
        let weights = Weights::from_tensors(tensors, DType::F64, "model.safetensors").unwrap();
        // Found through the task-head prefix, converted to the requested dtype.
        let t = weights
            .get("embeddings.word_embeddings.weight", &[10, 4])
            .unwrap();
        assert_eq!(t.dtype(), DType::F64);
        let err = weights
            .get("embeddings.word_embeddings.weight", &[12, 4])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("has shape [10, 4]")
                && err.contains("[12, 4]")
                && err.contains("model.safetensors"),
            "{err}"
        );
        let err = weights
            .get("pooler.dense.weight", &[4, 4])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`pooler.dense.weight` is missing from model.safetensors"),
            "{err}"
        );
    }

    #[test]
    fn random_weights_are_deterministic_per_name() {
        let a = Weights::random(5, DType::F32, &Device::Cpu);
        let b = Weights::random(5, DType::F32, &Device::Cpu);
        let values = |w: &Weights, name: &str, shape: &[usize]| -> Vec<f32> {
            let t = w.get(name, shape).unwrap();
            t.flatten_all().unwrap().to_vec1().unwrap()
        };
        let x = values(&a, "h.0.attn.c_attn.weight", &[4, 12]);
        let y = values(&b, "h.0.attn.c_attn.weight", &[4, 12]);
        assert_eq!(x, y);
        let z = values(&a, "h.0.attn.c_proj.weight", &[4, 12]);
        assert_ne!(x, z);
        let ln = values(&a, "h.0.ln_1.weight", &[4]);
        assert_eq!(ln, vec![1.0; 4]);
    }
}
