//! What the planner refuses, as training refuses it, and the shapes it plans. The
//! relations between plans (which measure, so they run serialised in their own
//! process) are `tests/plan_relations.rs`'s, and agreement with measured runs is
//! `tests/planner_grid.rs`'s.

use super::*;
use crate::config::{DataSource, SyntheticTask};

/// A small text configuration read from a file (sequences of `max_length` tokens).
fn text(model: &str, tokens: usize) -> Config {
    let mut c = Config::default();
    c.model.name = model.into();
    c.model.max_length = tokens;
    c.data.source = DataSource::Jsonl;
    c.data.path = Some("texts.jsonl".into());
    c.data.n_way = 3;
    c.data.k_shot = 4;
    c.data.n_query = 2;
    c.meta_learning.meta_batch_size = 2;
    c
}

fn sinusoid() -> Config {
    let mut c = Config::default();
    c.model.name = "mlp".into();
    c.data.source = DataSource::Synthetic;
    c.data.synthetic_task = SyntheticTask::Sinusoid;
    c.data.k_shot = 5;
    c.data.n_query = 5;
    c
}

fn images() -> Config {
    let mut c = Config::default();
    c.model.name = "conv4".into();
    c.data.source = DataSource::Synthetic;
    c.data.synthetic_task = SyntheticTask::Images;
    c.data.n_way = 2;
    c.data.k_shot = 1;
    c.data.n_query = 1;
    c.meta_learning.meta_batch_size = 1;
    c
}

fn checkpointed(mut c: Config, layers: Option<Vec<usize>>) -> Config {
    c.memory_optimization.checkpointing.enabled = true;
    c.memory_optimization.checkpointing.layers = layers;
    c
}

fn micro(mut c: Config, size: usize) -> Config {
    c.memory_optimization.gradient_accumulation.micro_batch = Some(size);
    c
}

#[test]
fn the_planner_refuses_what_training_refuses() {
    // Only transformer stacks are checkpointed; Conv4's batch statistics are not
    // split into micro-batches.
    for c in [checkpointed(sinusoid(), None), checkpointed(images(), None)] {
        let err = plan(&c).unwrap_err().to_string();
        assert!(err.contains("not a transformer stack"), "{err}");
    }
    let err = plan(&micro(
        {
            let mut c = images();
            c.data.k_shot = 3;
            c
        },
        2,
    ))
    .unwrap_err()
    .to_string();
    assert!(err.contains("micro_batch"), "{err}");
    let err = plan(&checkpointed(text("tiny-bert", 8), Some(vec![2])))
        .unwrap_err()
        .to_string();
    assert!(err.contains("layer 2"), "{err}");
    // An invalid configuration built in code is refused, not planned.
    let mut c = text("tiny-bert", 8);
    c.meta_learning.inner.steps = 0;
    assert!(plan(&c).is_err());
}

fn precise(
    mut c: Config,
    precision: crate::config::Precision,
    quantization: crate::config::Quantization,
) -> Config {
    c.memory_optimization.precision = precision;
    c.model.quantization = quantization;
    c
}

#[test]
fn precision_combinations_training_refuses_are_refused() {
    use crate::config::{Precision, Quantization};
    // f16 does not run with checkpointing; Conv4 and the MLP have no frozen base.
    let c = checkpointed(text("tiny-bert", 8), None);
    let err = plan(&precise(c, Precision::F16, Quantization::None))
        .unwrap_err()
        .to_string();
    assert!(err.contains("checkpointing"), "{err}");
    for c in [images(), sinusoid()] {
        assert!(plan(&precise(c.clone(), Precision::Bf16, Quantization::None)).is_err());
        assert!(plan(&precise(c, Precision::F32, Quantization::Int8)).is_err());
    }
}

/// Synthetic text is planned at the sequence length it is generated with: at most
/// `model.max_length`, at most the generator's 32.
#[test]
fn synthetic_text_is_planned_at_the_model_max_length() {
    for (max_length, planned) in [(8, 8), (16, 16), (32, 32), (64, 32)] {
        let mut c = Config::default();
        c.model.max_length = max_length;
        assert_eq!(
            Inputs::of(&c).unwrap().sequence_length(),
            Some(planned),
            "max_length {max_length}"
        );
    }
}

/// A plan adds up: its peak is the larger of loading and the breakdown's total.
#[test]
fn a_plan_adds_up() {
    for c in [text("tiny-bert", 8), sinusoid(), images()] {
        let p = plan(&c).unwrap();
        assert!(p.peak_bytes > 0);
        assert_eq!(p.peak_bytes, p.breakdown.total().max(p.load_peak_bytes));
        assert_eq!(p.variant, Variant::of(&c));
    }
    // Two layers and two tasks: measured as configured.
    assert_eq!(plan(&text("tiny-bert", 8)).unwrap().instances, 1);
}
