//! What the planner refuses (as training refuses it), and the relations every plan
//! must keep between methods, modes, checkpointing, micro-batches and precisions
//! (the planner measures, so these run one after another in a process of their own,
//! under the counting allocator; agreement with measured runs is
//! `tests/planner_grid.rs`'s).

use melora::config::{Config, DataSource, SyntheticTask, Variant};
use melora::plan::{format_breakdown, plan, Plan};

#[global_allocator]
static ALLOCATOR: melora::memory::CountingAllocator = melora::memory::CountingAllocator;

/// Plans measure process-wide counters, so the cases run one after another on one
/// thread, as one test. As separate tests they ran on threads the harness starts and
/// ends, and a thread that ends frees its thread-locals (the matrix kernels' 1 MiB
/// scratch buffer among them) while the next case's plan may be measuring: a tiny
/// model's frozen weights then read as zero, now and then.
#[test]
fn plans_keep_their_relations() {
    let cases: [(&str, fn()); 9] = [
        (
            "every_method_plans_on_every_model_with_and_without_checkpointing_and_micro_batches",
            every_method_plans_on_every_model_with_and_without_checkpointing_and_micro_batches,
        ),
        (
            "memory_follows_what_each_method_keeps",
            memory_follows_what_each_method_keeps,
        ),
        (
            "checkpointing_keeps_one_segment_of_activations",
            checkpointing_keeps_one_segment_of_activations,
        ),
        (
            "mixed_precision_and_int8_shrink_what_they_store",
            mixed_precision_and_int8_shrink_what_they_store,
        ),
        (
            "the_planner_refuses_what_training_refuses",
            the_planner_refuses_what_training_refuses,
        ),
        (
            "precision_combinations_training_refuses_are_refused",
            precision_combinations_training_refuses_are_refused,
        ),
        ("a_plan_adds_up", a_plan_adds_up),
        (
            "second_order_micro_batches_apply_where_examples_split",
            second_order_micro_batches_apply_where_examples_split,
        ),
        (
            "loading_can_peak_above_the_meta_steps",
            loading_can_peak_above_the_meta_steps,
        ),
    ];
    for (name, case) in cases {
        eprintln!("case {name}");
        case();
    }
}

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

fn peak(c: &Config) -> u64 {
    plan(c)
        .unwrap_or_else(|e| panic!("{}: {e}", Variant::of(c)))
        .peak_bytes
}

/// A plan that exists and adds up.
fn check(c: &Config) -> Plan {
    let p = plan(c).unwrap_or_else(|e| panic!("{} on {}: {e}", Variant::of(c), c.model.name));
    assert!(p.peak_bytes > 0);
    assert!(p.breakdown.total() <= p.peak_bytes);
    assert_eq!(p.peak_bytes, p.breakdown.total().max(p.load_peak_bytes));
    assert_eq!(p.variant, Variant::of(c));
    p
}

fn every_method_plans_on_every_model_with_and_without_checkpointing_and_micro_batches() {
    let mut bases = Vec::new();
    for model in ["tiny-bert", "tiny-distilbert", "tiny-gpt2", "tiny-t5"] {
        let c = text(model, 8);
        bases.push(checkpointed(c.clone(), None));
        bases.push(checkpointed(micro(c.clone(), 5), Some(vec![1])));
        bases.push(micro(c.clone(), 5));
        bases.push(c);
    }
    bases.push(sinusoid());
    bases.push(micro(sinusoid(), 2));
    bases.push(images());
    for base in &bases {
        for &variant in Variant::ALL {
            let c = variant.apply(base);
            // A baseline that does not apply to the model is refused, not planned.
            if c.validate().is_err() {
                continue;
            }
            let p = check(&c);
            assert_eq!(
                p.checkpoint_layers.is_some(),
                c.memory_optimization.checkpointing.enabled
            );
        }
    }
}

fn memory_follows_what_each_method_keeps() {
    let base = text("tiny-bert", 32);
    let with_k = |variant: Variant, k: usize| {
        let mut c = variant.apply(&base);
        c.meta_learning.inner.steps = k;
        c
    };
    // Full-graph MAML keeps every inner step's graphs; recompute-MAML one step's.
    let full = [1, 2, 4].map(|k| peak(&with_k(Variant::MamlFullGraph, k)));
    assert!(full[0] < full[1] && full[1] < full[2], "{full:?}");
    let recompute = [1, 4].map(|k| peak(&with_k(Variant::Maml, k)));
    assert!(recompute[1] < full[2]);
    assert!(
        (recompute[1] as f64) < 1.05 * recompute[0] as f64,
        "{recompute:?}"
    );
    // First-order methods keep no gradient graph.
    assert!(peak(&with_k(Variant::Fomaml, 4)) < recompute[1]);
    // Checkpointing, micro-batches and the default second-order micro-batches (12
    // support examples as 6 + 6) lower the whole-set second-order peak.
    let default_c = with_k(Variant::Maml, 2);
    let mut recompute_c = default_c.clone();
    recompute_c
        .memory_optimization
        .gradient_accumulation
        .second_order_micro_batch = None;
    let whole = peak(&recompute_c);
    assert!(peak(&default_c) < whole);
    assert!(peak(&checkpointed(recompute_c.clone(), None)) < whole);
    assert!(peak(&micro(recompute_c.clone(), 3)) < whole);
    // A baseline's peak is one task's adaptation: smaller than meta-training's.
    assert!(peak(&Variant::Finetune.apply(&base)) < whole);
}

fn checkpointing_keeps_one_segment_of_activations() {
    // Long sequences, so that activations dominate: with every layer a segment the
    // recompute-MAML peak keeps far less than a whole forward graph's worth.
    let c = Variant::Maml.apply(&text("tiny-gpt2", 64));
    let off = check(&c);
    let on = check(&checkpointed(c, None));
    assert!(
        on.breakdown.activations + on.breakdown.gradients
            < off.breakdown.activations + off.breakdown.gradients
    );
    assert_eq!(on.forward_graph_bytes, off.forward_graph_bytes);
    assert!(
        on.graphs_kept < off.graphs_kept,
        "{} {}",
        on.graphs_kept,
        off.graphs_kept
    );
}

fn precise(
    mut c: Config,
    precision: melora::config::Precision,
    quantization: melora::config::Quantization,
) -> Config {
    c.memory_optimization.precision = precision;
    c.model.quantization = quantization;
    c
}

fn mixed_precision_and_int8_shrink_what_they_store() {
    use melora::config::{Precision, Quantization};
    let base = text("tiny-bert", 32);
    // (Full fine-tuning cannot train an int8 base: it is refused, not planned.)
    for &variant in Variant::ALL.iter().filter(|&&v| v != Variant::Finetune) {
        let f32_plan = check(&variant.apply(&base));
        let bf16 = check(&precise(
            variant.apply(&base),
            Precision::Bf16,
            Quantization::None,
        ));
        let int8 = check(&precise(
            variant.apply(&base),
            Precision::F32,
            Quantization::Int8,
        ));
        // Half the frozen bytes and a smaller peak in bf16; the trainable tensors and
        // the optimiser's state stay f32.
        assert_eq!(
            (bf16.dtype.as_str(), bf16.trainable_dtype.as_str()),
            ("bf16", "f32")
        );
        // (candle's per-tensor bookkeeping does not halve).
        let half = bf16.breakdown.frozen_weights as f64 / f32_plan.breakdown.frozen_weights as f64;
        assert!((0.5..0.52).contains(&half), "{variant}: {half}");
        assert_eq!(
            bf16.breakdown.optimizer_state,
            f32_plan.breakdown.optimizer_state
        );
        assert!(bf16.peak_bytes < f32_plan.peak_bytes, "{variant}");
        // int8: a byte per matrix entry and f32 scales, dense norms and positions.
        let ratio = int8.breakdown.frozen_weights as f64 / f32_plan.breakdown.frozen_weights as f64;
        assert!((0.25..0.4).contains(&ratio), "{variant}: {ratio}");
    }
    // f16 stores what bf16 stores, plus the loss scale's copies of the gradients.
    let c = Variant::Maml.apply(&base);
    let bf16 = check(&precise(c.clone(), Precision::Bf16, Quantization::None));
    let f16 = check(&precise(c.clone(), Precision::F16, Quantization::None));
    assert!(f16.loss_scaling && !bf16.loss_scaling);
    assert_eq!(f16.breakdown.frozen_weights, bf16.breakdown.frozen_weights);
    assert!(f16.peak_bytes >= bf16.peak_bytes);
    // Over an int8 base, bf16 activations still shrink the peak.
    let int8 = check(&precise(c.clone(), Precision::F32, Quantization::Int8));
    let both = check(&precise(c, Precision::Bf16, Quantization::Int8));
    assert!(both.peak_bytes < int8.peak_bytes);
    assert!(format_breakdown(&both).contains("bf16 base and activations, f32 trainable, int8"));
}

fn the_planner_refuses_what_training_refuses() {
    // Transformer stacks and vision backbones are checkpointed, the MLP is not;
    // Conv4's batch statistics are not split into micro-batches.
    let err = plan(&checkpointed(sinusoid(), None))
        .unwrap_err()
        .to_string();
    assert!(err.contains("this model has neither"), "{err}");
    let err = plan(&checkpointed(images(), Some(vec![4])))
        .unwrap_err()
        .to_string();
    assert!(err.contains("layer 4"), "{err}");
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

fn precision_combinations_training_refuses_are_refused() {
    use melora::config::{Precision, Quantization};
    // f16 does not run with checkpointing; Conv4 and the MLP have no frozen base to
    // store in int8; the MLP has no mixed precision, and Conv4 runs bf16 activations
    // (f32 master weights), not f16.
    let c = checkpointed(text("tiny-bert", 8), None);
    let err = plan(&precise(c, Precision::F16, Quantization::None))
        .unwrap_err()
        .to_string();
    assert!(err.contains("checkpointing"), "{err}");
    for c in [images(), sinusoid()] {
        assert!(plan(&precise(c, Precision::F32, Quantization::Int8)).is_err());
    }
    assert!(plan(&precise(sinusoid(), Precision::Bf16, Quantization::None)).is_err());
    assert!(plan(&precise(images(), Precision::F16, Quantization::None)).is_err());
    let f32_peak = plan(&images()).unwrap().peak_bytes;
    let bf16_peak = plan(&precise(images(), Precision::Bf16, Quantization::None))
        .unwrap()
        .peak_bytes;
    assert!(
        bf16_peak < f32_peak,
        "Conv4 in bf16: {bf16_peak} B, not below f32's {f32_peak} B"
    );
}

/// A plan adds up: its peak is the larger of loading and the breakdown's total.
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

/// MiniLM-shaped weights drawn in f64 peak above the meta-steps of one-example
/// tasks in bf16 with checkpointing: the plan's peak is then loading's, and its
/// step peak (what `bench memory`, measuring after a warm-up, is compared with)
/// leaves it out.
fn loading_can_peak_above_the_meta_steps() {
    let mut c = text("minilm-shaped", 8);
    c.meta_learning.method = melora::config::Method::Fomaml;
    c.memory_optimization.precision = melora::config::Precision::Bf16;
    c.memory_optimization.checkpointing.enabled = true;
    c.data.k_shot = 1;
    c.data.n_query = 1;
    c.meta_learning.meta_batch_size = 1;
    let p = plan(&c).unwrap();
    assert!(
        p.load_peak_bytes > p.step_peak_bytes(),
        "loading {} vs steps {}",
        p.load_peak_bytes,
        p.step_peak_bytes()
    );
    assert_eq!(p.peak_bytes, p.load_peak_bytes);
}

/// The default second-order micro-batch (9) splits recompute-MAML's support set of
/// 12 on a transformer, not a first-order method's, and not a model that couples
/// its examples (Conv4's batch statistics), whatever the support set's size.
fn second_order_micro_batches_apply_where_examples_split() {
    let micro = |c: Config| check(&c).second_order_micro_batch;
    let bert = text("tiny-bert", 8);
    assert_eq!(micro(Variant::Maml.apply(&bert)), Some(9));
    assert_eq!(micro(Variant::Fomaml.apply(&bert)), None);
    let mut conv = images();
    conv.data.k_shot = 6;
    assert_eq!(micro(Variant::Maml.apply(&conv)), None);
}
