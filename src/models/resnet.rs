//! Residual networks for few-shot vision: ResNet-12 (the few-shot standard of
//! MetaOptNet and FEAT, 64-160-320-640 channels) and ResNet-18/34 (He et al., with
//! torchvision's parameter names; the backbones of the FS-CT reference project).
//! BatchNorm uses the statistics of the batch being forwarded (see `vision`), and
//! every parameter is trainable. Features are the global average of the last
//! stage, 640 (ResNet-12) or 512 (ResNet-18/34) wide.

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

/// Which residual network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResNetDepth {
    /// ResNet-12: 4 stages of one block of three 3×3 convolutions with leaky ReLU
    /// (slope 0.1), a 1×1 shortcut and 2×2 max-pooling. No DropBlock.
    R12,
    /// ResNet-18: the 7×7/2 stem with 3×3/2 max-pooling, then stages of 2, 2, 2, 2
    /// basic blocks of 64, 128, 256, 512 channels, the last three starting with
    /// stride 2.
    R18,
    /// ResNet-34: as ResNet-18 with 3, 4, 6, 3 blocks.
    R34,
}

impl ResNetDepth {
    fn name(self) -> &'static str {
        match self {
            ResNetDepth::R12 => "ResNet-12",
            ResNetDepth::R18 => "ResNet-18",
            ResNetDepth::R34 => "ResNet-34",
        }
    }

    fn widths(self) -> [usize; 4] {
        match self {
            ResNetDepth::R12 => [64, 160, 320, 640],
            ResNetDepth::R18 | ResNetDepth::R34 => [64, 128, 256, 512],
        }
    }

    /// Blocks per stage (ResNet-12's stages are single blocks).
    fn blocks(self) -> [usize; 4] {
        match self {
            ResNetDepth::R12 => [1, 1, 1, 1],
            ResNetDepth::R18 => [2, 2, 2, 2],
            ResNetDepth::R34 => [3, 4, 6, 3],
        }
    }
}

/// Sizes of a residual network.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ResNetConfig {
    /// ResNet-12, -18 or -34.
    pub depth: ResNetDepth,
    /// Input channels (1 grey, 3 colour).
    pub in_channels: usize,
    /// Side of the square input images.
    pub image_size: usize,
    /// BatchNorm epsilon.
    pub bn_eps: f64,
}

/// ResNet-12's leaky-ReLU slope.
const LEAKY_SLOPE: f64 = 0.1;
/// Channels of the ResNet-18/34 stem.
const STEM_WIDTH: usize = 64;

/// A residual network with a classification head.
#[derive(Debug, Clone)]
pub struct ResNet {
    config: ResNetConfig,
    head: ClassificationHead,
    dtype: DType,
    compute: DType,
    norm: BatchNormStatistics,
    device: Device,
}

/// A ResNet-18/34 stage's spatial stride: the first stage keeps the stem's size.
fn stage_stride(stage: usize) -> usize {
    if stage == 0 {
        1
    } else {
        2
    }
}

impl ResNet {
    /// A network for `classes` classes; parameters are created by
    /// [`FewShotModel::init_params`](super::FewShotModel::init_params) in
    /// `precision.trainable`, activations computed in `precision.frozen` (see
    /// [`Backbone::build`](crate::config::Backbone::build)).
    pub fn new(
        config: ResNetConfig,
        classes: usize,
        precision: impl Into<ModelPrecision>,
        device: &Device,
    ) -> Result<Self> {
        let precision = precision.into();
        let min = match config.depth {
            ResNetDepth::R12 => 16,
            _ => 1,
        };
        if config.image_size < min || config.in_channels == 0 {
            return Err(Error::Model(format!(
                "{} needs images of at least {min} pixels and non-zero channels, got {} \
                 pixels, {} channels",
                config.depth.name(),
                config.image_size,
                config.in_channels
            )));
        }
        let head = ClassificationHead::new(config.depth.widths()[3], classes);
        Ok(Self {
            config,
            head,
            dtype: precision.trainable,
            compute: precision.frozen,
            norm: BatchNormStatistics::default(),
            device: device.clone(),
        })
    }

    fn conv(
        &self,
        x: &Tensor,
        params: &ParamSet,
        name: &str,
        padding: usize,
        stride: usize,
    ) -> Result<Tensor> {
        Ok(ops::conv2d_strided(
            x,
            &weight_in(params, &format!("{name}.weight"), self.compute)?,
            None,
            padding,
            stride,
        )?)
    }

    fn bn(&self, x: &Tensor, params: &ParamSet, name: &str) -> Result<Tensor> {
        self.norm.normalise(
            name,
            x,
            params.require(&format!("{name}.weight"))?,
            params.require(&format!("{name}.bias"))?,
            self.config.bn_eps,
        )
    }

    /// The 1×1 convolution and BatchNorm of a block's shortcut.
    fn downsample(
        &self,
        x: &Tensor,
        params: &ParamSet,
        block: &str,
        stride: usize,
    ) -> Result<Tensor> {
        let projected = self.conv(x, params, &format!("{block}.downsample.0"), 0, stride)?;
        self.bn(&projected, params, &format!("{block}.downsample.1"))
    }

    /// ResNet-12's block `layer{stage+1}`.
    fn block12(&self, stage: usize, x: &Tensor, params: &ParamSet) -> Result<Tensor> {
        let name = format!("layer{}", stage + 1);
        let mut h = x.clone();
        for i in 1..=3 {
            h = self.conv(&h, params, &format!("{name}.conv{i}"), 1, 1)?;
            h = self.bn(&h, params, &format!("{name}.bn{i}"))?;
            if i < 3 {
                h = ops::leaky_relu(&h, LEAKY_SLOPE)?;
            }
        }
        let out = (h + self.downsample(x, params, &name, 1)?)?;
        Ok(ops::max_pool(&ops::leaky_relu(&out, LEAKY_SLOPE)?, 2)?)
    }

    /// ResNet-18/34's basic block `layer{stage+1}.{index}`.
    fn basic_block(
        &self,
        stage: usize,
        index: usize,
        x: &Tensor,
        params: &ParamSet,
    ) -> Result<Tensor> {
        let name = format!("layer{}.{index}", stage + 1);
        let stride = if index == 0 { stage_stride(stage) } else { 1 };
        let h = self.conv(x, params, &format!("{name}.conv1"), 1, stride)?;
        let h = ops::relu(&self.bn(&h, params, &format!("{name}.bn1"))?)?;
        let h = self.conv(&h, params, &format!("{name}.conv2"), 1, 1)?;
        let h = self.bn(&h, params, &format!("{name}.bn2"))?;
        let shortcut = if self.has_downsample(stage, index) {
            self.downsample(x, params, &name, stride)?
        } else {
            x.clone()
        };
        Ok(ops::relu(&(h + shortcut)?)?)
    }

    /// Whether block `index` of `stage` projects its shortcut: ResNet-12's every
    /// block, and ResNet-18/34's first block of each stage that changes the size.
    fn has_downsample(&self, stage: usize, index: usize) -> bool {
        match self.config.depth {
            ResNetDepth::R12 => true,
            _ => index == 0 && stage_stride(stage) != 1,
        }
    }

    /// Input channels of block `index` of `stage`.
    fn block_input(&self, stage: usize, index: usize) -> usize {
        let widths = self.config.depth.widths();
        match (stage, index, self.config.depth) {
            (0, 0, ResNetDepth::R12) => self.config.in_channels,
            (0, 0, _) => STEM_WIDTH,
            (s, 0, _) => widths[s - 1],
            (s, _, _) => widths[s],
        }
    }
}

impl StagedBackbone for ResNet {
    /// Kaiming-normal convolutions over the output fan (torchvision's and the FS-CT
    /// project's), BatchNorm scale 1 and shift 0, the head as for transformers.
    fn init(&self, seed: u64) -> Result<ParamSet> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut params = ParamSet::new();
        let on = (self.dtype, &self.device);
        let mut conv = |params: &mut ParamSet, name: String, shape: [usize; 4]| -> Result<()> {
            params.insert(
                format!("{name}.weight"),
                kaiming_normal(&mut rng, shape, Fan::Out, on)?,
            )
        };
        let bn = |params: &mut ParamSet, name: String, c: usize| -> Result<()> {
            params.insert(
                format!("{name}.weight"),
                Tensor::ones(c, self.dtype, &self.device)?,
            )?;
            params.insert(
                format!("{name}.bias"),
                Tensor::zeros(c, self.dtype, &self.device)?,
            )
        };
        let depth = self.config.depth;
        if depth != ResNetDepth::R12 {
            conv(
                &mut params,
                "conv1".into(),
                [STEM_WIDTH, self.config.in_channels, 7, 7],
            )?;
            bn(&mut params, "bn1".into(), STEM_WIDTH)?;
        }
        for (stage, (&width, &blocks)) in depth.widths().iter().zip(&depth.blocks()).enumerate() {
            for index in 0..blocks {
                let c_in = self.block_input(stage, index);
                let name = if depth == ResNetDepth::R12 {
                    format!("layer{}", stage + 1)
                } else {
                    format!("layer{}.{index}", stage + 1)
                };
                let convs = if depth == ResNetDepth::R12 { 3 } else { 2 };
                for i in 1..=convs {
                    let from = if i == 1 { c_in } else { width };
                    conv(&mut params, format!("{name}.conv{i}"), [width, from, 3, 3])?;
                    bn(&mut params, format!("{name}.bn{i}"), width)?;
                }
                if self.has_downsample(stage, index) {
                    conv(
                        &mut params,
                        format!("{name}.downsample.0"),
                        [width, c_in, 1, 1],
                    )?;
                    bn(&mut params, format!("{name}.downsample.1"), width)?;
                }
            }
        }
        self.head
            .init_params(seed, self.dtype, &self.device, &mut params)?;
        Ok(params)
    }

    fn display_name(&self) -> String {
        self.config.depth.name().into()
    }

    fn input_shape(&self) -> ImageShape {
        ImageShape {
            channels: self.config.in_channels,
            side: self.config.image_size,
        }
    }

    fn stem(&self, params: &ParamSet, images: &Tensor) -> Result<Tensor> {
        let images = images.to_dtype(self.compute)?;
        if self.config.depth == ResNetDepth::R12 {
            return Ok(images);
        }
        let h = self.conv(&images, params, "conv1", 3, 2)?;
        let h = ops::relu(&self.bn(&h, params, "bn1")?)?;
        Ok(ops::max_pool_strided(&h, 3, 2, 1)?)
    }

    fn stages(&self) -> usize {
        4
    }

    fn stage(&self, index: usize, h: &Tensor, params: &ParamSet) -> Result<Tensor> {
        if self.config.depth == ResNetDepth::R12 {
            return self.block12(index, h, params);
        }
        let mut h = h.clone();
        for block in 0..self.config.depth.blocks()[index] {
            h = self.basic_block(index, block, &h, params)?;
        }
        Ok(h)
    }

    fn pool(&self, last: &Tensor) -> Result<Tensor> {
        // Averaged, then headed and scored, in the parameters' dtype (a bf16 mean
        // loses digits).
        Ok(ops::global_avg_pool(&last.to_dtype(self.dtype)?)?)
    }

    fn head(&self) -> &ClassificationHead {
        &self.head
    }

    fn norm_statistics(&self) -> &BatchNormStatistics {
        &self.norm
    }
}

staged_backbone_model!(ResNet);
