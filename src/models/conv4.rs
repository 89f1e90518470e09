//! Conv4, the standard few-shot vision backbone: four blocks of 3×3 convolution,
//! BatchNorm with the statistics of the batch being forwarded (no running
//! statistics, as in MAML), ReLU and 2×2 max-pooling, then a linear head. Every
//! parameter is trainable, so the ParamSet holds the whole network.

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

use super::{ClassificationHead, FewShotModel};
use crate::data::Batch;
use crate::nn::Mode;
use crate::tensor::ops::{self, norm::batch_norm};
use crate::tensor::ParamSet;
use crate::{Error, Result};

/// Sizes of a Conv4 network.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Conv4Config {
    /// Input channels (1 for Omniglot and MNIST-style images).
    pub in_channels: usize,
    /// Channels of every block (64 in the MAML paper).
    pub channels: usize,
    /// Side of the square input images.
    pub image_size: usize,
    /// BatchNorm epsilon.
    pub bn_eps: f64,
}

impl Default for Conv4Config {
    fn default() -> Self {
        Self {
            in_channels: 1,
            channels: 64,
            image_size: 28,
            bn_eps: 1e-5,
        }
    }
}

const BLOCKS: usize = 4;

/// The Conv4 backbone with a classification head.
#[derive(Debug, Clone)]
pub struct Conv4 {
    config: Conv4Config,
    head: ClassificationHead,
    dtype: DType,
    device: Device,
}

impl Conv4 {
    /// A Conv4 for `classes` classes; parameters are created by
    /// [`FewShotModel::init_params`] in `dtype`.
    pub fn new(config: Conv4Config, classes: usize, dtype: DType, device: &Device) -> Result<Self> {
        let mut side = config.image_size;
        for _ in 0..BLOCKS {
            side /= 2;
        }
        if side == 0 || config.channels == 0 || config.in_channels == 0 {
            return Err(Error::Model(format!(
                "Conv4 needs images of at least 16×16 pixels and non-zero channels, got {} pixels, \
                 {} channels",
                config.image_size, config.channels
            )));
        }
        let head = ClassificationHead::new(config.channels * side * side, classes);
        Ok(Self {
            config,
            head,
            dtype,
            device: device.clone(),
        })
    }

    fn normal(&self, rng: &mut ChaCha8Rng, shape: &[usize], std: f64) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let data: Vec<f64> = (0..n)
            .map(|_| std * rng.sample::<f64, _>(StandardNormal))
            .collect();
        Ok(Tensor::from_vec(data, shape, &self.device)?.to_dtype(self.dtype)?)
    }
}

impl FewShotModel for Conv4 {
    /// Kaiming-normal convolutions (std √(2/fan_in)), zero biases, BatchNorm scale 1
    /// and shift 0, the head as for transformers.
    fn init_params(&self, seed: u64) -> Result<ParamSet> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut params = ParamSet::new();
        let c = self.config.channels;
        for block in 1..=BLOCKS {
            let c_in = if block == 1 {
                self.config.in_channels
            } else {
                c
            };
            let std = (2.0 / (c_in * 9) as f64).sqrt();
            params.insert(
                format!("conv{block}.weight"),
                self.normal(&mut rng, &[c, c_in, 3, 3], std)?,
            )?;
            params.insert(
                format!("conv{block}.bias"),
                Tensor::zeros(c, self.dtype, &self.device)?,
            )?;
            params.insert(
                format!("bn{block}.weight"),
                Tensor::ones(c, self.dtype, &self.device)?,
            )?;
            params.insert(
                format!("bn{block}.bias"),
                Tensor::zeros(c, self.dtype, &self.device)?,
            )?;
        }
        self.head
            .init_params(seed, self.dtype, &self.device, &mut params)?;
        Ok(params)
    }

    fn features(&self, params: &ParamSet, batch: &Batch, _mode: Mode) -> Result<Tensor> {
        let mut x = batch.dense()?.clone();
        let (_, channels, h, w) = x.dims4().map_err(|_| {
            Error::Shape(format!(
                "Conv4 reads images [batch, channels, height, width], got {:?}",
                x.dims()
            ))
        })?;
        if channels != self.config.in_channels
            || h != self.config.image_size
            || w != self.config.image_size
        {
            return Err(Error::Shape(format!(
                "Conv4 expects {}×{s}×{s} images, got {channels}×{h}×{w}",
                self.config.in_channels,
                s = self.config.image_size
            )));
        }
        for block in 1..=BLOCKS {
            let conv = ops::conv2d(
                &x,
                params.require(&format!("conv{block}.weight"))?,
                Some(params.require(&format!("conv{block}.bias"))?),
                1,
            )?;
            let normed = batch_norm(
                &conv,
                params.require(&format!("bn{block}.weight"))?,
                params.require(&format!("bn{block}.bias"))?,
                self.config.bn_eps,
            )?;
            x = ops::max_pool(&ops::relu(&normed)?, 2)?;
        }
        Ok(x.flatten_from(1)?)
    }

    fn logits(&self, params: &ParamSet, batch: &Batch, mode: Mode) -> Result<Tensor> {
        self.head
            .forward(&self.features(params, batch, mode)?, params)
    }

    /// BatchNorm normalises with the statistics of the batch being forwarded.
    fn couples_examples(&self) -> bool {
        true
    }
}
