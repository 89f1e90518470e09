use std::path::{Path, PathBuf};

use super::*;

/// The `(key, message)` of a configuration error; fails on any other error.
fn config_error(result: Result<Config>) -> (String, String) {
    match result {
        Err(Error::Config { key, message }) => (key, message),
        other => panic!("expected a config error, got {other:?}"),
    }
}

fn assert_one_line(err: &Error) {
    let text = err.to_string();
    assert!(
        !text.contains('\n'),
        "message spans several lines: {text:?}"
    );
}

#[test]
fn defaults_are_valid() {
    Config::default().validate().unwrap();
    let config = Config::default();
    assert_eq!(config.seed, 42);
    assert_eq!(config.lora.rank, 8);
    assert_eq!(config.meta_learning.method, Method::Maml);
    assert_eq!(config.meta_learning.inner.mode, InnerMode::Recompute);
    assert_eq!(config.meta_learning.outer.grad_clip, Some(1.0));
    assert_eq!(config.tracking.output_dir, PathBuf::from("runs"));
}

#[test]
fn empty_document_gives_defaults() {
    assert_eq!(Config::from_yaml_str("").unwrap(), Config::default());
    assert_eq!(
        Config::from_yaml_str("# nothing but a comment\n").unwrap(),
        Config::default()
    );
}

#[test]
fn partial_yaml_fills_the_rest_with_defaults() {
    let config = Config::from_yaml_str(
        "seed: 7\nlora:\n  rank: 4\nmeta_learning:\n  method: lora-finetune\n  inner:\n    \
         mode: full_graph\n  outer:\n    lr: 1e-4\n    grad_clip: null\n    schedule: \
         warmup_cosine\n",
    )
    .unwrap();
    let mut expected = Config {
        seed: 7,
        ..Default::default()
    };
    expected.lora.rank = 4;
    expected.meta_learning.method = Method::LoraFinetune;
    expected.meta_learning.inner.mode = InnerMode::FullGraph;
    expected.meta_learning.outer.lr = 1e-4;
    expected.meta_learning.outer.grad_clip = None;
    expected.meta_learning.outer.schedule = LrSchedule::WarmupCosine;
    assert_eq!(config, expected);
}

#[test]
fn integer_is_accepted_for_a_float() {
    let config = Config::from_yaml_str("lora:\n  alpha: 32\n").unwrap();
    assert_eq!(config.lora.alpha, 32.0);
}

#[test]
fn unknown_top_level_key_is_named() {
    let (key, message) = config_error(Config::from_yaml_str("seed: 1\nmodle:\n  name: x\n"));
    assert_eq!(key, "modle");
    assert!(message.contains("unknown field `modle`"), "{message}");
    // serde lists the keys that are allowed.
    assert!(message.contains("`model`"), "{message}");
}

#[test]
fn unknown_nested_key_is_named_with_its_path() {
    let err = Config::from_yaml_str("lora:\n  rnak: 4\n").unwrap_err();
    assert_one_line(&err);
    assert_eq!(
        err.to_string(),
        "config: `lora.rnak`: unknown field `rnak`, expected one of `rank`, `alpha`, \
         `dropout`, `target_modules` (line 2, column 3)"
    );
    let (key, _) = config_error(Config::from_yaml_str(
        "meta_learning:\n  outer:\n    learning_rate: 0.1\n",
    ));
    assert_eq!(key, "meta_learning.outer.learning_rate");
}

#[test]
fn wrong_type_is_named() {
    let err = Config::from_yaml_str("lora:\n  rank: \"eight\"\n").unwrap_err();
    assert_one_line(&err);
    let (key, message) = config_error(Err(err));
    assert_eq!(key, "lora.rank");
    assert!(
        message.starts_with("invalid type: string \"eight\", expected usize"),
        "{message}"
    );
    let (key, message) = config_error(Config::from_yaml_str("lora:\n  rank: -1\n"));
    assert_eq!(key, "lora.rank");
    assert!(message.contains("-1"), "{message}");
    let (key, _) = config_error(Config::from_yaml_str("lora: 3\n"));
    assert_eq!(key, "lora");
    let (key, _) = config_error(Config::from_yaml_str(
        "lora:\n  target_modules: [query, [value]]\n",
    ));
    assert_eq!(key, "lora.target_modules[1]");
}

#[test]
fn document_that_is_not_a_mapping_is_reported() {
    let (key, message) = config_error(Config::from_yaml_str("- 1\n- 2\n"));
    assert_eq!(key, "(top level)");
    assert!(message.contains("sequence"), "{message}");
    let (key, _) = config_error(Config::from_yaml_str("seed: 1\n---\nseed: 2\n"));
    assert_eq!(key, "(top level)");
}

#[test]
fn rank_zero_is_rejected() {
    let err = Config::from_yaml_str("lora:\n  rank: 0\n").unwrap_err();
    assert_eq!(
        err.to_string(),
        "config: `lora.rank`: must be at least 1, got 0"
    );
}

#[test]
fn negative_learning_rates_are_rejected() {
    let err = Config::from_yaml_str("meta_learning:\n  inner:\n    lr: -0.1\n").unwrap_err();
    assert_eq!(
        err.to_string(),
        "config: `meta_learning.inner.lr`: must be a finite number greater than 0, got -0.1"
    );
    let (key, _) = config_error(Config::from_yaml_str(
        "meta_learning:\n  outer:\n    lr: 0\n",
    ));
    assert_eq!(key, "meta_learning.outer.lr");
}

#[test]
fn nan_and_infinity_are_rejected() {
    let (key, message) = config_error(Config::from_yaml_str("lora:\n  alpha: .nan\n"));
    assert_eq!(key, "lora.alpha");
    assert!(message.ends_with("got NaN"), "{message}");
    let (key, message) = config_error(Config::from_yaml_str(
        "meta_learning:\n  outer:\n    lr: .inf\n",
    ));
    assert_eq!(key, "meta_learning.outer.lr");
    assert!(message.ends_with("got inf"), "{message}");
    let (key, _) = config_error(Config::from_yaml_str("lora:\n  dropout: .nan\n"));
    assert_eq!(key, "lora.dropout");
    let (key, _) = config_error(Config::from_yaml_str(
        "memory_optimization:\n  hessian_approximation:\n    damping: .nan\n",
    ));
    assert_eq!(key, "memory_optimization.hessian_approximation.damping");
}

#[test]
fn ranges_are_checked() {
    let cases = [
        ("lora:\n  dropout: 1.0\n", "lora.dropout"),
        ("lora:\n  alpha: 0\n", "lora.alpha"),
        ("lora:\n  target_modules: []\n", "lora.target_modules"),
        ("model:\n  name: ''\n", "model.name"),
        ("model:\n  max_length: 0\n", "model.max_length"),
        (
            "meta_learning:\n  meta_batch_size: 0\n",
            "meta_learning.meta_batch_size",
        ),
        (
            "meta_learning:\n  num_iterations: 0\n",
            "meta_learning.num_iterations",
        ),
        (
            "meta_learning:\n  inner:\n    steps: 0\n",
            "meta_learning.inner.steps",
        ),
        (
            "meta_learning:\n  outer:\n    weight_decay: -1\n",
            "meta_learning.outer.weight_decay",
        ),
        (
            "meta_learning:\n  outer:\n    grad_clip: 0\n",
            "meta_learning.outer.grad_clip",
        ),
        (
            "meta_learning:\n  num_iterations: 10\n  outer:\n    warmup_steps: 11\n",
            "meta_learning.outer.warmup_steps",
        ),
        (
            "memory_optimization:\n  gradient_accumulation:\n    micro_batch: 0\n",
            "memory_optimization.gradient_accumulation.micro_batch",
        ),
        (
            "memory_optimization:\n  checkpointing:\n    every: 0\n",
            "memory_optimization.checkpointing.every",
        ),
        (
            "memory_optimization:\n  checkpointing:\n    layers: []\n",
            "memory_optimization.checkpointing.layers",
        ),
        (
            "memory_optimization:\n  checkpointing:\n    every: 2\n    layers: [0, 1]\n",
            "memory_optimization.checkpointing.every",
        ),
        (
            "memory_optimization:\n  hessian_approximation:\n    probes: 0\n",
            "memory_optimization.hessian_approximation.probes",
        ),
        ("data:\n  n_way: 1\n", "data.n_way"),
        ("data:\n  k_shot: 0\n", "data.k_shot"),
        ("data:\n  n_query: 0\n", "data.n_query"),
        ("data:\n  source: jsonl\n", "data.path"),
        ("data:\n  image_size: 0\n", "data.image_size"),
        ("data:\n  label_column: \"\"\n", "data.label_column"),
        ("data:\n  train_fraction: 1.0\n", "data.train_fraction"),
        (
            "data:\n  train_fraction: 0.7\n  val_fraction: 0.3\n",
            "data.val_fraction",
        ),
        ("data:\n  small_classes: drop\n", "data.small_classes"),
        ("data:\n  synthetic_task: audio\n", "data.synthetic_task"),
        ("evaluation:\n  episodes: 0\n", "evaluation.episodes"),
        ("evaluation:\n  confidence: 1.0\n", "evaluation.confidence"),
        ("evaluation:\n  eval_every: 0\n", "evaluation.eval_every"),
        ("tracking:\n  output_dir: ''\n", "tracking.output_dir"),
        (
            "tracking:\n  experiment_name: ../x\n",
            "tracking.experiment_name",
        ),
    ];
    for (yaml, expected_key) in cases {
        let result = Config::from_yaml_str(yaml);
        let (key, message) = config_error(result);
        assert_eq!(key, expected_key, "for {yaml:?}: {message}");
    }
    // Sources that need no path, or synthetic_only, need no data.path.
    Config::from_yaml_str("data:\n  source: wordnet\n").unwrap();
    Config::from_yaml_str("data:\n  source: csv\n  synthetic_only: true\n").unwrap();
    Config::from_yaml_str("data:\n  source: csv\n  path: tasks.csv\n").unwrap();
}

#[test]
fn unknown_enum_value_lists_the_allowed_ones() {
    let err = Config::from_yaml_str("meta_learning:\n  method: mamll\n").unwrap_err();
    assert_one_line(&err);
    assert_eq!(
        err.to_string(),
        "config: `meta_learning.method`: unknown value `mamll`; allowed: maml, fomaml, \
         reptile, melora, metasgd, protonet, fsct_cosine, fsct_softmax, finetune, \
         lora-finetune, no-adaptation, prototype, pretrain-finetune (line 2, column 11)"
    );
    let (key, message) = config_error(Config::from_yaml_str("model:\n  dtype: 16\n"));
    assert_eq!(key, "model.dtype");
    assert!(message.contains("f32, f64, bf16, f16"), "{message}");
}

#[test]
fn enum_names_parse_and_print() {
    for &method in Method::ALL {
        assert_eq!(method.as_str().parse::<Method>().unwrap(), method);
    }
    for &kind in HessianKind::ALL {
        assert_eq!(kind.to_string().parse::<HessianKind>().unwrap(), kind);
    }
    assert_eq!(
        "MAML".parse::<Method>().unwrap_err().to_string(),
        "unknown value `MAML`; allowed: maml, fomaml, reptile, melora, metasgd, protonet, \
         fsct_cosine, fsct_softmax, finetune, lora-finetune, no-adaptation, prototype, \
         pretrain-finetune"
    );
}

/// `device` is `cpu` by default, parses `cuda` and `cuda:N`, and a wrong name is an
/// error naming the key and the allowed forms.
#[test]
fn device_names_parse_and_wrong_ones_are_named() {
    assert_eq!(Config::default().device, ComputeDevice::Cpu);
    for (text, device) in [
        ("cpu", ComputeDevice::Cpu),
        ("cuda", ComputeDevice::Cuda(0)),
        ("cuda:2", ComputeDevice::Cuda(2)),
    ] {
        let config = Config::from_yaml_str(&format!("device: {text}\n")).unwrap();
        assert_eq!(config.device, device);
        let again = Config::from_yaml_str(&config.to_yaml_string().unwrap()).unwrap();
        assert_eq!(again.device, device);
    }
    for wrong in ["gpu", "cuda:-1", "cuda:x", "CPU"] {
        let (key, message) = config_error(Config::from_yaml_str(&format!("device: {wrong}\n")));
        assert_eq!(key, "device");
        assert!(
            message.contains(&format!("unknown device `{wrong}`"))
                && message.contains("cpu, cuda, cuda:N"),
            "{message}"
        );
    }
}

#[test]
fn overrides_are_applied() {
    let mut config = Config::default();
    let overrides = ConfigOverrides {
        model: Some("tiny-gpt2".into()),
        lora_rank: Some(2),
        lora_alpha: Some(4.0),
        meta_batch_size: Some(8),
        inner_steps: Some(3),
        inner_lr: Some(0.5),
        outer_lr: Some(0.01),
        num_iterations: Some(20),
        n_way: Some(4),
        k_shot: Some(2),
        n_query: Some(6),
        method: Some(Method::Reptile),
        seed: Some(3),
        device: Some(ComputeDevice::Cuda(1)),
        synthetic_only: Some(true),
        experiment_name: Some("quick".into()),
        output_dir: Some("out".into()),
        memory_budget: Some("4GiB".into()),
    };
    config.apply(&overrides).unwrap();
    assert_eq!(config.model.name, "tiny-gpt2");
    assert_eq!(config.lora.rank, 2);
    assert_eq!(config.lora.alpha, 4.0);
    assert_eq!(config.meta_learning.meta_batch_size, 8);
    assert_eq!(config.meta_learning.inner.steps, 3);
    assert_eq!(config.meta_learning.inner.lr, 0.5);
    assert_eq!(config.meta_learning.outer.lr, 0.01);
    assert_eq!(config.meta_learning.num_iterations, 20);
    assert_eq!(config.meta_learning.method, Method::Reptile);
    assert_eq!(
        (config.data.n_way, config.data.k_shot, config.data.n_query),
        (4, 2, 6)
    );
    assert_eq!(config.seed, 3);
    assert_eq!(config.device, ComputeDevice::Cuda(1));
    assert!(config.data.synthetic_only);
    assert_eq!(config.tracking.experiment_name, "quick");
    assert_eq!(config.tracking.output_dir, PathBuf::from("out"));
    assert_eq!(
        config.memory_optimization.budget.limit().unwrap(),
        Some(BudgetLimit::Bytes(4 << 30))
    );
    // Unset fields change nothing.
    let before = config.clone();
    config.apply(&ConfigOverrides::default()).unwrap();
    assert_eq!(config, before);
}

#[test]
fn invalid_override_names_its_flag_and_leaves_config_unchanged() {
    let mut config = Config::default();
    let overrides = ConfigOverrides {
        lora_rank: Some(0),
        ..Default::default()
    };
    let err = config.apply(&overrides).unwrap_err();
    assert_eq!(
        err.to_string(),
        "config: `lora.rank`: must be at least 1, got 0 (set by --lora-rank)"
    );
    assert_eq!(config, Config::default());

    let overrides = ConfigOverrides {
        memory_budget: Some("4 parsecs".into()),
        ..Default::default()
    };
    let err = config.apply(&overrides).unwrap_err().to_string();
    assert!(
        err.contains("memory_optimization.budget.limit")
            && err.contains("--memory-budget")
            && err.contains("GiB")
            && err.contains("`auto`"),
        "{err}"
    );
    let mut auto = Config::default();
    for text in ["auto", " AUTO "] {
        let overrides = ConfigOverrides {
            memory_budget: Some(text.into()),
            ..Default::default()
        };
        auto.apply(&overrides).unwrap();
        assert_eq!(
            auto.memory_optimization.budget.limit().unwrap(),
            Some(BudgetLimit::Free)
        );
    }

    let overrides = ConfigOverrides {
        inner_lr: Some(f64::NAN),
        ..Default::default()
    };
    let (key, message) = config_error(config.apply(&overrides).map(|()| config.clone()));
    assert_eq!(key, "meta_learning.inner.lr");
    assert!(message.ends_with("(set by --inner-lr)"), "{message}");
}

#[test]
fn load_lets_overrides_fix_the_file() {
    let path = temp_file("rank0.yml", "lora:\n  rank: 0\n");
    let err = Config::load(Some(&path), &ConfigOverrides::default()).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "config: `lora.rank`: must be at least 1, got 0 (in {})",
            path.display()
        )
    );
    let overrides = ConfigOverrides {
        lora_rank: Some(4),
        ..Default::default()
    };
    let config = Config::load(Some(&path), &overrides).unwrap();
    assert_eq!(config.lora.rank, 4);
    let config = Config::load(None, &overrides).unwrap();
    assert_eq!(config.lora.rank, 4);
    std::fs::remove_file(path).unwrap();
}

#[test]
fn yaml_round_trip_gives_an_equal_config() {
    let mut config = Config::default();
    config.model.path = Some("models/minilm".into());
    config.model.dtype = DType::Bf16;
    config.lora.target_modules = Some(vec!["query".into(), "value".into()]);
    config.lora.dropout = 0.1;
    config.meta_learning.outer.lr = 3e-4;
    config.meta_learning.outer.grad_clip = None;
    config.memory_optimization.gradient_accumulation.micro_batch = Some(4);
    config.memory_optimization.hessian_approximation.kind = HessianKind::GaussNewton;
    config.data.source = DataSource::Jsonl;
    config.data.path = Some("tasks.jsonl".into());
    config.tracking.experiment_name = "123".into();
    for config in [Config::default(), config] {
        let yaml = config.to_yaml_string().unwrap();
        assert_eq!(Config::from_yaml_str(&yaml).unwrap(), config, "{yaml}");
    }
}

#[test]
fn example_file_shows_the_defaults() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/default.yml");
    let config = Config::from_file(&path).unwrap();
    assert_eq!(config, Config::default());
    // Every key the program writes appears in the example.
    let text = std::fs::read_to_string(&path).unwrap();
    for line in Config::default().to_yaml_string().unwrap().lines() {
        assert!(text.contains(line), "configs/default.yml lacks `{line}`");
    }
}

#[test]
fn missing_file_is_an_io_error_naming_the_path() {
    let path = std::env::temp_dir().join("melora-config-test-does-not-exist.yml");
    let err = Config::from_file(&path).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
    assert!(err.to_string().contains(&path.display().to_string()));
}

#[test]
fn file_errors_name_the_file() {
    let path = temp_file("typo.yml", "lora:\n  rnak: 4\n");
    let (key, message) = config_error(Config::from_file(&path));
    assert_eq!(key, "lora.rnak");
    assert!(
        message.ends_with(&format!("({}, line 2, column 3)", path.display())),
        "{message}"
    );
    std::fs::write(&path, "just a string\n").unwrap();
    let err = Config::from_file(&path).unwrap_err();
    assert!(matches!(err, Error::Format { .. }), "{err:?}");
    assert_one_line(&err);
    std::fs::write(&path, "").unwrap();
    assert_eq!(Config::from_file(&path).unwrap(), Config::default());
    std::fs::remove_file(path).unwrap();
}

/// A file in the temporary folder, unique to this process and test.
fn temp_file(name: &str, contents: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("melora-config-{}-{name}", std::process::id()));
    std::fs::write(&path, contents).unwrap();
    path
}

/// Checkpointing is accepted with `every` or a chosen set of layers, and gives the
/// engine's plan only when enabled.
#[test]
fn checkpointing_plans_follow_the_section() {
    use crate::config::CheckpointPlan;
    let config = Config::from_yaml_str(
        "memory_optimization:\n  checkpointing:\n    enabled: true\n    every: 2\n",
    )
    .unwrap();
    assert_eq!(
        config.memory_optimization.checkpointing.plan(),
        Some(CheckpointPlan::Every(2))
    );
    let config = Config::from_yaml_str(
        "memory_optimization:\n  checkpointing:\n    enabled: true\n    layers: [3, 0]\n",
    )
    .unwrap();
    assert_eq!(
        config.memory_optimization.checkpointing.plan(),
        Some(CheckpointPlan::Layers(vec![3, 0]))
    );
    assert_eq!(
        Config::default().memory_optimization.checkpointing.plan(),
        None
    );
}

/// Selective recomputation is accepted with and without segment checkpointing.
#[test]
fn selective_recomputation_is_accepted() {
    for enabled in [false, true] {
        let c = Config::from_yaml_str(&format!(
            "memory_optimization:\n  checkpointing:\n    enabled: {enabled}\n    selective: true\n"
        ))
        .unwrap();
        assert!(c.memory_optimization.checkpointing.selective);
    }
    // A vision backbone has no attention or feed-forward blocks to rebuild.
    let (key, message) = config_error(Config::from_yaml_str(
        "model:\n  name: conv4\ndata:\n  synthetic_task: images\nmemory_optimization:\n  \
         checkpointing:\n    selective: true\n",
    ));
    assert_eq!(key, "memory_optimization.checkpointing.selective");
    assert!(
        message.contains("conv4") && message.contains("false"),
        "{message}"
    );
}

/// Mixed precision and int8 are accepted where the models implement them; the other
/// combinations are errors naming the key and the fix.
#[test]
fn precision_and_quantization_combinations() {
    let config = Config::from_yaml_str(
        "model:\n  quantization: int8\nmemory_optimization:\n  precision: bf16\n",
    )
    .unwrap();
    assert_eq!(config.memory_optimization.precision, Precision::Bf16);
    assert_eq!(config.model.quantization, Quantization::Int8);
    let round_trip = Config::from_yaml_str(&config.to_yaml_string().unwrap()).unwrap();
    assert_eq!(round_trip, config);
    // Vision backbones run bf16 activations over f32 master weights.
    Config::from_yaml_str(
        "model:\n  name: resnet12\ndata:\n  synthetic_task: images\n  image_size: 32\n\
         memory_optimization:\n  precision: bf16\n",
    )
    .unwrap();
    assert_eq!(
        Config::default()
            .memory_optimization
            .loss_scaling
            .initial_scale,
        65536.0
    );
    let cases = [
        (
            "model:\n  dtype: f64\nmemory_optimization:\n  precision: f16\n",
            "memory_optimization.precision",
            "model.dtype: f32",
        ),
        (
            "model:\n  dtype: bf16\nmemory_optimization:\n  precision: bf16\n",
            "memory_optimization.precision",
            "model.dtype: f32",
        ),
        (
            "model:\n  name: conv4\ndata:\n  synthetic_task: images\nmemory_optimization:\n  \
             precision: f16\n",
            "memory_optimization.precision",
            "bf16 only",
        ),
        (
            "model:\n  name: conv4\n  quantization: int8\ndata:\n  synthetic_task: images\n",
            "model.quantization",
            "conv4",
        ),
        (
            "model:\n  name: mlp\ndata:\n  synthetic_task: sinusoid\nmemory_optimization:\n  \
             precision: bf16\n",
            "memory_optimization.precision",
            "mlp",
        ),
        (
            "memory_optimization:\n  precision: f16\n  checkpointing:\n    enabled: true\n",
            "memory_optimization.checkpointing.enabled",
            "precision: bf16",
        ),
        (
            "model:\n  quantization: int4\n",
            "model.quantization",
            "none, int8",
        ),
        (
            "memory_optimization:\n  loss_scaling:\n    initial_scale: 0\n",
            "memory_optimization.loss_scaling.initial_scale",
            "greater than 0",
        ),
        (
            "memory_optimization:\n  loss_scaling:\n    growth_interval: 0\n",
            "memory_optimization.loss_scaling.growth_interval",
            "at least 1",
        ),
        (
            "meta_learning:\n  inner:\n    optimizer: adam\n",
            "meta_learning.inner.optimizer",
            "`maml` differentiates through its SGD steps; use `sgd`",
        ),
        (
            "meta_learning:\n  method: protonet\n  inner:\n    optimizer: adam\n",
            "meta_learning.inner.optimizer",
            "`protonet` has no such inner loop",
        ),
        (
            "meta_learning:\n  method: reptile\n  inner:\n    optimizer: adam\n    adam_beta2: 1\n",
            "meta_learning.inner.adam_beta2",
            "below 1",
        ),
        (
            "meta_learning:\n  inner:\n    optimizer: rmsprop\n",
            "meta_learning.inner.optimizer",
            "sgd, adam",
        ),
    ];
    for (yaml, expected_key, fix) in cases {
        let (key, message) = config_error(Config::from_yaml_str(yaml));
        assert_eq!(key, expected_key, "{yaml}");
        assert!(message.contains(fix), "{yaml}: {message}");
    }
}

/// A model that cannot read the configured tasks, LoRA settings for a model without
/// adapters and an image size a vision backbone cannot read are refused at validation, naming the
/// key and the fix; the pairings that work pass.
#[test]
fn models_and_data_sources_that_do_not_fit_are_refused() {
    let refused = [
        (
            "model:\n  name: conv4\ndata:\n  synthetic_task: images\nlora:\n  rank: 4\n",
            "lora.rank",
            "no LoRA",
        ),
        (
            "model:\n  name: mlp\ndata:\n  synthetic_task: sinusoid\nlora:\n  alpha: 4\n",
            "lora.alpha",
            "no LoRA",
        ),
        (
            "model:\n  name: conv4\ndata:\n  synthetic_task: images\nlora:\n  target_modules: \
             [query]\n",
            "lora.target_modules",
            "no LoRA",
        ),
        (
            "model:\n  name: conv4\ndata:\n  synthetic_task: images\ncomparison:\n  ablation:\n    \
             lora_ranks: [2, 4]\n",
            "comparison.ablation.lora_ranks",
            "no LoRA",
        ),
        (
            "model:\n  name: conv4\ndata:\n  synthetic_task: images\n  image_size: 12\n",
            "data.image_size",
            "at least 16",
        ),
        (
            "model:\n  name: resnet12\ndata:\n  synthetic_task: images\n  image_size: 12\n",
            "data.image_size",
            "at least 16",
        ),
        (
            "model:\n  name: resnet34\ndata:\n  synthetic_task: images\nlora:\n  rank: 4\n",
            "lora.rank",
            "no LoRA",
        ),
        (
            "model:\n  name: conv6\n",
            "model.name",
            "data.synthetic_task: images",
        ),
        (
            "data:\n  source: tabular\n  path: t.csv\n",
            "data.source",
            "model.name: mlp",
        ),
        (
            "model:\n  name: conv4\n",
            "model.name",
            "data.synthetic_task: images",
        ),
        (
            "model:\n  name: mlp\ndata:\n  source: wordnet\n",
            "model.name",
            "data.source: tabular",
        ),
        (
            "data:\n  source: omniglot\n  path: o\n",
            "model.name",
            "conv4",
        ),
        (
            "data:\n  synthetic_task: sinusoid\n",
            "data.synthetic_task",
            "model.name: mlp",
        ),
    ];
    for (yaml, expected_key, fix) in refused {
        let (key, message) = config_error(Config::from_yaml_str(yaml));
        assert_eq!(key, expected_key, "{yaml}");
        assert!(message.contains(fix), "{yaml}: {message}");
    }
    for yaml in [
        "model:\n  name: conv4\ndata:\n  synthetic_task: images\n  image_size: 32\n",
        "model:\n  name: conv4\ndata:\n  source: idx\n  path: x\n",
        // ResNet-18/34 round sizes up and read any image.
        "model:\n  name: resnet18\ndata:\n  synthetic_task: images\n  image_size: 12\n",
        "model:\n  name: resnet12\ndata:\n  source: omniglot\n  path: o\n",
        "model:\n  name: mlp\ndata:\n  source: tabular\n  path: t.csv\n",
        "model:\n  name: mlp\ndata:\n  synthetic_task: sinusoid\nlora:\n  rank: 8\n",
        "data:\n  source: wordnet\nlora:\n  rank: 2\n",
    ] {
        Config::from_yaml_str(yaml).unwrap_or_else(|e| panic!("{yaml}: {e}"));
    }
}

/// Sizes near `usize::MAX` used to pass validation and then overflow in the sampler
/// (`k_shot + n_query`) or in batching (`n_way × (k_shot + n_query)`).
#[test]
fn episode_sizes_that_overflow_are_config_errors() {
    let max = usize::MAX;
    for (yaml, expected_key) in [
        (format!("data:\n  k_shot: {max}\n"), "data.k_shot"),
        (format!("data:\n  n_query: {max}\n"), "data.k_shot"),
        (
            format!("data:\n  k_shot: {}\n  n_query: 2\n", max / 2 + 1),
            "data.k_shot",
        ),
        (format!("data:\n  n_way: {max}\n"), "data.n_way"),
        (format!("data:\n  n_way: {}\n", 1usize << 62), "data.n_way"),
        // Not overflowing, but beyond any episode that fits in memory.
        (
            format!("data:\n  n_way: 1000\n  k_shot: {}\n", 1 << 20),
            "data.k_shot",
        ),
        (
            "data:\n  n_way: 100000\n  k_shot: 100\n".to_string(),
            "data.n_way",
        ),
        (format!("data:\n  image_size: {max}\n"), "data.image_size"),
    ] {
        let (key, message) = config_error(Config::from_yaml_str(&yaml));
        assert_eq!(key, expected_key, "{yaml}: {message}");
        assert!(
            message.contains("too large") || message.contains("at most"),
            "{message}"
        );
    }
    // The largest allowed episode is still valid.
    let yaml = format!(
        "data:\n  n_way: 2\n  k_shot: {}\n  n_query: {}\n",
        MAX_EPISODE_EXAMPLES / 4,
        MAX_EPISODE_EXAMPLES / 4
    );
    Config::from_yaml_str(&yaml).unwrap();
}

/// Episode indices are `iteration × meta_batch_size + task` (u64): a run whose
/// indices overflow is refused before it starts.
#[test]
fn meta_batches_whose_episode_indices_overflow_are_config_errors() {
    let yaml = format!(
        "meta_learning:\n  num_iterations: {}\n  meta_batch_size: 4\n",
        usize::MAX / 2
    );
    let (key, message) = config_error(Config::from_yaml_str(&yaml));
    assert_eq!(key, "meta_learning.num_iterations", "{message}");
    assert!(message.contains("meta_batch_size"), "{message}");
}

/// Counts near `usize::MAX` that validated and then panicked: `lora.rank` (rank ×
/// features overflowed building the adapters), `meta_learning.inner.steps`,
/// `meta_batch_size`, `evaluation.val_episodes` and the Hessian probes ('capacity
/// overflow' allocating per-step vectors), and the comparison lists replacing them.
#[test]
fn counts_near_usize_max_are_config_errors() {
    for value in [usize::MAX, 1 << 62, validate::MAX_COUNT + 1] {
        for (yaml, key) in [
            (format!("lora:\n  rank: {value}\n"), "lora.rank"),
            (
                format!("meta_learning:\n  num_iterations: 1\n  meta_batch_size: {value}\n"),
                "meta_learning.meta_batch_size",
            ),
            (
                format!("meta_learning:\n  inner:\n    steps: {value}\n"),
                "meta_learning.inner.steps",
            ),
            (
                format!("memory_optimization:\n  hessian_approximation:\n    probes: {value}\n"),
                "memory_optimization.hessian_approximation.probes",
            ),
            (
                format!("evaluation:\n  episodes: {value}\n"),
                "evaluation.episodes",
            ),
            (
                format!("evaluation:\n  val_episodes: {value}\n"),
                "evaluation.val_episodes",
            ),
            (
                format!("comparison:\n  ablation:\n    lora_ranks: [2, {value}]\n"),
                "comparison.ablation.lora_ranks",
            ),
            (
                format!("comparison:\n  ablation:\n    inner_steps: [{value}]\n"),
                "comparison.ablation.inner_steps",
            ),
            (
                format!("comparison:\n  memory_inner_steps: [1, {value}]\n"),
                "comparison.memory_inner_steps",
            ),
        ] {
            let (found, message) = config_error(Config::from_yaml_str(&yaml));
            assert_eq!(found, key, "{yaml}: {message}");
            assert!(message.contains("at most"), "{message}");
        }
    }
    let at_limit = format!("lora:\n  rank: {}\n", validate::MAX_COUNT);
    Config::from_yaml_str(&at_limit).unwrap();
}

/// `meta_learning.protonet` resolves to the learner and its comparison variant, and
/// refuses a scale that is not positive.
#[test]
fn protonet_settings_resolve_and_are_checked() {
    let config = Config::from_yaml_str(
        "meta_learning:\n  method: protonet\n  protonet:\n    distance: cosine\n    \
         cosine_scale: 5\n",
    )
    .unwrap();
    assert_eq!(
        LearnerSpec::of(&config),
        LearnerSpec::ProtoNet {
            distance: PrototypeDistance::Cosine,
            cosine_scale: 5.0
        }
    );
    assert_eq!(Variant::of(&config), Variant::ProtonetCosine);
    assert_eq!(LearnerSpec::of(&config).label(), "protonet (cosine)");
    let euclidean = Variant::Protonet.apply(&config);
    assert_eq!(Variant::of(&euclidean), Variant::Protonet);
    assert!(LearnerSpec::of(&euclidean).meta_trains());
    let (key, message) = config_error(Config::from_yaml_str(
        "meta_learning:\n  protonet:\n    cosine_scale: 0\n",
    ));
    assert_eq!(key, "meta_learning.protonet.cosine_scale");
    assert!(message.contains("greater than 0"), "{message}");
    let (key, _) = config_error(Config::from_yaml_str(
        "meta_learning:\n  protonet:\n    distance: manhattan\n",
    ));
    assert_eq!(key, "meta_learning.protonet.distance");
}

#[test]
fn image_folder_options_are_refused_with_other_sources() {
    for (key, yaml) in [
        (
            "data.train_aug",
            "data:\n  source: omniglot\n  path: o\n  train_aug: true\n",
        ),
        (
            "data.split_file",
            "data:\n  source: idx\n  path: i\n  split_file: s.csv\n",
        ),
    ] {
        let (got, message) = config_error(Config::from_yaml_str(yaml));
        assert_eq!(got, key);
        assert!(message.contains("image_folder only"), "{message}");
    }
    let config = Config::from_yaml_str(
        "model:\n  name: resnet18\ndata:\n  source: image_folder\n  path: photos\n  \
         color: grey\n  normalization: none\n  train_aug: true\n",
    )
    .unwrap();
    assert_eq!(config.data.color, super::ImageColor::Grey);
    let (_, message) = config_error(Config::from_yaml_str(
        "data:\n  source: image_folder\n  path: p\n  color: cmyk\n",
    ));
    assert!(
        message.contains("rgb") && message.contains("grey"),
        "{message}"
    );
}
