//! The built-in vision backbones by name (`model.name`), what the configuration
//! checks of them; `models::vision` builds them.

/// The built-in vision backbones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backbone {
    /// 4 convolution blocks of 64 channels (Vinyals et al., MAML).
    Conv4,
    /// 6 blocks of 64 channels, the first four pooling (Chen et al., 2019).
    Conv6,
    /// ResNet-12, the few-shot standard: 4 residual blocks of 64-160-320-640.
    ResNet12,
    /// ResNet-18 (He et al.): an ImageNet stem and 4 stages of 2 basic blocks.
    ResNet18,
    /// ResNet-34: 4 stages of 3, 4, 6, 3 basic blocks.
    ResNet34,
}

impl Backbone {
    /// Every backbone, in `model.name` order.
    pub const ALL: [Backbone; 5] = [
        Backbone::Conv4,
        Backbone::Conv6,
        Backbone::ResNet12,
        Backbone::ResNet18,
        Backbone::ResNet34,
    ];

    /// The `model.name` of the backbone.
    pub fn name(self) -> &'static str {
        match self {
            Backbone::Conv4 => "conv4",
            Backbone::Conv6 => "conv6",
            Backbone::ResNet12 => "resnet12",
            Backbone::ResNet18 => "resnet18",
            Backbone::ResNet34 => "resnet34",
        }
    }

    /// The backbone called `name`, if one is.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|b| b.name() == name)
    }

    /// The smallest image side it reads: the 2×2 poolings of the ConvNets and of
    /// ResNet-12 floor the size four times; ResNet-18/34 round up and read any size.
    pub fn min_image_size(self) -> usize {
        match self {
            Backbone::Conv4 | Backbone::Conv6 | Backbone::ResNet12 => 16,
            Backbone::ResNet18 | Backbone::ResNet34 => 1,
        }
    }
}
