//! Layers for functional models: a frozen base held by the layer, trainable tensors
//! passed in a [`crate::tensor::ParamSet`] on every call.

pub mod adapter;
pub mod lora;
mod quantization;

pub use crate::tensor::ops::Mode;
pub use adapter::AdapterConfig;
pub use lora::{LoraInit, LoraLinear, LoraSpec, WeightLayout};
pub use quantization::Quantization;
