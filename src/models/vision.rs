//! What the vision backbones share: the built-in backbones by name, the image shape
//! they read, their initialisation, and their structure as a stem, stages and a
//! pooling (which gradient checkpointing cuts at the stages).
//!
//! BatchNorm: every backbone normalises with the statistics of the batch being
//! forwarded (transductive, as MAML does), whichever method trains it: support and
//! query sets are normalised each with their own statistics, in training and, by
//! default, in evaluation; `evaluation.batch_norm: running` evaluates with
//! population statistics estimated over training batches instead (see
//! [`BatchNormStatistics`]).
//!
//! Mixed precision (`memory_optimization.precision: bf16`): the parameters stay f32
//! master weights; images, convolutions, BatchNorm and activations run in bf16 (each
//! weight cast in the graph, so its gradient reaches the f32 master); the pooled
//! features, the head and the loss are f32. BatchNorm's statistics are computed in
//! f64 whatever the activations' dtype.

use candle_core::{DType, Device, Tensor};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

use super::convnet::{ConvNet, ConvNetConfig};
use super::resnet::{ResNet, ResNetConfig, ResNetDepth};
use super::{BatchNormStatistics, ClassificationHead, FewShotModel, ModelPrecision, Quantization};
use crate::config::Backbone;
use crate::data::Batch;
use crate::tensor::ParamSet;
use crate::{Error, Result};

/// Building the backbones ([`Backbone`] itself is a configuration value).
impl Backbone {
    /// The backbone for `input` images with a head for `classes` classes, its
    /// parameters in `precision.trainable` and its activations in `precision.frozen`
    /// (a plain dtype gives both; [`ModelPrecision::mixed`] bf16 activations with f32
    /// master weights). Int8 storage is refused: every parameter is trained.
    pub fn build(
        self,
        input: ImageShape,
        classes: usize,
        precision: impl Into<ModelPrecision>,
        device: &Device,
    ) -> Result<Box<dyn FewShotModel>> {
        let precision = precision.into();
        precision.validate()?;
        if precision.quantization != Quantization::None {
            return Err(Error::Model(format!(
                "{} has no frozen base (every parameter is trained) to store in int8; use \
                 model.quantization: none with it",
                self.name()
            )));
        }
        let convnet = |blocks| -> Result<Box<dyn FewShotModel>> {
            let config = ConvNetConfig {
                blocks,
                in_channels: input.channels,
                image_size: input.side,
                ..ConvNetConfig::default()
            };
            Ok(Box::new(ConvNet::new(config, classes, precision, device)?))
        };
        let resnet = |depth| -> Result<Box<dyn FewShotModel>> {
            let config = ResNetConfig {
                depth,
                in_channels: input.channels,
                image_size: input.side,
                bn_eps: 1e-5,
            };
            Ok(Box::new(ResNet::new(config, classes, precision, device)?))
        };
        match self {
            Backbone::Conv4 => convnet(4),
            Backbone::Conv6 => convnet(6),
            Backbone::ResNet12 => resnet(ResNetDepth::R12),
            Backbone::ResNet18 => resnet(ResNetDepth::R18),
            Backbone::ResNet34 => resnet(ResNetDepth::R34),
        }
    }
}

/// The images a backbone reads: `channels` × `side` × `side`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageShape {
    /// Colour channels (1 grey, 3 RGB).
    pub channels: usize,
    /// Side of the square images in pixels.
    pub side: usize,
}

/// The batch's images `[b, channels, side, side]`, or an error naming the shape
/// `model` expects.
pub(crate) fn check_images<'b>(
    batch: &'b Batch,
    shape: ImageShape,
    model: &str,
) -> Result<&'b Tensor> {
    let images = batch.dense()?;
    let (_, channels, h, w) = images.dims4().map_err(|_| {
        Error::Shape(format!(
            "{model} reads images [batch, channels, height, width], got {:?}",
            images.dims()
        ))
    })?;
    if channels != shape.channels || h != shape.side || w != shape.side {
        return Err(Error::Shape(format!(
            "{model} expects {}×{s}×{s} images, got {channels}×{h}×{w}",
            shape.channels,
            s = shape.side
        )));
    }
    Ok(images)
}

/// Parameter `name` in `compute`, the dtype the activations run in: under mixed
/// precision a cast in the graph, so the gradient reaches the f32 master weight.
pub(crate) fn weight_in(params: &ParamSet, name: &str, compute: DType) -> Result<Tensor> {
    Ok(params.require(name)?.to_dtype(compute)?)
}

/// Which side of a convolution Kaiming initialisation counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fan {
    /// Input channels × kernel area (MAML's Conv4).
    In,
    /// Output channels × kernel area (torchvision's ResNets and the FS-CT project's).
    Out,
}

/// A convolution kernel `[c_out, c_in, k, k]` drawn from N(0, 2/fan): Kaiming-normal
/// initialisation for ReLU networks.
pub(crate) fn kaiming_normal(
    rng: &mut ChaCha8Rng,
    shape: [usize; 4],
    fan: Fan,
    (dtype, device): (DType, &Device),
) -> Result<Tensor> {
    let area = shape[2] * shape[3];
    let fan = match fan {
        Fan::In => shape[1] * area,
        Fan::Out => shape[0] * area,
    };
    let std = (2.0 / fan as f64).sqrt();
    let n: usize = shape.iter().product();
    let data: Vec<f64> = (0..n)
        .map(|_| std * rng.sample::<f64, _>(StandardNormal))
        .collect();
    Ok(Tensor::from_vec(data, &shape[..], device)?.to_dtype(dtype)?)
}

/// A backbone as a stem, stages and a pooling to one feature vector per image. The
/// forward pass is their chain; gradient checkpointing keeps only the stages' inputs
/// and rebuilds one stage's graph at a time. `staged_backbone_model!` makes each
/// backbone a [`FewShotModel`] and a [`LayerChain`](super::LayerChain).
pub(crate) trait StagedBackbone {
    /// Every parameter with its initial value ([`FewShotModel::init_params`]).
    fn init(&self, seed: u64) -> Result<ParamSet>;
    /// The backbone's name in error messages (`Conv4`, `ResNet-12`, …).
    fn display_name(&self) -> String;
    /// The images it reads.
    fn input_shape(&self) -> ImageShape;
    /// What runs before the first stage (the ResNet stem; the identity otherwise).
    fn stem(&self, params: &ParamSet, images: &Tensor) -> Result<Tensor>;
    /// Number of stages.
    fn stages(&self) -> usize;
    /// Stage `index` (0-based) applied to `h`.
    fn stage(&self, index: usize, h: &Tensor, params: &ParamSet) -> Result<Tensor>;
    /// The last stage's output `[b, c, h, w]` as features `[b, width]`.
    fn pool(&self, last: &Tensor) -> Result<Tensor>;
    /// The classification head on the features.
    fn head(&self) -> &ClassificationHead;
    /// The statistics its BatchNorm layers use.
    fn norm_statistics(&self) -> &BatchNormStatistics;
    /// The stem's output for the batch's images, which are checked against
    /// [`input_shape`](Self::input_shape) first.
    fn stem_of(&self, params: &ParamSet, batch: &Batch) -> Result<Tensor> {
        let images = check_images(batch, self.input_shape(), &self.display_name())?;
        self.stem(params, images)
    }
    /// Features of the batch's images through stem, stages and pooling.
    fn staged_features(&self, params: &ParamSet, batch: &Batch) -> Result<Tensor> {
        let mut h = self.stem_of(params, batch)?;
        for index in 0..self.stages() {
            h = self.stage(index, &h, params)?;
        }
        self.pool(&h)
    }
}

/// Implements [`FewShotModel`] and [`LayerChain`](super::LayerChain) for a
/// [`StagedBackbone`]: features through stem, stages and pooling, logits from the
/// head, BatchNorm's coupling of a batch's examples; for checkpointing the stem is
/// the chain's input, the stages its links, pooling and head its logits. (A blanket
/// implementation would overlap the transformers'.)
macro_rules! staged_backbone_model {
    ($backbone:ty) => {
        impl $crate::models::FewShotModel for $backbone {
            fn init_params(&self, seed: u64) -> $crate::Result<$crate::tensor::ParamSet> {
                $crate::models::vision::StagedBackbone::init(self, seed)
            }

            fn features(
                &self,
                params: &$crate::tensor::ParamSet,
                batch: &$crate::data::Batch,
                _mode: $crate::nn::Mode,
            ) -> $crate::Result<candle_core::Tensor> {
                $crate::models::vision::StagedBackbone::staged_features(self, params, batch)
            }

            fn logits(
                &self,
                params: &$crate::tensor::ParamSet,
                batch: &$crate::data::Batch,
                mode: $crate::nn::Mode,
            ) -> $crate::Result<candle_core::Tensor> {
                use $crate::models::vision::StagedBackbone;
                self.head()
                    .forward(&self.features(params, batch, mode)?, params)
            }

            /// BatchNorm normalises with the statistics of the batch being forwarded
            /// (unless running statistics are in use for evaluation).
            fn couples_examples(&self) -> bool {
                true
            }

            fn batch_norm_statistics(&self) -> Option<&$crate::models::BatchNormStatistics> {
                Some($crate::models::vision::StagedBackbone::norm_statistics(
                    self,
                ))
            }

            fn layer_chain(&self) -> Option<&dyn $crate::models::LayerChain> {
                Some(self)
            }
        }

        impl $crate::models::LayerChain for $backbone {
            fn chain_context(
                &self,
                _batch: &$crate::data::Batch,
                _params: &$crate::tensor::ParamSet,
            ) -> $crate::Result<$crate::models::StackContext> {
                Ok($crate::models::StackContext::dense())
            }

            fn chain_input(
                &self,
                params: &$crate::tensor::ParamSet,
                batch: &$crate::data::Batch,
                _context: &$crate::models::StackContext,
                _mode: $crate::nn::Mode,
            ) -> $crate::Result<candle_core::Tensor> {
                $crate::models::vision::StagedBackbone::stem_of(self, params, batch)
            }

            fn chain_length(&self) -> usize {
                $crate::models::vision::StagedBackbone::stages(self)
            }

            fn chain_link(
                &self,
                index: usize,
                h: &candle_core::Tensor,
                _context: &$crate::models::StackContext,
                params: &$crate::tensor::ParamSet,
                _mode: $crate::nn::Mode,
            ) -> $crate::Result<candle_core::Tensor> {
                $crate::models::vision::StagedBackbone::stage(self, index, h, params)
            }

            fn chain_logits(
                &self,
                last: &candle_core::Tensor,
                _context: &$crate::models::StackContext,
                params: &$crate::tensor::ParamSet,
                _batch: &$crate::data::Batch,
            ) -> $crate::Result<candle_core::Tensor> {
                use $crate::models::vision::StagedBackbone;
                self.head().forward(&self.pool(last)?, params)
            }

            fn chain_features(
                &self,
                last: &candle_core::Tensor,
                _context: &$crate::models::StackContext,
                _params: &$crate::tensor::ParamSet,
                _batch: &$crate::data::Batch,
            ) -> $crate::Result<candle_core::Tensor> {
                $crate::models::vision::StagedBackbone::pool(self, last)
            }
        }
    };
}
pub(crate) use staged_backbone_model;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::test_support::check_loss_derivatives_on;
    use crate::nn::Mode;
    use crate::tensor::gradcheck::random_tensor;

    fn images(n: usize, shape: ImageShape, seed: u64, dtype: DType) -> Batch {
        let x = random_tensor(
            &[n, shape.channels, shape.side, shape.side],
            seed,
            &Device::Cpu,
        )
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
        let labels: Vec<u32> = (0..n as u32).map(|i| i % 2).collect();
        Batch::from_dense(x, Tensor::from_vec(labels, n, &Device::Cpu).unwrap()).unwrap()
    }

    fn build(backbone: Backbone, shape: ImageShape, dtype: DType) -> Box<dyn FewShotModel> {
        backbone.build(shape, 2, dtype, &Device::Cpu).unwrap()
    }

    /// Feature widths at the Omniglot, CIFAR-FS and miniImagenet sizes, grey and RGB.
    #[test]
    fn backbones_read_every_standard_image_size() {
        for backbone in Backbone::ALL {
            for (channels, side) in [(1, 28), (3, 32), (3, 84)] {
                let shape = ImageShape { channels, side };
                let model = build(backbone, shape, DType::F32);
                let params = model.init_params(0).unwrap();
                let batch = images(2, shape, 1, DType::F32);
                let features = model.features(&params, &batch, Mode::Eval).unwrap();
                let expected = match backbone {
                    // 64 channels on the 2⁴-times-smaller image.
                    Backbone::Conv4 | Backbone::Conv6 => 64 * (side / 16) * (side / 16),
                    Backbone::ResNet12 => 640,
                    Backbone::ResNet18 | Backbone::ResNet34 => 512,
                };
                assert_eq!(
                    features.dims(),
                    &[2, expected],
                    "{} {side}",
                    backbone.name()
                );
                let logits = model.logits(&params, &batch, Mode::Eval).unwrap();
                assert_eq!(logits.dims(), &[2, 2]);
                assert!(logits
                    .to_vec2::<f32>()
                    .unwrap()
                    .iter()
                    .flatten()
                    .all(|v| v.is_finite()));
            }
        }
    }

    /// Parameter counts against torchvision's ResNet-18/34 (11,689,512 and
    /// 21,797,672 with their 1000-class head of 513,000) and ResNet-12's 12.4 M
    /// (MetaOptNet).
    #[test]
    fn parameter_counts_match_the_reference_networks() {
        let rgb = ImageShape {
            channels: 3,
            side: 84,
        };
        let backbone_count = |backbone: Backbone| {
            let params = build(backbone, rgb, DType::F32).init_params(0).unwrap();
            params.numel()
                - params
                    .require(super::super::HEAD_WEIGHT)
                    .unwrap()
                    .elem_count()
                - 2
        };
        assert_eq!(backbone_count(Backbone::ResNet18), 11_689_512 - 513_000);
        assert_eq!(backbone_count(Backbone::ResNet34), 21_797_672 - 513_000);
        assert_eq!(backbone_count(Backbone::ResNet12), 12_424_320);
    }

    /// First derivatives and Hessian-vector products of the loss in the stem, a
    /// block's convolution and BatchNorm, a shortcut and the head, against finite
    /// differences in f64 (step 1e-8: see `check_derivatives_with_step`). ResNet-34
    /// is ResNet-18's blocks in other numbers.
    #[test]
    fn loss_derivatives_match_finite_differences() {
        let cases: [(Backbone, &[&str]); 3] = [
            (
                Backbone::Conv6,
                &["conv1.weight", "bn5.weight", "conv6.bias"],
            ),
            (
                Backbone::ResNet12,
                &[
                    "layer1.conv1.weight",
                    "layer2.bn3.bias",
                    "layer4.downsample.0.weight",
                ],
            ),
            (
                Backbone::ResNet18,
                &[
                    "conv1.weight",
                    "bn1.weight",
                    "layer2.0.downsample.0.weight",
                    "layer3.1.conv2.weight",
                ],
            ),
        ];
        let shape = ImageShape {
            channels: 1,
            side: 16,
        };
        let batch = images(4, shape, 3, DType::F64);
        for (backbone, checked) in cases {
            let model = build(backbone, shape, DType::F64);
            let names: Vec<&str> = checked
                .iter()
                .copied()
                .chain([super::super::HEAD_WEIGHT])
                .collect();
            check_loss_derivatives_on(model.as_ref(), &names, &batch, 1e-8, backbone.name());
        }
    }

    #[test]
    fn images_of_another_shape_are_refused_naming_both() {
        let shape = ImageShape {
            channels: 3,
            side: 32,
        };
        let model = build(Backbone::ResNet12, shape, DType::F32);
        let params = model.init_params(0).unwrap();
        let grey = images(
            2,
            ImageShape {
                channels: 1,
                side: 32,
            },
            1,
            DType::F32,
        );
        let err = model
            .logits(&params, &grey, Mode::Eval)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("ResNet-12 expects 3×32×32") && err.contains("1×32×32"),
            "{err}"
        );
        let err = Backbone::ResNet12
            .build(
                ImageShape {
                    channels: 1,
                    side: 12,
                },
                2,
                DType::F32,
                &Device::Cpu,
            )
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("at least 16 pixels"), "{err}");
        assert_eq!(Backbone::from_name("resnet34"), Some(Backbone::ResNet34));
        assert_eq!(Backbone::from_name("resnet50"), None);
    }
}
