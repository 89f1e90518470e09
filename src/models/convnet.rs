//! Conv4 and Conv6, the standard few-shot vision backbones: blocks of 3×3
//! convolution (64 channels), BatchNorm with the statistics of the batch being
//! forwarded (no running statistics, as in MAML), ReLU and, in the first four
//! blocks, 2×2 max-pooling (Conv6's last two blocks keep the size, as in Chen et
//! al.'s "closer look"), then a linear head on the flattened features. Every
//! parameter is trainable, so the ParamSet holds the whole network.

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::vision::{
    kaiming_normal, staged_backbone_model, weight_in, Fan, ImageShape, StagedBackbone,
};
use super::{BatchNormStatistics, ClassificationHead, ModelPrecision};
use crate::tensor::ops;
use crate::tensor::ParamSet;
use crate::{Error, Result};

/// Sizes of a Conv4 or Conv6 network.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConvNetConfig {
    /// Convolution blocks: 4 (Conv4) or more (Conv6 has 6); only the first four pool.
    pub blocks: usize,
    /// Input channels (1 for Omniglot and MNIST-style images, 3 for colour).
    pub in_channels: usize,
    /// Channels of every block (64 in the MAML paper).
    pub channels: usize,
    /// Side of the square input images.
    pub image_size: usize,
    /// BatchNorm epsilon.
    pub bn_eps: f64,
}

impl Default for ConvNetConfig {
    /// Conv4 as MAML trains it on Omniglot: 4 blocks of 64 channels, 28×28 grey images.
    fn default() -> Self {
        Self {
            blocks: 4,
            in_channels: 1,
            channels: 64,
            image_size: 28,
            bn_eps: 1e-5,
        }
    }
}

/// Blocks that halve the image (2×2 max-pooling); later blocks keep its size.
const POOLED_BLOCKS: usize = 4;

/// The Conv4 / Conv6 backbone with a classification head.
#[derive(Debug, Clone)]
pub struct ConvNet {
    config: ConvNetConfig,
    head: ClassificationHead,
    dtype: DType,
    compute: DType,
    norm: BatchNormStatistics,
    device: Device,
}

impl ConvNet {
    /// A network for `classes` classes; parameters are created by
    /// [`FewShotModel::init_params`](super::FewShotModel::init_params) in
    /// `precision.trainable`, activations computed in `precision.frozen` (see
    /// [`Backbone::build`](crate::config::Backbone::build)).
    pub fn new(
        config: ConvNetConfig,
        classes: usize,
        precision: impl Into<ModelPrecision>,
        device: &Device,
    ) -> Result<Self> {
        let precision = precision.into();
        let pooled = config.blocks.min(POOLED_BLOCKS);
        let side = config.image_size >> pooled;
        if side == 0 || config.channels == 0 || config.in_channels == 0 || config.blocks == 0 {
            return Err(Error::Model(format!(
                "a {}-block ConvNet needs images of at least {} pixels, non-zero channels and \
                 at least one block, got {} pixels, {} channels",
                config.blocks,
                1usize << pooled,
                config.image_size,
                config.channels
            )));
        }
        let head = ClassificationHead::new(config.channels * side * side, classes);
        Ok(Self {
            config,
            head,
            dtype: precision.trainable,
            compute: precision.frozen,
            norm: BatchNormStatistics::default(),
            device: device.clone(),
        })
    }

    fn block(&self, block: usize, x: &Tensor, params: &ParamSet) -> Result<Tensor> {
        let conv = ops::conv2d(
            x,
            &weight_in(params, &format!("conv{block}.weight"), self.compute)?,
            Some(&weight_in(
                params,
                &format!("conv{block}.bias"),
                self.compute,
            )?),
            1,
        )?;
        let bn = format!("bn{block}");
        let normed = self.norm.normalise(
            &bn,
            &conv,
            params.require(&format!("{bn}.weight"))?,
            params.require(&format!("{bn}.bias"))?,
            self.config.bn_eps,
        )?;
        let activated = ops::relu(&normed)?;
        Ok(if block <= POOLED_BLOCKS {
            ops::max_pool(&activated, 2)?
        } else {
            activated
        })
    }
}

impl StagedBackbone for ConvNet {
    /// Kaiming-normal convolutions (std √(2/fan_in)), zero biases, BatchNorm scale 1
    /// and shift 0, the head as for transformers.
    fn init(&self, seed: u64) -> Result<ParamSet> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut params = ParamSet::new();
        let c = self.config.channels;
        let on = (self.dtype, &self.device);
        for block in 1..=self.config.blocks {
            let c_in = if block == 1 {
                self.config.in_channels
            } else {
                c
            };
            params.insert(
                format!("conv{block}.weight"),
                kaiming_normal(&mut rng, [c, c_in, 3, 3], Fan::In, on)?,
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

    fn display_name(&self) -> String {
        format!("Conv{}", self.config.blocks)
    }

    fn input_shape(&self) -> ImageShape {
        ImageShape {
            channels: self.config.in_channels,
            side: self.config.image_size,
        }
    }

    fn stem(&self, _params: &ParamSet, images: &Tensor) -> Result<Tensor> {
        Ok(images.to_dtype(self.compute)?)
    }

    fn stages(&self) -> usize {
        self.config.blocks
    }

    fn stage(&self, index: usize, h: &Tensor, params: &ParamSet) -> Result<Tensor> {
        self.block(index + 1, h, params)
    }

    fn pool(&self, last: &Tensor) -> Result<Tensor> {
        // The head and the loss run in the parameters' dtype.
        Ok(last.flatten_from(1)?.to_dtype(self.dtype)?)
    }

    fn head(&self) -> &ClassificationHead {
        &self.head
    }

    fn norm_statistics(&self) -> &BatchNormStatistics {
        &self.norm
    }
}

staged_backbone_model!(ConvNet);
