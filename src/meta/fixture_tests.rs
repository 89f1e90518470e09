//! The learners against the reference fixtures in f64: adapted parameters, query
//! losses, exact MAML meta-gradients for K = 1, 2, 3 in both modes, FOMAML, Reptile
//! and Hessian-vector products. Sizes, K and learning rates come from the fixtures.

use super::{
    hessian_vector_product, Adapter, Fomaml, InnerLoop, Maml, MamlMode, MetaLearner, Reptile,
    TaskOutcome,
};
use crate::data::Episode;
use crate::fixtures::{assert_close, assert_close_or_zero, Fixture};
use crate::models::fixture_tests::{fixture_case, FixtureCase};
use crate::nn::Mode;
use crate::tensor::ParamSet;

const TOLERANCE: f64 = 1e-8;

fn prefixed(fixture: &Fixture, theta: &ParamSet, prefix: &str) -> ParamSet {
    ParamSet::from_pairs(theta.names().map(|n| {
        (
            n.to_string(),
            fixture.tensor(&format!("{prefix}{n}")).clone(),
        )
    }))
    .unwrap()
}

fn assert_params_close(what: &str, actual: &ParamSet, expected: &ParamSet) {
    for ((name, a), (_, e)) in actual.iter().zip(expected.iter()) {
        assert_close_or_zero(&format!("{what}: {name}"), a, e, TOLERANCE);
    }
}

fn scalar(fixture: &Fixture, name: &str) -> f64 {
    fixture.tensor(name).to_vec1::<f64>().unwrap()[0]
}

fn assert_scalar(what: &str, actual: f64, expected: f64) {
    let error = (actual - expected).abs() / expected.abs().max(1e-300);
    assert!(
        error <= TOLERANCE,
        "{what}: {actual} vs {expected} (relative error {error:.3e})"
    );
}

fn inner(case: &FixtureCase, steps: usize) -> InnerLoop {
    InnerLoop::new(
        steps,
        case.fixture.value("/inner_loop/lr").as_f64().unwrap(),
    )
}

fn maml(case: &FixtureCase, steps: usize, mode: MamlMode) -> TaskOutcome {
    let task = episode(case);
    Maml {
        inner: inner(case, steps),
        mode,
    }
    .meta_gradient(case.model.as_ref(), &case.theta0, &task, Mode::Eval)
    .unwrap()
}

fn episode(case: &FixtureCase) -> Episode {
    let n_way = case.fixture.value("/task/n_way").as_u64().unwrap() as usize;
    Episode::new(case.support.clone(), case.query.clone(), n_way).unwrap()
}

fn check_learners(name: &str) {
    check_learners_with(name, None, false);
}

/// The fixture checks, with gradient checkpointing on when `plan` is given and
/// selective recomputation when `selective`.
fn check_learners_with(name: &str, plan: Option<crate::memory::CheckpointPlan>, selective: bool) {
    let Some(mut case) = fixture_case(name) else {
        return;
    };
    if selective {
        case.model.set_selective_recompute(true).unwrap();
    }
    let case = match plan {
        Some(plan) => FixtureCase {
            model: Box::new(crate::memory::Checkpointed::new(case.model, plan).unwrap()),
            ..case
        },
        None => case,
    };
    let fixture = &case.fixture;
    let k = fixture.value("/inner_loop/K").as_u64().unwrap() as usize;
    let task = episode(&case);
    let model = case.model.as_ref();

    // Adaptation: θ_K, the support-loss trajectory, the query logits and loss.
    let learner = Fomaml {
        inner: inner(&case, k),
    };
    let adapted = learner
        .adapt(model, &case.theta0, &case.support, Mode::Eval)
        .unwrap();
    assert_params_close(
        "adapted",
        &adapted,
        &prefixed(fixture, &case.theta0, "adapted."),
    );
    let logits = model.logits(&adapted, &case.query, Mode::Eval).unwrap();
    assert_close(
        "query logits after adaptation",
        &logits,
        fixture.tensor("query_logits_adapted"),
        1e-10,
    );

    let fomaml = learner
        .meta_gradient(model, &case.theta0, &task, Mode::Eval)
        .unwrap();
    let trajectory = fixture
        .tensor("inner_support_loss_trajectory")
        .to_vec1::<f64>()
        .unwrap();
    for (step, loss) in fomaml.support_losses.iter().enumerate() {
        assert_scalar(
            &format!("support loss before step {}", step + 1),
            *loss,
            trajectory[step],
        );
    }
    assert_scalar(
        "query loss after K steps",
        fomaml.query_loss,
        scalar(fixture, "query_loss_adapted"),
    );
    assert_params_close(
        "FOMAML gradient",
        &fomaml.meta_gradient,
        &prefixed(fixture, &case.theta0, "fomaml_grad."),
    );

    // Reptile's meta-direction is θ₀ − θ_K; the fixture stores θ_K − θ₀.
    let reptile = Reptile {
        inner: inner(&case, k),
    }
    .meta_gradient(model, &case.theta0, &task, Mode::Eval)
    .unwrap();
    let delta = prefixed(fixture, &case.theta0, "reptile_delta.");
    assert_params_close(
        "Reptile direction",
        &reptile.meta_gradient,
        &delta.scale(-1.0).unwrap(),
    );

    // Exact MAML for K and 3, in both modes; the two modes agree to rounding.
    for (steps, prefix, loss_name) in [
        (k, "maml_grad.", "query_loss_adapted"),
        (3, "maml_grad_k3.", "query_loss_adapted_k3"),
    ] {
        let expected = prefixed(fixture, &case.theta0, prefix);
        let full = maml(&case, steps, MamlMode::FullGraph);
        let recompute = maml(&case, steps, MamlMode::Recompute);
        assert_params_close(
            &format!("MAML K={steps} full graph"),
            &full.meta_gradient,
            &expected,
        );
        assert_params_close(
            &format!("MAML K={steps} recompute"),
            &recompute.meta_gradient,
            &expected,
        );
        let gap = full
            .meta_gradient
            .sub(&recompute.meta_gradient)
            .unwrap()
            .norm()
            .unwrap()
            / expected.norm().unwrap();
        assert!(gap < 1e-12, "K={steps}: modes differ by {gap:.3e}");
        assert_scalar(
            &format!("query loss K={steps}"),
            full.query_loss,
            scalar(fixture, loss_name),
        );
    }

    // K = 1: the query loss, and the identity maml = g − α·H(θ₀)·g with g = ∇L_q(θ₁).
    for mode in [MamlMode::FullGraph, MamlMode::Recompute] {
        let one = maml(&case, 1, mode);
        assert_scalar(
            "query loss K=1",
            one.query_loss,
            scalar(fixture, "query_loss_adapted_k1"),
        );
        let fo = Fomaml {
            inner: inner(&case, 1),
        }
        .meta_gradient(model, &case.theta0, &task, Mode::Eval)
        .unwrap();
        let hg = hessian_vector_product(
            model,
            &case.theta0,
            &case.support,
            &fo.meta_gradient,
            Mode::Eval,
        )
        .unwrap();
        let identity = fo.meta_gradient.axpy(-inner(&case, 1).lr, &hg).unwrap();
        assert_params_close("MAML K=1 identity", &one.meta_gradient, &identity);
    }

    // The Hessian-vector product at θ₀ over all trainable tensors jointly.
    let v = prefixed(fixture, &case.theta0, "hvp_v.");
    let hv = hessian_vector_product(model, &case.theta0, &case.support, &v, Mode::Eval).unwrap();
    assert_params_close(
        "Hessian-vector product",
        &hv,
        &prefixed(fixture, &case.theta0, "hvp."),
    );
}

#[test]
fn learners_match_bert_fixture() {
    check_learners("bert_lora_maml");
}

#[test]
fn learners_match_gpt2_fixture() {
    check_learners("gpt2_lora_maml");
}

/// Every learner with checkpointing (one layer per segment, and a chosen layer)
/// against the same reference values.
#[test]
fn checkpointed_learners_match_the_transformer_fixtures() {
    use crate::memory::CheckpointPlan;
    check_learners_with("bert_lora_maml", Some(CheckpointPlan::Every(1)), false);
    check_learners_with(
        "gpt2_lora_maml",
        Some(CheckpointPlan::Layers(vec![1])),
        false,
    );
}

/// Every learner with selective recomputation (attention cores and feed-forward
/// blocks rebuilt in the backward pass), alone and inside segments, against the same
/// reference values.
#[test]
fn selective_learners_match_the_transformer_fixtures() {
    use crate::memory::CheckpointPlan;
    check_learners_with("bert_lora_maml", None, true);
    check_learners_with("gpt2_lora_maml", None, true);
    check_learners_with("bert_lora_maml", Some(CheckpointPlan::Every(1)), true);
}

#[test]
fn learners_match_conv4_fixture() {
    check_learners("conv4_maml");
}

/// Builds a learner around a given inner loop.
type LearnerWith = Box<dyn Fn(InnerLoop) -> Box<dyn MetaLearner>>;

/// Gradient accumulation is exact: support (6) and query (9) sets split into
/// micro-batches of 4 give every learner's whole-batch meta-gradient and losses.
#[test]
fn micro_batches_give_whole_batch_results() {
    use super::{HessianApproximation, Melora, MetaSgd};
    let Some(case) = fixture_case("bert_lora_maml") else {
        return;
    };
    let task = episode(&case);
    let model = case.model.as_ref();
    let whole = inner(&case, 2);
    let melora = |approximation| -> LearnerWith {
        Box::new(move |inner| {
            Box::new(Melora {
                inner,
                approximation,
                damping: 0.0,
                clamp: None,
                seed: 3,
            })
        })
    };
    let learners: Vec<(&str, LearnerWith)> = vec![
        (
            "maml full graph",
            Box::new(|inner| {
                Box::new(Maml {
                    inner,
                    mode: MamlMode::FullGraph,
                })
            }),
        ),
        (
            "maml recompute",
            Box::new(|inner| {
                Box::new(Maml {
                    inner,
                    mode: MamlMode::Recompute,
                })
            }),
        ),
        ("fomaml", Box::new(|inner| Box::new(Fomaml { inner }))),
        ("reptile", Box::new(|inner| Box::new(Reptile { inner }))),
        (
            "melora gauss-newton",
            melora(HessianApproximation::GaussNewton),
        ),
        (
            "melora block-diagonal",
            melora(HessianApproximation::BlockDiagonal),
        ),
        (
            "melora hutchinson",
            melora(HessianApproximation::Diagonal {
                probes: 2,
                exact: false,
            }),
        ),
    ];
    for (name, make) in &learners {
        let a = make(whole)
            .meta_gradient(model, &case.theta0, &task, Mode::Eval)
            .unwrap();
        let b = make(whole.with_micro_batch(4))
            .meta_gradient(model, &case.theta0, &task, Mode::Eval)
            .unwrap();
        let gap = a
            .meta_gradient
            .sub(&b.meta_gradient)
            .unwrap()
            .norm()
            .unwrap()
            / a.meta_gradient.norm().unwrap();
        assert!(
            gap < 1e-12,
            "{name}: micro-batched meta-gradient differs by {gap:.3e}"
        );
        assert_scalar(&format!("{name}: query loss"), b.query_loss, a.query_loss);
        for (x, y) in a.support_losses.iter().zip(&b.support_losses) {
            assert_scalar(&format!("{name}: support loss"), *y, *x);
        }
    }
    let sgd = MetaSgd {
        inner: whole,
        mode: MamlMode::Recompute,
    };
    let with = sgd.with_step_sizes(&case.theta0).unwrap();
    let a = sgd.meta_gradient(model, &with, &task, Mode::Eval).unwrap();
    let split = MetaSgd {
        inner: whole.with_micro_batch(4),
        mode: MamlMode::Recompute,
    };
    let b = split
        .meta_gradient(model, &with, &task, Mode::Eval)
        .unwrap();
    assert!(
        a.meta_gradient
            .sub(&b.meta_gradient)
            .unwrap()
            .norm()
            .unwrap()
            < 1e-12 * a.meta_gradient.norm().unwrap()
    );
}

/// Conv4's BatchNorm couples the examples of a batch: splitting is refused, not
/// silently wrong.
#[test]
fn micro_batching_a_batch_coupled_model_is_refused() {
    let Some(case) = fixture_case("conv4_maml") else {
        return;
    };
    let task = episode(&case);
    let learner = Fomaml {
        inner: inner(&case, 1).with_micro_batch(2),
    };
    let err = learner
        .meta_gradient(case.model.as_ref(), &case.theta0, &task, Mode::Eval)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("micro_batch") && err.contains("statistics"),
        "{err}"
    );
}
