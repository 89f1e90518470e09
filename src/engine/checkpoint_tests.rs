//! Checkpointed gradients, Hessian-vector and Gauss-Newton products, and every
//! learner's meta-gradient, against the unsegmented computation in f64.

use candle_core::{DType, Device, Tensor};

use super::*;
use crate::data::{Batch, Episode};
use crate::engine::{
    block_diagonal_product, exact_hessian_diagonal, hessian_vector_product, hutchinson_diagonal,
    WholeGraph,
};
use crate::meta::{
    Fomaml, HessianApproximation, InnerLoop, Maml, MamlMode, Melora, MetaLearner, MetaSgd, Reptile,
};
use crate::models::bert::Bert;
use crate::models::gpt2::Gpt2;
use crate::models::load::builtin;
use crate::models::{LoraSettings, Weights};
use crate::nn::{LoraInit, LoraSpec};
use crate::tensor::gradcheck::random_tensor;
use crate::tensor::test_support::max_abs_diff;
use crate::tensor::{ops, GradGraph};

/// Agreement asked of checkpointed results (float rounding in f64).
const TOLERANCE: f64 = 1e-10;
const CLASSES: usize = 3;

fn lora(dropout: f64) -> LoraSettings {
    LoraSettings {
        spec: LoraSpec {
            rank: 2,
            alpha: 4.0,
            dropout,
        },
        target_modules: None,
        // Non-zero B, so that every LoRA tensor has a non-zero gradient.
        init: LoraInit::Normal { seed: 0, std: 0.3 },
    }
}

/// Seeded frozen weights; the LoRA tensors (std 0.3, see [`lora`]) make the layers
/// clearly non-linear in θ, so the second-order terms are not negligible.
fn weights() -> Weights {
    Weights::random(11, DType::F64, &Device::Cpu)
}

/// A 3-layer BERT (3 layers, so that `every: 2` gives unequal segments).
fn bert(dropout: f64) -> Box<dyn FewShotModel> {
    let config = serde_json::from_value(serde_json::json!({
        "vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 3,
        "num_attention_heads": 2, "intermediate_size": 24, "max_position_embeddings": 16,
    }))
    .unwrap();
    Box::new(Bert::new(config, weights(), Some(lora(dropout)), CLASSES).unwrap())
}

/// A 3-layer GPT-2.
fn gpt2() -> Box<dyn FewShotModel> {
    let config = serde_json::from_value(serde_json::json!({
        "vocab_size": 50, "n_embd": 16, "n_layer": 3, "n_head": 2, "n_positions": 16,
    }))
    .unwrap();
    Box::new(Gpt2::new(config, weights(), Some(lora(0.0)), CLASSES).unwrap())
}

fn tiny(name: &str) -> Box<dyn FewShotModel> {
    builtin(name, 5, DType::F64, Some(lora(0.0)), CLASSES).unwrap()
}

type Build = fn() -> Box<dyn FewShotModel>;

/// The families with a plan of each kind that fits their layer count.
fn cases() -> Vec<(&'static str, Build, Vec<CheckpointPlan>)> {
    let three = || {
        vec![
            CheckpointPlan::Every(1),
            CheckpointPlan::Every(2),
            CheckpointPlan::Layers(vec![1]),
            CheckpointPlan::Layers(vec![2, 0]),
        ]
    };
    let two = || vec![CheckpointPlan::Every(1), CheckpointPlan::Layers(vec![1])];
    vec![
        ("bert", || bert(0.0), three()),
        ("gpt2", gpt2, three()),
        ("distilbert", || tiny("tiny-distilbert"), two()),
        ("t5", || tiny("tiny-t5"), two()),
    ]
}

/// `n` sequences of 6 tokens, every other one padded after 4, labels cycling.
fn batch(n: usize, seed: u32) -> Batch {
    let dev = &Device::Cpu;
    let t = 6;
    let ids: Vec<u32> = (0..n * t)
        .map(|i| (i as u32 * 7 + seed * 13) % 47 + 1)
        .collect();
    let mask: Vec<u32> = (0..n * t)
        .map(|i| u32::from(i / t % 2 == 0 || i % t < 4))
        .collect();
    Batch::from_tokens(
        Tensor::from_vec(ids, (n, t), dev).unwrap(),
        Tensor::from_vec(mask, (n, t), dev).unwrap(),
        None,
        Tensor::from_vec((0..n as u32).map(|i| i % CLASSES as u32).collect(), n, dev).unwrap(),
    )
    .unwrap()
}

fn episode() -> Episode {
    Episode::new(batch(6, 1), batch(6, 2), CLASSES).unwrap()
}

/// A point where no LoRA factor is zero (at initialisation B is, which zeroes the
/// curvature of the A factors and would hide errors in their blocks).
fn random_point(model: &dyn FewShotModel, seed: u64) -> ParamSet {
    random_like(&model.init_params(seed).unwrap(), seed)
        .scale(0.3)
        .unwrap()
}

fn random_like(p: &ParamSet, seed: u64) -> ParamSet {
    p.map(|_, t| random_tensor(t.dims(), seed, t.device()))
        .unwrap()
}

/// ‖a − b‖ / ‖b‖.
fn gap(a: &ParamSet, b: &ParamSet) -> f64 {
    a.sub(b).unwrap().norm().unwrap() / b.norm().unwrap().max(1e-300)
}

fn assert_same(what: &str, actual: &ParamSet, expected: &ParamSet) {
    let g = gap(actual, expected);
    assert!(g <= TOLERANCE, "{what}: relative gap {g:.3e}");
    assert!(expected.norm().unwrap() > 0.0, "{what}: zero reference");
}

/// The learners' classification loss, as a closure-style custom loss: the
/// checkpointed engine with it must agree with the whole graph's [`TaskLoss`].
fn cross_entropy(logits: &Tensor, batch: &Batch) -> crate::Result<Tensor> {
    Ok(ops::cross_entropy(logits, &batch.labels, 0.0)?)
}

fn engine<'a>(model: &'a dyn FewShotModel, plan: &CheckpointPlan) -> Checkpointed<'a> {
    Checkpointed::new(model, plan)
        .unwrap()
        .with_loss(&cross_entropy)
}

#[test]
fn plans_cut_the_stack_into_segments() {
    let model = bert(0.0);
    let layers = |plan: CheckpointPlan| -> Vec<std::ops::Range<usize>> {
        Checkpointed::new(model.as_ref(), &plan)
            .unwrap()
            .segments
            .iter()
            .map(|s| s.layers.clone())
            .collect()
    };
    assert_eq!(layers(CheckpointPlan::Every(1)), [0..0, 0..1, 1..2, 2..3]);
    assert_eq!(layers(CheckpointPlan::Every(2)), [0..0, 0..2, 2..3]);
    assert_eq!(layers(CheckpointPlan::Every(7)), [0..0, 0..3]);
    // Layer 0's input not kept: the embedding is recomputed with layer 0.
    assert_eq!(
        layers(CheckpointPlan::Layers(vec![2, 1, 2])),
        [0..1, 1..2, 2..3]
    );
}

#[test]
fn unknown_layers_and_non_transformers_are_refused_naming_the_fix() {
    let err = Checkpointed::new(bert(0.0).as_ref(), &CheckpointPlan::Layers(vec![0, 3]))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("layer 3") && err.contains("0..=2") && err.contains("checkpointing.layers"),
        "{err}"
    );
    let mlp = builtin("mlp", 0, DType::F64, None, CLASSES).unwrap();
    let err = Checkpointed::new(mlp.as_ref(), &CheckpointPlan::Every(1))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("this model has neither") && err.contains("checkpointing.enabled to false"),
        "{err}"
    );
    let conv4 = builtin("conv4", 0, DType::F64, None, CLASSES).unwrap();
    let err = Checkpointed::new(conv4.as_ref(), &CheckpointPlan::Layers(vec![4]))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("layer 4") && err.contains("0..=3"), "{err}");
    let err = Checkpointed::new(bert(0.0).as_ref(), &CheckpointPlan::Layers(vec![]))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("at least one layer"), "{err}");
}

/// Gradient, loss and logits, for every family and plan, in evaluation and in
/// training mode (LoRA dropout: the recomputed segments must draw the same masks).
#[test]
fn gradients_equal_the_unsegmented_ones() {
    let b = batch(5, 3);
    type Run = (String, Box<dyn FewShotModel>, Vec<CheckpointPlan>, Mode);
    let mut runs: Vec<Run> = cases()
        .into_iter()
        .map(|(name, build, plans)| (name.to_string(), build(), plans, Mode::Eval))
        .collect();
    runs.push((
        "bert with dropout".into(),
        bert(0.2),
        vec![CheckpointPlan::Every(1), CheckpointPlan::Layers(vec![2])],
        Mode::Train { seed: 9 },
    ));
    for (name, model, plans, mode) in runs {
        let theta = model.init_params(3).unwrap();
        let leaves = theta.to_leaves().unwrap();
        let logits = model.logits(&leaves, &b, mode).unwrap();
        let loss = ops::cross_entropy(&logits, &b.labels, 0.0).unwrap();
        let expected = leaves.gradients(&loss, GradGraph::Detach).unwrap();
        for plan in plans {
            let what = format!("{name} {plan:?}");
            let got = engine(model.as_ref(), &plan)
                .gradient(&theta, &b, mode)
                .unwrap();
            assert_same(&what, &got.grads, &expected);
            let loss_gap =
                (got.loss.to_scalar::<f64>().unwrap() - loss.to_scalar::<f64>().unwrap()).abs();
            assert!(loss_gap < 1e-13, "{what}: loss differs by {loss_gap}");
            let logits_gap = max_abs_diff(&got.logits, &logits);
            assert!(logits_gap < 1e-13, "{what}: logits differ by {logits_gap}");
        }
    }
}

/// H·v for several vectors at once (one sweep), and more vectors than one sweep
/// carries, against Pearlmutter's product on the whole graph.
#[test]
fn hessian_vector_products_equal_the_unsegmented_ones() {
    let b = batch(4, 5);
    for (name, build, plans) in cases() {
        let model = build();
        let theta = model.init_params(4).unwrap();
        let count = if name == "bert" { TANGENT_GROUP + 2 } else { 2 };
        let vs: Vec<ParamSet> = (0..count)
            .map(|i| random_like(&theta, 100 + i as u64))
            .collect();
        let expected: Vec<ParamSet> = vs
            .iter()
            .map(|v| {
                hessian_vector_product(&WholeGraph::new(model.as_ref()), &theta, &b, v, Mode::Eval)
                    .unwrap()
            })
            .collect();
        let leaves = theta.to_leaves().unwrap();
        let loss = ops::cross_entropy(
            &model.logits(&leaves, &b, Mode::Eval).unwrap(),
            &b.labels,
            0.0,
        )
        .unwrap();
        let gradient = leaves.gradients(&loss, GradGraph::Detach).unwrap();
        for plan in plans {
            let what = format!("{name} {plan:?}");
            let (g, products) = engine(model.as_ref(), &plan)
                .gradient_and_hvps(&theta, &b, &vs, Mode::Eval)
                .unwrap();
            assert_same(&format!("{what}: gradient"), &g, &gradient);
            assert_eq!(products.len(), vs.len());
            for (i, (hv, e)) in products.iter().zip(&expected).enumerate() {
                assert_same(&format!("{what}: H·v{i}"), hv, e);
            }
        }
    }
}

/// The curvature products MELoRA uses, through a checkpointed model against the
/// plain one.
#[test]
fn curvature_products_equal_the_unsegmented_ones() {
    let b = batch(4, 7);
    for (name, build, plans) in cases() {
        let plain = build();
        let theta = random_point(plain.as_ref(), 6);
        let v = random_like(&theta, 8);
        let whole = WholeGraph::new(plain.as_ref());
        let expected = [
            whole
                .gauss_newton_product(&theta, &b, &v, Mode::Eval)
                .unwrap(),
            block_diagonal_product(&whole, &theta, &b, &v, Mode::Eval).unwrap(),
            hutchinson_diagonal(&whole, &theta, &b, 3, 17, Mode::Eval).unwrap(),
        ];
        // The exact diagonal costs one product per entry: two tensors suffice.
        let names: Vec<String> = theta
            .names()
            .filter(|n| n.contains("layer.1") || n.contains("h.1") || n.contains("block.1"))
            .take(1)
            .chain([crate::models::HEAD_BIAS])
            .map(String::from)
            .collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        assert_eq!(names.len(), 2, "{name}: {names:?}");
        let diagonal =
            exact_hessian_diagonal(&whole, &theta, &b, Some(&names), Mode::Eval).unwrap();
        for plan in plans.into_iter().take(2) {
            let what = format!("{name} {plan:?}");
            let built = build();
            let model = Checkpointed::new(built.as_ref(), &plan).unwrap();
            let got = [
                model
                    .gauss_newton_product(&theta, &b, &v, Mode::Eval)
                    .unwrap(),
                block_diagonal_product(&model, &theta, &b, &v, Mode::Eval).unwrap(),
                hutchinson_diagonal(&model, &theta, &b, 3, 17, Mode::Eval).unwrap(),
            ];
            for ((kind, g), e) in ["gauss-newton", "block-diagonal", "hutchinson"]
                .iter()
                .zip(&got)
                .zip(&expected)
            {
                assert_same(&format!("{what}: {kind}"), g, e);
            }
            let d = exact_hessian_diagonal(&model, &theta, &b, Some(&names), Mode::Eval).unwrap();
            assert_same(&format!("{what}: exact diagonal"), &d, &diagonal);
        }
    }
}

/// Block products start each probe's sweeps at the first segment reading its tensor
/// and stop them there: with every plan (segments of one layer, of several, uneven),
/// the blocks equal the unsegmented ones.
#[test]
fn block_products_equal_the_unsegmented_blocks_with_every_plan() {
    let b = batch(4, 3);
    for (name, build, plans) in cases() {
        let plain = build();
        let theta = random_point(plain.as_ref(), 2);
        let v = random_like(&theta, 4);
        let whole = WholeGraph::new(plain.as_ref());
        let expected = block_diagonal_product(&whole, &theta, &b, &v, Mode::Eval).unwrap();
        for plan in plans {
            let built = build();
            let model = Checkpointed::new(built.as_ref(), &plan).unwrap();
            let got = block_diagonal_product(&model, &theta, &b, &v, Mode::Eval).unwrap();
            // Tensor by tensor: the head's block would hide a wrong layer block.
            for tensor in expected.names() {
                let one = |p: &ParamSet| {
                    ParamSet::from_pairs([(tensor, p.get(tensor).unwrap().clone())]).unwrap()
                };
                let what = format!("{name} {plan:?}: block of {tensor}");
                assert_same(&what, &one(&got), &one(&expected));
            }
        }
    }
}

/// Every learner, with K = 2 inner steps: FOMAML, Reptile, MAML in both modes (one
/// with micro-batches) and MELoRA with each Hessian approximation.
fn learners() -> Vec<(&'static str, Box<dyn MetaLearner>)> {
    let inner = InnerLoop::new(2, 0.3);
    let melora = |approximation| Melora {
        inner,
        approximation,
        damping: 0.0,
        clamp: None,
        seed: 3,
    };
    vec![
        ("fomaml", Box::new(Fomaml { inner })),
        ("reptile", Box::new(Reptile { inner })),
        (
            "maml full-graph",
            Box::new(Maml {
                inner,
                mode: MamlMode::FullGraph,
            }),
        ),
        (
            "maml recompute",
            Box::new(Maml {
                inner,
                mode: MamlMode::Recompute,
            }),
        ),
        (
            "maml recompute, micro-batches of 4",
            Box::new(Maml {
                inner: inner.with_micro_batch(4),
                mode: MamlMode::Recompute,
            }),
        ),
        (
            "melora gauss-newton",
            Box::new(melora(HessianApproximation::GaussNewton)),
        ),
        (
            "melora block-diagonal",
            Box::new(melora(HessianApproximation::BlockDiagonal)),
        ),
        (
            "melora hutchinson",
            Box::new(melora(HessianApproximation::Diagonal {
                probes: 2,
                exact: false,
            })),
        ),
    ]
}

/// Every learner's meta-gradient (and outcome) with checkpointing equals the one
/// without, for BERT and GPT-2 and plans of each kind, with and without micro-batches.
#[test]
fn meta_gradients_equal_the_unsegmented_ones() {
    let task = episode();
    let learners = learners();
    let builds: [(&str, Build); 2] = [("bert", || bert(0.0)), ("gpt2", gpt2)];
    for (family, build) in builds {
        let plain = build();
        let params = plain.init_params(2).unwrap();
        for (name, learner) in &learners {
            let expected = learner
                .meta_gradient(&WholeGraph::new(plain.as_ref()), &params, &task, Mode::Eval)
                .unwrap();
            for plan in [CheckpointPlan::Every(1), CheckpointPlan::Layers(vec![1])] {
                let what = format!("{family} {name} {plan:?}");
                let built = build();
                let model = Checkpointed::new(built.as_ref(), &plan).unwrap();
                let got = learner
                    .meta_gradient(&model, &params, &task, Mode::Eval)
                    .unwrap();
                assert_same(&what, &got.meta_gradient, &expected.meta_gradient);
                assert!(
                    (got.query_loss - expected.query_loss).abs() < 1e-12,
                    "{what}"
                );
                assert_eq!(got.query_accuracy, expected.query_accuracy, "{what}");
                for (a, e) in got.support_losses.iter().zip(&expected.support_losses) {
                    assert!((a - e).abs() < 1e-12, "{what}: support loss {a} vs {e}");
                }
            }
        }
    }
}

/// MELoRA with the exact diagonal (one Hessian-vector product per entry) on a BERT
/// small enough for that, and MetaSGD, whose step sizes' gradient uses the
/// checkpointed gradient beside the products.
#[test]
fn exact_diagonal_melora_and_meta_sgd_equal_the_unsegmented_ones() {
    let small = || -> Box<dyn FewShotModel> {
        let config = serde_json::from_value(serde_json::json!({
            "vocab_size": 50, "hidden_size": 4, "num_hidden_layers": 2,
            "num_attention_heads": 2, "intermediate_size": 6, "max_position_embeddings": 16,
        }))
        .unwrap();
        let mut settings = lora(0.0);
        settings.spec.rank = 1;
        Box::new(Bert::new(config, weights(), Some(settings), CLASSES).unwrap())
    };
    let task = episode();
    let inner = InnerLoop::new(2, 0.3);
    let plain = small();
    let params = plain.init_params(2).unwrap();
    let exact = Melora {
        inner,
        approximation: HessianApproximation::Diagonal {
            probes: 1,
            exact: true,
        },
        damping: 0.1,
        clamp: None,
        seed: 0,
    };
    let meta_sgd = MetaSgd {
        inner,
        mode: MamlMode::Recompute,
    };
    let with_sizes = meta_sgd.with_step_sizes(&params).unwrap();
    let expected = (
        exact
            .meta_gradient(&WholeGraph::new(plain.as_ref()), &params, &task, Mode::Eval)
            .unwrap(),
        meta_sgd
            .meta_gradient(
                &WholeGraph::new(plain.as_ref()),
                &with_sizes,
                &task,
                Mode::Eval,
            )
            .unwrap(),
    );
    let built = small();
    let model = Checkpointed::new(built.as_ref(), &CheckpointPlan::Every(1)).unwrap();
    let got = exact
        .meta_gradient(&model, &params, &task, Mode::Eval)
        .unwrap();
    assert_same(
        "melora exact diagonal",
        &got.meta_gradient,
        &expected.0.meta_gradient,
    );
    let got = meta_sgd
        .meta_gradient(&model, &with_sizes, &task, Mode::Eval)
        .unwrap();
    assert_same(
        "meta-sgd recompute",
        &got.meta_gradient,
        &expected.1.meta_gradient,
    );
}

/// A 2-layer T5 with a plain ReLU feed-forward block (T5 v1.0).
fn t5_relu() -> Box<dyn FewShotModel> {
    let config = serde_json::from_value(serde_json::json!({
        "vocab_size": 50, "d_model": 16, "d_kv": 8, "d_ff": 24, "num_layers": 2,
        "num_heads": 2, "feed_forward_proj": "relu",
    }))
    .unwrap();
    Box::new(
        crate::models::t5::T5Encoder::new(config, weights(), Some(lora(0.0)), CLASSES).unwrap(),
    )
}

/// A BERT with adapters on its feed-forward blocks too: those blocks run as they
/// are (their LoRA branches need their inputs); the attention cores are recomputed.
fn bert_ffn_adapted() -> Box<dyn FewShotModel> {
    let config = serde_json::from_value(serde_json::json!({
        "vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 2,
        "num_attention_heads": 2, "intermediate_size": 24, "max_position_embeddings": 16,
    }))
    .unwrap();
    let mut settings = lora(0.0);
    settings.target_modules = Some(vec!["query".into(), "intermediate.dense".into()]);
    Box::new(Bert::new(config, weights(), Some(settings), CLASSES).unwrap())
}

fn selective(mut model: Box<dyn FewShotModel>) -> Box<dyn FewShotModel> {
    model.set_selective_recompute(true).unwrap();
    model
}

/// Selective recomputation (attention cores and adapter-free feed-forward blocks
/// rebuilt in the backward pass), alone and inside checkpointed segments: every
/// learner's meta-gradient and outcome equal the plain model's, for every family
/// (T5 gated and plain), and for a model whose feed-forward blocks carry adapters.
#[test]
fn selective_recomputation_gives_the_same_meta_gradients() {
    let task = episode();
    let learners = learners();
    let builds: [(&str, Build); 6] = [
        ("bert", || bert(0.0)),
        ("gpt2", gpt2),
        ("distilbert", || tiny("tiny-distilbert")),
        ("t5 gated-gelu", || tiny("tiny-t5")),
        ("t5 relu", t5_relu),
        ("bert, feed-forward adapted", bert_ffn_adapted),
    ];
    for (family, build) in builds {
        let plain = build();
        let params = plain.init_params(2).unwrap();
        let (alone, segmented) = (selective(build()), selective(build()));
        let variants: [(&str, Box<dyn GradEngine>); 2] = [
            ("selective", Box::new(WholeGraph::new(alone.as_ref()))),
            (
                "selective in segments",
                Box::new(Checkpointed::new(segmented.as_ref(), &CheckpointPlan::Every(1)).unwrap()),
            ),
        ];
        for (name, learner) in &learners {
            let expected = learner
                .meta_gradient(&WholeGraph::new(plain.as_ref()), &params, &task, Mode::Eval)
                .unwrap();
            for (variant, engine) in &variants {
                let what = format!("{family} {name} {variant}");
                let got = learner
                    .meta_gradient(engine.as_ref(), &params, &task, Mode::Eval)
                    .unwrap();
                assert_same(&what, &got.meta_gradient, &expected.meta_gradient);
                assert!(
                    (got.query_loss - expected.query_loss).abs() < 1e-12,
                    "{what}"
                );
                for (a, e) in got.support_losses.iter().zip(&expected.support_losses) {
                    assert!((a - e).abs() < 1e-12, "{what}: support loss {a} vs {e}");
                }
            }
        }
    }
}

/// With LoRA dropout (training mode), the recomputed blocks see the same masks: the
/// gradient equals the plain model's.
#[test]
fn selective_recomputation_keeps_dropout_masks() {
    let b = batch(4, 3);
    let mode = Mode::Train { seed: 9 };
    let plain = bert(0.2);
    let model = selective(bert(0.2));
    let theta = plain.init_params(3).unwrap();
    let gradient = |m: &dyn FewShotModel| {
        let leaves = theta.to_leaves().unwrap();
        let loss =
            ops::cross_entropy(&m.logits(&leaves, &b, mode).unwrap(), &b.labels, 0.0).unwrap();
        leaves.gradients(&loss, GradGraph::Detach).unwrap()
    };
    assert_same(
        "bert with dropout",
        &gradient(model.as_ref()),
        &gradient(plain.as_ref()),
    );
}

/// Models that are not transformer stacks refuse selective recomputation, naming
/// the setting.
#[test]
fn selective_recomputation_of_a_non_transformer_is_refused() {
    let mut conv4 = builtin("conv4", 0, DType::F64, None, CLASSES).unwrap();
    let err = conv4.set_selective_recompute(true).unwrap_err().to_string();
    assert!(err.contains("checkpointing.selective to false"), "{err}");
}

/// The vision backbone `name` for grey 16×16 images, in f64.
fn backbone(name: &str) -> Box<dyn FewShotModel> {
    crate::models::Backbone::from_name(name)
        .unwrap()
        .build(
            crate::models::ImageShape {
                channels: 1,
                side: 16,
            },
            CLASSES,
            DType::F64,
            &Device::Cpu,
        )
        .unwrap()
}

/// `n` random grey 16×16 images, labels cycling.
fn image_batch(n: usize, seed: u64) -> Batch {
    let x = random_tensor(&[n, 1, 16, 16], seed, &Device::Cpu).unwrap();
    let labels = (0..n as u32).map(|i| i % CLASSES as u32).collect();
    Batch::from_dense(x, Tensor::from_vec(labels, n, &Device::Cpu).unwrap()).unwrap()
}

/// Vision backbones are checkpointed per stage (Conv4's blocks, ResNet-18's four
/// stages after the stem): gradients, Hessian-vector products and the second-order
/// meta-gradients of MAML's recompute mode and MELoRA equal the unsegmented ones.
/// BatchNorm's batch statistics are recomputed on the same batch, so they agree too.
#[test]
fn vision_backbones_are_checkpointed_per_stage() {
    let b = image_batch(6, 1);
    let task = Episode::new(image_batch(6, 2), image_batch(6, 3), CLASSES).unwrap();
    let inner = InnerLoop::new(1, 0.1);
    let meta: [(&str, Box<dyn MetaLearner>); 2] = [
        (
            "maml recompute",
            Box::new(Maml {
                inner,
                mode: MamlMode::Recompute,
            }),
        ),
        (
            "melora gauss-newton",
            Box::new(Melora {
                inner,
                approximation: HessianApproximation::GaussNewton,
                damping: 0.0,
                clamp: None,
                seed: 3,
            }),
        ),
    ];
    for (name, plans) in [
        (
            "conv4",
            vec![CheckpointPlan::Every(1), CheckpointPlan::Layers(vec![2])],
        ),
        ("resnet18", vec![CheckpointPlan::Every(2)]),
    ] {
        let model = backbone(name);
        let theta = model.init_params(4).unwrap();
        let leaves = theta.to_leaves().unwrap();
        let loss = ops::cross_entropy(
            &model.logits(&leaves, &b, Mode::Eval).unwrap(),
            &b.labels,
            0.0,
        )
        .unwrap();
        let gradient = leaves.gradients(&loss, GradGraph::Detach).unwrap();
        let v = random_like(&theta, 7);
        let hv =
            hessian_vector_product(&WholeGraph::new(model.as_ref()), &theta, &b, &v, Mode::Eval)
                .unwrap();
        let expected: Vec<ParamSet> = meta
            .iter()
            .map(|(_, learner)| {
                learner
                    .meta_gradient(&WholeGraph::new(model.as_ref()), &theta, &task, Mode::Eval)
                    .unwrap()
                    .meta_gradient
            })
            .collect();
        for plan in plans {
            let what = format!("{name} {plan:?}");
            let (g, products) = engine(model.as_ref(), &plan)
                .gradient_and_hvps(&theta, &b, std::slice::from_ref(&v), Mode::Eval)
                .unwrap();
            assert_same(&format!("{what}: gradient"), &g, &gradient);
            assert_same(&format!("{what}: H·v"), &products[0], &hv);
            let checkpointed = Checkpointed::new(model.as_ref(), &plan).unwrap();
            for ((learner_name, learner), e) in meta.iter().zip(&expected) {
                let got = learner
                    .meta_gradient(&checkpointed, &theta, &task, Mode::Eval)
                    .unwrap();
                assert_same(&format!("{what}: {learner_name}"), &got.meta_gradient, e);
            }
        }
    }
}

/// The metric learners (ProtoNets, FS-CT with VIC) pull their embeddings' adjoints
/// back through a checkpointed backbone one stage at a time: their meta-gradients
/// equal the whole graph's, on Conv4 per block and on ResNet-18 per two stages, and
/// on a transformer stack per layer.
#[test]
fn metric_learners_are_checkpointed() {
    use crate::meta::{Distance, FsctLearner, ProtoNet, VicWeights};
    use crate::models::fsct::{FsctAttention, FsctConfig};
    let task = Episode::new(image_batch(6, 2), image_batch(6, 3), CLASSES).unwrap();
    let fsct = FsctLearner {
        head: FsctConfig {
            heads: 2,
            dim_head: 3,
            mlp_dim: 4,
            attention: FsctAttention::Cosine,
            ..FsctConfig::new(1, CLASSES, 2)
        },
        weights: VicWeights {
            cross_entropy: 1.0,
            variance: 1.0,
            covariance: 0.04,
        },
    };
    for (name, plan) in [
        ("conv4", CheckpointPlan::Every(1)),
        ("resnet18", CheckpointPlan::Every(2)),
    ] {
        let model = backbone(name);
        let mut theta = model.init_params(4).unwrap();
        fsct.init_head(&mut theta, 5).unwrap();
        let checkpointed = Checkpointed::new(model.as_ref(), &plan).unwrap();
        let learners: [(&str, &dyn MetaLearner); 2] = [
            (
                "protonet",
                &ProtoNet {
                    distance: Distance::SquaredEuclidean,
                },
            ),
            ("fsct", &fsct),
        ];
        for (learner_name, learner) in learners {
            let whole = learner
                .meta_gradient(&WholeGraph::new(model.as_ref()), &theta, &task, Mode::Eval)
                .unwrap();
            let got = learner
                .meta_gradient(&checkpointed, &theta, &task, Mode::Eval)
                .unwrap();
            let what = format!("{name} {plan:?}: {learner_name}");
            assert_same(&what, &got.meta_gradient, &whole.meta_gradient);
            assert!((got.query_loss - whole.query_loss).abs() < 1e-12, "{what}");
        }
    }
    // A transformer: ProtoNets on pooled text features, a segment per layer.
    let model = bert(0.0);
    let theta = model.init_params(6).unwrap();
    let text = Episode::new(batch(6, 4), batch(6, 5), CLASSES).unwrap();
    let learner = ProtoNet {
        distance: Distance::SquaredEuclidean,
    };
    let whole = learner
        .meta_gradient(&WholeGraph::new(model.as_ref()), &theta, &text, Mode::Eval)
        .unwrap();
    let checkpointed = Checkpointed::new(model.as_ref(), &CheckpointPlan::Every(1)).unwrap();
    let got = learner
        .meta_gradient(&checkpointed, &theta, &text, Mode::Eval)
        .unwrap();
    assert_same("bert: protonet", &got.meta_gradient, &whole.meta_gradient);
}
