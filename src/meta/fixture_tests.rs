//! The learners against the reference fixtures in f64: adapted parameters, query
//! losses, exact MAML meta-gradients for the fixture's K and extra step counts in
//! both modes, FOMAML, Reptile and Hessian-vector products. Sizes, K, the extra
//! step counts (`extra_k`, `extra_maml_k`) and learning rates come from the
//! fixtures' JSON.

use super::{Adapter, Fomaml, InnerLoop, Maml, MamlMode, MetaLearner, Reptile, TaskOutcome};
use crate::data::Episode;
use crate::engine::{hessian_vector_product, CheckpointPlan, Checkpointed, GradEngine, WholeGraph};
use crate::fixtures::{assert_close, assert_close_or_zero, Fixture};
use crate::models::fixture_tests::{copy_fixture, fixture_case, save_fixture, FixtureCase};
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

fn maml(engine: &dyn GradEngine, case: &FixtureCase, steps: usize, mode: MamlMode) -> TaskOutcome {
    let task = episode(case);
    Maml {
        inner: inner(case, steps),
        mode,
    }
    .meta_gradient(engine, &case.theta0, &task, Mode::Eval)
    .unwrap()
}

fn episode(case: &FixtureCase) -> Episode {
    let n_way = case.fixture.value("/task/n_way").as_u64().unwrap() as usize;
    Episode::new(case.support.clone(), case.query.clone(), n_way).unwrap()
}

/// The inner-step counts listed at `key` in the fixture's JSON (`/extra_k`,
/// `/extra_maml_k`).
fn step_counts(fixture: &Fixture, key: &str) -> Vec<usize> {
    fixture
        .value(key)
        .as_array()
        .unwrap_or_else(|| panic!("fixture `{key}` is not a list"))
        .iter()
        .map(|v| v.as_u64().expect("a step count") as usize)
        .collect()
}

fn check_learners(name: &str) {
    check_learners_with(name, None, false);
}

/// The fixture checks on fixture `name`, with gradient checkpointing on when
/// `plan` is given and selective recomputation when `selective`.
fn check_learners_with(name: &str, plan: Option<CheckpointPlan>, selective: bool) {
    if let Some(case) = fixture_case(name) {
        check_case(case, plan, selective);
    }
}

/// The fixture checks on `case`.
fn check_case(mut case: FixtureCase, plan: Option<CheckpointPlan>, selective: bool) {
    if selective {
        case.model.set_selective_recompute(true).unwrap();
    }
    let fixture = &case.fixture;
    let k = fixture.value("/inner_loop/K").as_u64().unwrap() as usize;
    let task = episode(&case);
    let model = case.model.as_ref();
    let engine: Box<dyn GradEngine> = match &plan {
        Some(plan) => Box::new(Checkpointed::new(model, plan).unwrap()),
        None => Box::new(WholeGraph::new(model)),
    };
    let engine = engine.as_ref();

    // Adaptation: θ_K, the support-loss trajectory, the query logits and loss.
    let learner = Fomaml {
        inner: inner(&case, k),
    };
    let adapted = learner
        .adapt(engine, &case.theta0, &case.support, Mode::Eval)
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
        .meta_gradient(engine, &case.theta0, &task, Mode::Eval)
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
    .meta_gradient(engine, &case.theta0, &task, Mode::Eval)
    .unwrap();
    let delta = prefixed(fixture, &case.theta0, "reptile_delta.");
    assert_params_close(
        "Reptile direction",
        &reptile.meta_gradient,
        &delta.scale(-1.0).unwrap(),
    );

    // Exact MAML for K and each of the JSON's `extra_maml_k`, in both modes; the two
    // modes agree to rounding.
    let gradients = std::iter::once((k, "maml_grad.".to_owned())).chain(
        step_counts(fixture, "/extra_maml_k")
            .into_iter()
            .map(|steps| (steps, format!("maml_grad_k{steps}."))),
    );
    for (steps, prefix) in gradients {
        let expected = prefixed(fixture, &case.theta0, &prefix);
        let full = maml(engine, &case, steps, MamlMode::FullGraph);
        let recompute = maml(engine, &case, steps, MamlMode::Recompute);
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
        if steps == k {
            assert_scalar(
                &format!("query loss K={steps}"),
                full.query_loss,
                scalar(fixture, "query_loss_adapted"),
            );
        }
    }

    // The query loss after each of the JSON's `extra_k` inner-step counts.
    for steps in step_counts(fixture, "/extra_k") {
        for mode in [MamlMode::FullGraph, MamlMode::Recompute] {
            assert_scalar(
                &format!("query loss K={steps} ({mode:?})"),
                maml(engine, &case, steps, mode).query_loss,
                scalar(fixture, &format!("query_loss_adapted_k{steps}")),
            );
        }
    }

    // K = 1, whatever the fixture's step counts: the identity
    // maml = g − α·H(θ₀)·g with g = ∇L_q(θ₁).
    for mode in [MamlMode::FullGraph, MamlMode::Recompute] {
        let one = maml(engine, &case, 1, mode);
        let fo = Fomaml {
            inner: inner(&case, 1),
        }
        .meta_gradient(engine, &case.theta0, &task, Mode::Eval)
        .unwrap();
        let hg = hessian_vector_product(
            engine,
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
    let hv = hessian_vector_product(engine, &case.theta0, &case.support, &v, Mode::Eval).unwrap();
    assert_params_close(
        "Hessian-vector product",
        &hv,
        &prefixed(fixture, &case.theta0, "hvp."),
    );
}

/// Fixture `name` copied into `dir` under a neutral name as another fixture of
/// the same format: its extra step counts replaced by K itself (`extra_k` and
/// `extra_maml_k` = [K], the K-step tensors under the `_k{K}` names, the former
/// extras' tensors removed).
fn variant_with_extras_at_k(name: &str, dir: &std::path::Path) -> Option<FixtureCase> {
    let mut fixture = copy_fixture(name, dir, "variant")?;
    let k = fixture.value("/inner_loop/K").as_u64().unwrap();
    let extras = |key: &str| -> Vec<u64> {
        let list = fixture.value(key).as_array().unwrap();
        list.iter().map(|v| v.as_u64().unwrap()).collect()
    };
    let (losses, gradients) = (extras("/extra_k"), extras("/extra_maml_k"));
    assert!(!losses.contains(&k) && !gradients.contains(&k));
    let renamed: Vec<(String, String)> = fixture
        .tensors
        .keys()
        .filter_map(|key| {
            let old = losses
                .iter()
                .any(|e| key == &format!("query_loss_adapted_k{e}"))
                || gradients
                    .iter()
                    .any(|e| key.starts_with(&format!("maml_grad_k{e}.")));
            if old {
                Some((key.clone(), String::new()))
            } else if key == "query_loss_adapted" {
                Some((key.clone(), format!("query_loss_adapted_k{k}")))
            } else {
                key.strip_prefix("maml_grad.")
                    .map(|p| (key.clone(), format!("maml_grad_k{k}.{p}")))
            }
        })
        .collect();
    for (from, to) in renamed {
        let entry = fixture.json["tensors"][&from].clone();
        if to.is_empty() {
            fixture.tensors.remove(&from);
            fixture.json["tensors"]
                .as_object_mut()
                .unwrap()
                .remove(&from);
        } else {
            let tensor = fixture.tensors[&from].clone();
            fixture.tensors.insert(to.clone(), tensor);
            fixture.json["tensors"][&to] = entry;
        }
    }
    fixture.json["extra_k"] = serde_json::json!([k]);
    fixture.json["extra_maml_k"] = serde_json::json!([k]);
    Some(FixtureCase::new(save_fixture(fixture, dir, "variant")))
}

/// Another fixture of the same format, under another name and with other extra
/// step counts, runs through the same checks unchanged: step counts come from the
/// JSON.
#[test]
fn learners_match_a_fixture_of_the_same_format_with_other_extras() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["gpt2_lora_maml", "conv4_maml"] {
        if let Some(case) = variant_with_extras_at_k(name, dir.path()) {
            check_case(case, None, false);
        }
    }
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
    let engine = &WholeGraph::new(model);
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
            .meta_gradient(engine, &case.theta0, &task, Mode::Eval)
            .unwrap();
        let b = make(whole.with_micro_batch(4))
            .meta_gradient(engine, &case.theta0, &task, Mode::Eval)
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
    let a = sgd.meta_gradient(engine, &with, &task, Mode::Eval).unwrap();
    let split = MetaSgd {
        inner: whole.with_micro_batch(4),
        mode: MamlMode::Recompute,
    };
    let b = split
        .meta_gradient(engine, &with, &task, Mode::Eval)
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
        .meta_gradient(
            &WholeGraph::new(case.model.as_ref()),
            &case.theta0,
            &task,
            Mode::Eval,
        )
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("micro_batch") && err.contains("statistics"),
        "{err}"
    );
}
