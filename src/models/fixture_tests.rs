//! The models against the reference fixtures (`../shared/fixtures`): base weights
//! loaded by their Hugging Face names, LoRA tensors by PEFT's names, and the support
//! set's hidden states, pooled features, logits, loss and every gradient at θ₀
//! compared in f64. What a fixture is (its model family, every size) comes from its
//! JSON, never from its file name, so another fixture of the same format runs as is.

use std::collections::HashMap;

use candle_core::{DType, Tensor};

use super::bert::{Bert, BertConfig};
use super::convnet::{ConvNet, ConvNetConfig};
use super::gpt2::{Gpt2, Gpt2Config};
use super::{FewShotModel, LoraSettings, Weights};
use crate::data::Batch;
use crate::fixtures::{self, assert_close, assert_close_or_zero, Fixture};
use crate::nn::{LoraInit, LoraSpec, Mode};
use crate::tensor::{ops, GradGraph, ParamSet};

/// The model families of the MAML-family fixtures, told apart by the keys of the
/// JSON's `model_config` (which has no `model_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Family {
    Bert,
    Gpt2,
    Conv4,
}

impl Family {
    pub(crate) fn of(fixture: &Fixture) -> Family {
        let config = fixture.value("/model_config");
        let has = |key: &str| config.get(key).is_some();
        if has("n_embd") && has("n_layer") {
            Family::Gpt2
        } else if has("hidden_size") && has("num_hidden_layers") {
            Family::Bert
        } else if has("channels") {
            Family::Conv4
        } else {
            panic!(
                "fixture `model_config` {config} is none of BERT (hidden_size, \
                 num_hidden_layers), GPT-2 (n_embd, n_layer) or Conv4 (channels)"
            )
        }
    }
}

/// A MAML-family fixture ready to use: its family, the model built on its base
/// weights, θ₀, and the task's support and query sets.
pub(crate) struct FixtureCase {
    pub fixture: Fixture,
    pub family: Family,
    pub model: Box<dyn FewShotModel>,
    pub theta0: ParamSet,
    pub support: Batch,
    pub query: Batch,
}

/// The fixture stored as `name` (`bert_lora_maml`, `gpt2_lora_maml`,
/// `conv4_maml`, ...), or `None` where the fixtures are absent.
pub(crate) fn fixture_case(name: &str) -> Option<FixtureCase> {
    fixtures::load(name).map(FixtureCase::new)
}

impl FixtureCase {
    /// The case of any fixture of the MAML-family format.
    pub(crate) fn new(fixture: Fixture) -> FixtureCase {
        let family = Family::of(&fixture);
        let n_way = fixture.value("/task/n_way").as_u64().unwrap() as usize;
        let model: Box<dyn FewShotModel> = match family {
            Family::Bert => Box::new(
                Bert::new(
                    model_config::<BertConfig>(&fixture, "hidden_act"),
                    base_weights(&fixture),
                    Some(lora_settings(&fixture)),
                    n_way,
                )
                .unwrap(),
            ),
            Family::Gpt2 => Box::new(
                Gpt2::new(
                    model_config::<Gpt2Config>(&fixture, "activation_function"),
                    base_weights(&fixture),
                    Some(lora_settings(&fixture)),
                    n_way,
                )
                .unwrap(),
            ),
            Family::Conv4 => {
                // Images are [N, C, H, W]: channels and size from the data itself.
                let (_, in_channels, height, width) =
                    fixture.tensor("support_images").dims4().unwrap();
                assert_eq!(height, width, "Conv4 takes square images");
                let config = ConvNetConfig {
                    blocks: 4,
                    in_channels,
                    channels: fixture.value("/model_config/channels").as_u64().unwrap() as usize,
                    image_size: height,
                    bn_eps: fixture.value("/model_config/bn_eps").as_f64().unwrap(),
                };
                Box::new(
                    ConvNet::new(config, n_way, DType::F64, &crate::fixtures::test_device())
                        .unwrap(),
                )
            }
        };
        let (support, query) = (
            batch(&fixture, family, "support"),
            batch(&fixture, family, "query"),
        );
        let theta0 = theta0(&fixture);
        FixtureCase {
            fixture,
            family,
            model,
            theta0,
            support,
            query,
        }
    }
}

/// The `set` (`support` or `query`) batch: images for Conv4, tokens for the
/// transformers (with token types where the fixture has them).
fn batch(fixture: &Fixture, family: Family, set: &str) -> Batch {
    let tensor = |what: &str| fixture.tensor(&format!("{set}_{what}")).clone();
    match family {
        Family::Conv4 => Batch::from_dense(tensor("images"), tensor("labels")).unwrap(),
        Family::Bert | Family::Gpt2 => Batch::from_tokens(
            tensor("input_ids"),
            tensor("attention_mask"),
            fixture
                .tensors
                .get(&format!("{set}_token_type_ids"))
                .cloned(),
            tensor("labels"),
        )
        .unwrap(),
    }
}

pub(crate) fn names(fixture: &Fixture, key: &str) -> Vec<String> {
    fixture
        .value(key)
        .as_array()
        .expect("a list")
        .iter()
        .map(|v| v.as_str().expect("a name").to_string())
        .collect()
}

fn base_weights(fixture: &Fixture) -> Weights {
    let tensors: HashMap<String, Tensor> = names(fixture, "/base_param_names")
        .into_iter()
        .map(|n| {
            let t = fixture.tensor(&n).clone();
            (n, t)
        })
        .collect();
    Weights::from_tensors(tensors, DType::F64, "fixture").unwrap()
}

fn lora_settings(fixture: &Fixture) -> LoraSettings {
    LoraSettings {
        spec: LoraSpec {
            rank: fixture.value("/lora/r").as_u64().unwrap() as usize,
            alpha: fixture.value("/lora/alpha").as_f64().unwrap(),
            dropout: 0.0,
        },
        target_modules: Some(names(fixture, "/lora/targets")),
        init: LoraInit::Peft { seed: 0 },
    }
}

fn theta0(fixture: &Fixture) -> ParamSet {
    ParamSet::from_pairs(
        names(fixture, "/trainable_param_order")
            .into_iter()
            .map(|n| {
                let t = fixture.tensor(&n).clone();
                (n, t)
            }),
    )
    .unwrap()
}

/// The model's config from the fixture's `model_config`, whose activation entry
/// is a description led by the Hugging Face name (`"gelu_new (tanh
/// approximation)"`): the name is kept.
fn model_config<T: serde::de::DeserializeOwned>(fixture: &Fixture, activation_key: &str) -> T {
    let mut config = fixture.value("/model_config").clone();
    let described = config[activation_key]
        .as_str()
        .unwrap_or_else(|| panic!("model_config has no `{activation_key}` text"));
    let name = described.split_whitespace().next().unwrap_or_default();
    config[activation_key] = serde_json::Value::from(name);
    serde_json::from_value(config).unwrap()
}

/// Everything the fixture gives at θ₀ on the support set: the transformers' last
/// hidden state, the pooled features (Conv4's flattened features), logits, loss and
/// every gradient (exact zeros compared absolutely); also that the model's own
/// ParamSet has the fixture's names, shapes and order.
pub(crate) fn check_theta0(case: &FixtureCase) {
    let (fixture, model, batch) = (&case.fixture, case.model.as_ref(), &case.support);
    let theta = case.theta0.to_leaves().unwrap();
    model
        .init_params(0)
        .unwrap()
        .check_compatible(&theta)
        .unwrap();
    let features = match case.family {
        Family::Conv4 => "support_features_theta0",
        Family::Bert | Family::Gpt2 => {
            let stack = model.transformer().expect("a transformer");
            let hidden = stack.encode(&theta, batch, Mode::Eval).unwrap();
            assert_close(
                "last hidden state",
                &hidden,
                fixture.tensor("support_last_hidden_state_theta0"),
                1e-10,
            );
            "support_pooled_theta0"
        }
    };
    assert_close(
        "features",
        &model.features(&theta, batch, Mode::Eval).unwrap(),
        fixture.tensor(features),
        1e-10,
    );
    let logits = model.logits(&theta, batch, Mode::Eval).unwrap();
    assert_close(
        "support logits",
        &logits,
        fixture.tensor("support_logits_theta0"),
        1e-10,
    );
    let loss = ops::cross_entropy(&logits, &batch.labels, 0.0).unwrap();
    assert_close(
        "support loss",
        &loss.reshape(1).unwrap(),
        fixture.tensor("support_loss_theta0"),
        1e-10,
    );
    let grads = theta.gradients(&loss, GradGraph::Detach).unwrap();
    for (name, g) in grads.iter() {
        let expected = fixture.tensor(&format!("grad_support_theta0.{name}"));
        assert_close_or_zero(&format!("gradient of {name}"), g, expected, 1e-8);
    }
}

/// `name`'s checks at θ₀, and that its JSON names the `expected` family.
fn check_fixture(name: &str, expected: Family) {
    let Some(case) = fixture_case(name) else {
        return;
    };
    assert_eq!(case.family, expected, "{name}");
    check_theta0(&case);
}

#[test]
fn bert_matches_fixture_at_theta0() {
    check_fixture("bert_lora_maml", Family::Bert);
}

#[test]
fn gpt2_matches_fixture_at_theta0() {
    check_fixture("gpt2_lora_maml", Family::Gpt2);
}

/// Conv4 at θ₀: features, logits, loss, and every gradient; the conv biases' exact
/// zero gradients (BatchNorm removes per-channel constants) are compared absolutely.
#[test]
fn conv4_matches_fixture_at_theta0() {
    check_fixture("conv4_maml", Family::Conv4);
}

/// Copies fixture `name` into `dir` as `<stem>.json` and `<stem>.safetensors`,
/// with the JSON's own `fixture` entry renamed to `stem` too; `None` where the
/// fixtures are absent. (Test data stays in `dir`, never in the repository.)
pub(crate) fn copy_fixture(name: &str, dir: &std::path::Path, stem: &str) -> Option<Fixture> {
    let mut fixture = fixtures::load(name)?;
    fixture.json["fixture"] = serde_json::Value::from(stem);
    Some(save_fixture(fixture, dir, stem))
}

/// Writes `fixture` as `dir/<stem>.json` and `dir/<stem>.safetensors` and loads it
/// back from there.
pub(crate) fn save_fixture(fixture: Fixture, dir: &std::path::Path, stem: &str) -> Fixture {
    let (json, tensors) = (
        dir.join(format!("{stem}.json")),
        dir.join(format!("{stem}.safetensors")),
    );
    std::fs::write(&json, serde_json::to_vec(&fixture.json).unwrap()).unwrap();
    candle_core::safetensors::save(&fixture.tensors, &tensors).unwrap();
    fixtures::load_files(&json, &tensors)
}

/// The same checks on each fixture copied under a neutral file name: the family
/// comes from the JSON's model config.
#[test]
fn fixtures_under_neutral_names_are_read_by_their_json() {
    let dir = tempfile::tempdir().unwrap();
    for (name, family) in [
        ("bert_lora_maml", Family::Bert),
        ("gpt2_lora_maml", Family::Gpt2),
        ("conv4_maml", Family::Conv4),
    ] {
        let Some(copy) = copy_fixture(name, dir.path(), "reference") else {
            return;
        };
        let case = FixtureCase::new(copy);
        assert_eq!(case.family, family, "{name}");
        check_theta0(&case);
    }
}

#[test]
fn unknown_lora_target_and_missing_weight_are_clear_errors() {
    let Some(fixture) = fixtures::load("gpt2_lora_maml") else {
        return;
    };
    let config: Gpt2Config = model_config(&fixture, "activation_function");
    let mut lora = lora_settings(&fixture);
    // BERT's names on GPT-2: the reference project's silent failure, an error here.
    lora.target_modules = Some(vec!["query".into(), "value".into()]);
    let err = Gpt2::new(config.clone(), base_weights(&fixture), Some(lora), 3)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`query` matches no module of gpt2") && err.contains("attn.c_attn"),
        "{err}"
    );
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    tensors.insert("wte.weight".into(), fixture.tensor("wte.weight").clone());
    let partial = Weights::from_tensors(tensors, DType::F64, "partial.safetensors").unwrap();
    let err = Gpt2::new(config, partial, None, 3).unwrap_err().to_string();
    assert!(
        err.contains("`h.0.ln_1.weight` is missing from partial.safetensors"),
        "{err}"
    );
}
