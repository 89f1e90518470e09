//! The installation self-check behind `melora check`: every second-order-safe op, the
//! LoRA layer and the FS-CT head, differentiated on this machine and compared with central finite
//! differences in f64, at first order and for a Hessian-vector product.
//!
//! It proves what meta-learning relies on: that gradients keep their graph
//! (`CANDLE_GRAD_DO_NOT_DETACH`, see [`crate::init`]) and that every op's derivatives,
//! and the derivatives of those derivatives, are exact. The unit tests run the same
//! cases, so the command and the test suite cannot drift apart.

use candle_core::{DType, Device, Tensor};

use crate::models::fsct::{Fsct, FsctAttention, FsctConfig};
use crate::nn::{LoraInit, LoraLinear, LoraSpec, Mode, WeightLayout};
use crate::tensor::gradcheck::{
    check_derivatives, random_tensor, FIRST_ORDER_TOLERANCE, SECOND_ORDER_TOLERANCE,
};
use crate::tensor::ops;
use crate::tensor::ParamSet;
use crate::Result;

type OpFn = Box<dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>>;

/// One op at one random point.
struct Case {
    name: &'static str,
    inputs: Vec<Tensor>,
    f: OpFn,
}

/// The outcome of one op's derivative check.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CheckRow {
    /// The op and the variant checked.
    pub name: &'static str,
    /// Largest relative error of the first derivatives.
    pub first_order: f64,
    /// Largest relative error of the Hessian-vector product.
    pub second_order: f64,
    /// Whether both are within the tolerances (1e-6 and 1e-4).
    pub passed: bool,
}

fn case(
    name: &'static str,
    inputs: Vec<Tensor>,
    f: impl Fn(&[Tensor]) -> candle_core::Result<Tensor> + 'static,
) -> Case {
    Case {
        name,
        inputs,
        f: Box::new(f),
    }
}

fn lora_case(name: &'static str, layout: WeightLayout, dev: &Device) -> Result<Case> {
    let shape = match layout {
        WeightLayout::OutIn => [3, 4],
        WeightLayout::InOut => [4, 3],
    };
    let spec = LoraSpec {
        rank: 2,
        alpha: 6.0,
        dropout: 0.3,
    };
    let layer = LoraLinear::new(
        "encoder.layer.0.attention.self.query",
        random_tensor(&shape, 40, dev)?,
        Some(random_tensor(&[3], 41, dev)?),
        layout,
    )?
    .with_lora(spec)?;
    let mut params = ParamSet::new();
    layer.init_params(LoraInit::Normal { seed: 42, std: 0.5 }, &mut params)?;
    let (a_name, b_name) = (layer.lora_a_name(), layer.lora_b_name());
    let inputs = vec![
        random_tensor(&[2, 3, 4], 43, dev)?,
        params.require(&a_name)?.clone(),
        params.require(&b_name)?.clone(),
    ];
    Ok(case(name, inputs, move |t| {
        let p = ParamSet::from_pairs([
            (a_name.clone(), t[1].clone()),
            (b_name.clone(), t[2].clone()),
        ])
        .map_err(candle_core::Error::wrap)?;
        layer
            .forward(&t[0], &p, Mode::Train { seed: 4 })
            .map_err(candle_core::Error::wrap)
    }))
}

/// Every differentiable op of `tensor::ops`, with inputs that exercise masks,
/// broadcasting and repeated indices.
fn cases(dev: &Device) -> Result<Vec<Case>> {
    let r = |shape: &[usize], seed: u64| random_tensor(shape, seed, dev);
    // Key-padding mask [b, 1, 1, t], broadcast over heads and queries as attention does.
    let key_mask = Tensor::new(&[[1u32, 1, 1, 0], [1, 1, 0, 0]], dev)?.reshape((2, 1, 1, 4))?;
    let seq_mask = Tensor::new(&[[1u32, 1, 0, 0], [1, 1, 1, 1], [0, 1, 1, 0]], dev)?;
    let seq_mask2 = seq_mask.clone();
    let labels = Tensor::new(&[0u32, 2, 1, 1, 0], dev)?;
    let labels2 = labels.clone();
    let ids = Tensor::new(&[[0u32, 4, 4], [2, 0, 1]], dev)?;
    // ReLU's inputs are kept away from the kink at 0.
    let relu_input = r(&[4, 6], 2)?;
    let relu_input = (relu_input.sign()? * 0.1 + &relu_input)?;
    Ok(vec![
        case(
            "linear",
            vec![r(&[2, 3, 4], 1)?, r(&[5, 4], 2)?, r(&[5], 3)?],
            |t| ops::linear(&t[0], &t[1], Some(&t[2])),
        ),
        case(
            "linear_in_out",
            vec![r(&[3, 4], 4)?, r(&[4, 2], 5)?, r(&[2], 6)?],
            |t| ops::linear_in_out(&t[0], &t[1], Some(&t[2])),
        ),
        // The frozen weight is a constant: only the input is differentiated.
        case("frozen_linear", vec![r(&[2, 3, 4], 50)?], |t| {
            ops::frozen_linear(
                &t[0],
                &r_const(&[5, 4], 51, t[0].device())?,
                Some(&r_const(&[5], 52, t[0].device())?),
            )
        }),
        case("frozen_linear_in_out", vec![r(&[3, 4], 53)?], |t| {
            ops::frozen_linear_in_out(
                &t[0],
                &r_const(&[4, 2], 54, t[0].device())?,
                Some(&r_const(&[2], 55, t[0].device())?),
            )
        }),
        case(
            "matmul (broadcast rhs)",
            vec![r(&[2, 3, 4, 5], 7)?, r(&[5, 2], 8)?],
            |t| ops::matmul(&t[0], &t[1]),
        ),
        case(
            "matmul (broadcast batch)",
            vec![r(&[2, 3, 4, 5], 7)?, r(&[2, 1, 5, 3], 9)?],
            |t| ops::matmul(&t[0], &t[1]),
        ),
        case(
            "layer_norm",
            vec![
                r(&[2, 3, 6], 10)?,
                r(&[6], 11)?.affine(0.1, 1.0)?,
                r(&[6], 12)?,
            ],
            |t| ops::norm::layer_norm(&t[0], &t[1], &t[2], 1e-5),
        ),
        case("rms_norm", vec![r(&[4, 5], 13)?, r(&[5], 14)?], |t| {
            ops::norm::rms_norm(&t[0], &t[1], 1e-6)
        }),
        case(
            "batch_norm",
            vec![
                r(&[4, 3, 2, 2], 32)?,
                r(&[3], 33)?.affine(0.1, 1.0)?,
                r(&[3], 34)?,
            ],
            |t| ops::norm::batch_norm(&t[0], &t[1], &t[2], 1e-5),
        ),
        // Running statistics are constants: input, scale and shift are differentiated.
        case(
            "batch_norm_with_statistics",
            vec![
                r(&[4, 3, 2, 2], 38)?,
                r(&[3], 39)?.affine(0.1, 1.0)?,
                r(&[3], 40)?,
            ],
            |t| {
                let mean = r_const(&[3], 41, t[0].device())?;
                let var = r_const(&[3], 42, t[0].device())?.affine(0.1, 1.0)?;
                ops::norm::batch_norm_with_statistics(&t[0], &mean, &var, &t[1], &t[2], 1e-5)
            },
        ),
        case(
            "conv2d",
            vec![r(&[2, 2, 5, 5], 35)?, r(&[3, 2, 3, 3], 36)?, r(&[3], 37)?],
            |t| ops::conv2d(&t[0], &t[1], Some(&t[2]), 1),
        ),
        // Random inputs: window maxima are separated by far more than the step.
        case("max_pool", vec![r(&[2, 2, 5, 4], 38)?], |t| {
            ops::max_pool(&t[0], 2)
        }),
        case(
            "conv2d_strided",
            vec![r(&[2, 2, 7, 6], 39)?, r(&[3, 2, 3, 3], 40)?, r(&[3], 41)?],
            |t| ops::conv2d_strided(&t[0], &t[1], Some(&t[2]), 1, 2),
        ),
        // Overlapping windows with padding (the ResNet stem's 3/2/1): a pixel in two
        // windows gets both windows' gradients.
        case("max_pool_strided", vec![r(&[2, 2, 5, 6], 42)?], |t| {
            ops::max_pool_strided(&t[0], 3, 2, 1)
        }),
        case("global_avg_pool", vec![r(&[2, 3, 3, 2], 43)?], |t| {
            ops::global_avg_pool(&t[0])
        }),
        case("softmax", vec![r(&[3, 5], 15)?], |t| ops::softmax(&t[0])),
        case("masked_softmax", vec![r(&[2, 2, 3, 4], 16)?], move |t| {
            ops::masked_softmax(&t[0], &key_mask)
        }),
        case("log_softmax", vec![r(&[4, 3], 17)?], |t| {
            ops::log_softmax(&t[0])
        }),
        case("cross_entropy", vec![r(&[5, 3], 18)?], move |t| {
            ops::cross_entropy(&t[0], &labels, 0.0)
        }),
        case(
            "cross_entropy (label smoothing)",
            vec![r(&[5, 3], 19)?],
            move |t| ops::cross_entropy(&t[0], &labels2, 0.1),
        ),
        case(
            "cross_entropy_one_hot (soft targets)",
            vec![r(&[4, 3], 20)?],
            |t| {
                let targets = ops::softmax(&r_const(&[4, 3], 21, t[0].device())?)?;
                ops::cross_entropy_one_hot(&t[0], &targets)
            },
        ),
        case("mse", vec![r(&[6, 1], 22)?, r(&[6, 1], 23)?], |t| {
            ops::mse(&t[0], &t[1])
        }),
        case("gelu_erf", vec![r(&[3, 5], 24)?], |t| ops::gelu_erf(&t[0])),
        case("gelu_tanh", vec![r(&[3, 5], 25)?], |t| {
            ops::gelu_tanh(&t[0])
        }),
        case("relu", vec![relu_input.clone()], |t| ops::relu(&t[0])),
        case("leaky_relu", vec![relu_input], |t| {
            ops::leaky_relu(&t[0], 0.1)
        }),
        case("sigmoid", vec![r(&[3, 5], 26)?], |t| ops::sigmoid(&t[0])),
        case("silu", vec![r(&[3, 5], 27)?], |t| ops::silu(&t[0])),
        case("dropout", vec![r(&[3, 7], 28)?], |t| {
            ops::dropout(&t[0], 0.4, Mode::Train { seed: 11 }, 3)
        }),
        // Repeated ids: their gradients must accumulate.
        case("embedding", vec![r(&[5, 3], 29)?], move |t| {
            ops::embedding(&ids, &t[0])
        }),
        case("masked_mean_pool", vec![r(&[3, 4, 2], 30)?], move |t| {
            ops::masked_mean_pool(&t[0], &seq_mask)
        }),
        case("last_token", vec![r(&[3, 4, 2], 31)?], move |t| {
            ops::last_token(&t[0], &seq_mask2)
        }),
        lora_case("lora (nn.Linear layout)", WeightLayout::OutIn, dev)?,
        lora_case("lora (Conv1D layout)", WeightLayout::InOut, dev)?,
        // Spreads well below VIC's hinge at 1, so that every term is active.
        case("vic_std", vec![(r(&[3, 4, 5], 60)? * 0.3)?], |t| {
            ops::vic_std(&t[0])
        }),
        case("vic_variance", vec![(r(&[3, 4, 5], 61)? * 0.3)?], |t| {
            ops::vic_variance(&t[0], 1.0)
        }),
        case("vic_covariance_matrix", vec![r(&[6, 4], 62)?], |t| {
            ops::vic_covariance_matrix(&t[0], 1e-4)
        }),
        case("vic_covariance", vec![r(&[6, 4], 63)?], |t| {
            ops::vic_covariance(&t[0], 1e-4)
        }),
        case("vic_regulariser", vec![(r(&[3, 2, 4], 64)? * 0.3)?], |t| {
            ops::vic_regulariser(&t[0], 1.0, 0.04, 1.0, 1e-4)
        }),
        fsct_case("fsct head (cosine attention)", FsctAttention::Cosine, dev)?,
        fsct_case("fsct head (softmax attention)", FsctAttention::Softmax, dev)?,
    ])
}

/// The FS-CT head on random support and query embeddings (3-way 2-shot, 4 queries,
/// two rounds), with random parameters: its logits as a function of the embeddings
/// and the prototype weights.
fn fsct_case(name: &'static str, attention: FsctAttention, dev: &Device) -> Result<Case> {
    let config = FsctConfig {
        heads: 2,
        dim_head: 3,
        mlp_dim: 5,
        depth: 2,
        attention,
        ..FsctConfig::new(4, 3, 2)
    };
    let head = Fsct::new(config)?;
    let mut params = ParamSet::new();
    head.init_params(70, DType::F64, dev, &mut params)?;
    let inputs = vec![
        random_tensor(&[3, 2, 4], 71, dev)?,
        random_tensor(&[4, 4], 72, dev)?,
        random_tensor(&[3, 2, 1], 73, dev)?,
    ];
    Ok(case(name, inputs, move |t| {
        let mut p = params.clone();
        p.set("proto_weight", t[2].clone());
        head.logits(&p, &t[0], &t[1])
            .map_err(candle_core::Error::wrap)
    }))
}

/// A fixed random tensor built inside an op closure, on its inputs' device.
fn r_const(shape: &[usize], seed: u64, device: &Device) -> candle_core::Result<Tensor> {
    random_tensor(shape, seed, device)
}

/// Runs every op's derivative check with its tensors on `device` (on a GPU, the ops
/// melora fuses on the CPU are checked in the form they take there).
pub fn derivative_checks_on(device: &Device) -> Result<Vec<CheckRow>> {
    cases(device)?
        .into_iter()
        .map(|c| {
            let errors = check_derivatives(&c.inputs, &c.f)?;
            Ok(CheckRow {
                name: c.name,
                first_order: errors.first_order,
                second_order: errors.second_order,
                passed: errors.first_order <= FIRST_ORDER_TOLERANCE
                    && errors.second_order <= SECOND_ORDER_TOLERANCE,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_op_matches_finite_differences_at_first_and_second_order() {
        let rows = derivative_checks_on(&Device::Cpu).unwrap();
        let failed: Vec<_> = rows.iter().filter(|r| !r.passed).collect();
        assert!(failed.is_empty(), "derivative checks failed: {failed:#?}");
    }

    /// Every function `tensor::ops` exports is checked, except those that build
    /// constants (`one_hot`) or are not ops (`Mode`).
    #[test]
    fn every_exported_op_has_a_case() {
        let source = include_str!("tensor/ops/mod.rs");
        let names = cases(&Device::Cpu)
            .unwrap()
            .iter()
            .map(|c| c.name)
            .collect::<Vec<_>>();
        let exported: Vec<&str> = source
            .lines()
            .filter(|l| l.starts_with("pub use ") || l.starts_with("pub mod "))
            .flat_map(|l| {
                let inner = l.split_once('{').map_or(l, |(_, rest)| rest);
                inner
                    .split([',', '{', '}', ';', ' ', ':'])
                    .collect::<Vec<_>>()
            })
            .filter(|w| !w.is_empty() && w.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
            .filter(|w| !["pub", "use", "mod", "self", "crate"].contains(w))
            .collect();
        let modules = [
            "activation",
            "dropout",
            "embedding",
            "linear",
            "loss",
            "pooling",
            "softmax",
        ];
        for name in exported {
            if modules.contains(&name) || name == "one_hot" {
                continue;
            }
            if name == "norm" {
                for op in [
                    "layer_norm",
                    "rms_norm",
                    "batch_norm",
                    "batch_norm_with_statistics",
                ] {
                    assert!(names.contains(&op), "norm op `{op}` has no derivative case");
                }
                continue;
            }
            assert!(
                names.iter().any(|n| n.split(' ').next() == Some(name)),
                "op `{name}` has no derivative case"
            );
        }
    }
}
