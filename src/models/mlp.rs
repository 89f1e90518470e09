//! A small fully connected network on dense inputs, every parameter trainable: the
//! classic model of MAML's synthetic benchmarks.

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

use super::{ClassificationHead, FewShotModel};
use crate::data::Batch;
use crate::nn::Mode;
use crate::tensor::{ops, ParamSet};
use crate::{Error, Result};

/// `inputs → hidden… → classes` with ReLU between layers; the last layer is the
/// classification head (`classifier.weight`, `classifier.bias`), the others
/// `layers.{i}.weight` `[out, in]` and `layers.{i}.bias`.
#[derive(Debug, Clone)]
pub struct Mlp {
    inputs: usize,
    hidden: Vec<usize>,
    head: ClassificationHead,
    dtype: DType,
    device: Device,
}

impl Mlp {
    /// An MLP from `inputs` features through `hidden` widths to `classes` logits.
    pub fn new(
        inputs: usize,
        hidden: &[usize],
        classes: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        if inputs == 0 || classes == 0 || hidden.contains(&0) {
            return Err(Error::Model(format!(
                "an MLP needs non-zero widths, got {inputs} → {hidden:?} → {classes}"
            )));
        }
        let last = hidden.last().copied().unwrap_or(inputs);
        Ok(Self {
            inputs,
            hidden: hidden.to_vec(),
            head: ClassificationHead::new(last, classes),
            dtype,
            device: device.clone(),
        })
    }
}

impl FewShotModel for Mlp {
    /// Kaiming-normal weights (std √(2/fan_in)), zero biases.
    fn init_params(&self, seed: u64) -> Result<ParamSet> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut params = ParamSet::new();
        let mut fan_in = self.inputs;
        for (i, &width) in self.hidden.iter().enumerate() {
            let std = (2.0 / fan_in as f64).sqrt();
            let w: Vec<f64> = (0..width * fan_in)
                .map(|_| std * rng.sample::<f64, _>(StandardNormal))
                .collect();
            params.insert(
                format!("layers.{i}.weight"),
                Tensor::from_vec(w, (width, fan_in), &self.device)?.to_dtype(self.dtype)?,
            )?;
            params.insert(
                format!("layers.{i}.bias"),
                Tensor::zeros(width, self.dtype, &self.device)?,
            )?;
            fan_in = width;
        }
        self.head
            .init_params(seed, self.dtype, &self.device, &mut params)?;
        Ok(params)
    }

    fn features(&self, params: &ParamSet, batch: &Batch, _mode: Mode) -> Result<Tensor> {
        let mut x = batch.dense()?.clone();
        if x.dims() != [x.dims()[0], self.inputs] {
            return Err(Error::Shape(format!(
                "the MLP reads [batch, {}] inputs, got {:?}",
                self.inputs,
                x.dims()
            )));
        }
        for i in 0..self.hidden.len() {
            let w = params.require(&format!("layers.{i}.weight"))?;
            let b = params.require(&format!("layers.{i}.bias"))?;
            x = ops::relu(&ops::linear(&x, w, Some(b))?)?;
        }
        Ok(x)
    }

    fn logits(&self, params: &ParamSet, batch: &Batch, mode: Mode) -> Result<Tensor> {
        self.head
            .forward(&self.features(params, batch, mode)?, params)
    }
}
