use super::*;
use crate::config::{HessianKind, InnerMode};

fn row(variant: Variant, k: usize, checkpointing: bool, peak: u64) -> MemoryRow {
    let point = GridPoint {
        variant,
        k,
        checkpointing,
        precision: Precision::F32,
    };
    MemoryRow::new(
        &point,
        Err("no planner".into()),
        Ok(Measurement {
            peak_bytes: Some(peak),
            baseline_bytes: Some(peak / 2),
            model_bytes: Some(peak / 4),
            rss_bytes: Some(2 * peak),
            seconds: vec![0.3, 0.1, 0.2],
            seconds_per_iter: 0.2,
            kernel_threads: 1,
            matmul_share: None,
            first_step: None,
        }),
    )
}

fn bench(rows: Vec<MemoryRow>) -> MemoryBench {
    let config = bench_config(&BenchModel::Builtin(QUICK_MODEL.into()));
    let mut b = MemoryBench::new(ModelInfo::of(&config).unwrap(), true, 3, rows.len());
    for r in rows {
        b.push(r);
    }
    b
}

const MIB: u64 = 1 << 20;

#[test]
fn grids_cover_every_combination_headline_first() {
    let full = Grid::full().points();
    assert_eq!(full.len(), 7 * 4 * 2 * 2);
    let quick = Grid::quick().points();
    assert_eq!(quick.len(), 7 * 2 * 2);
    assert_eq!(
        quick[0],
        GridPoint {
            variant: Variant::MamlFullGraph,
            k: 1,
            checkpointing: false,
            precision: Precision::F32
        }
    );
    assert!(quick[..14].iter().all(|p| !p.checkpointing));
    let mut distinct = full.clone();
    distinct.dedup();
    assert_eq!(distinct.len(), full.len());
}

#[test]
fn rows_name_method_and_mode_as_the_schema_says() {
    let names: Vec<(String, Option<String>)> = VARIANTS
        .iter()
        .map(|&v| (method_of(v).to_string(), mode_of(v)))
        .collect();
    let s = |x: &str| Some(x.to_string());
    assert_eq!(
        names,
        vec![
            ("maml".into(), s("full_graph")),
            ("maml".into(), s("recompute")),
            ("fomaml".into(), None),
            ("reptile".into(), None),
            ("melora".into(), s("diagonal")),
            ("melora".into(), s("gauss_newton")),
            ("melora".into(), s("block_diagonal")),
        ]
    );
    assert_eq!(label(Variant::MamlFullGraph), "maml (full graph)");
    let json = serde_json::to_value(row(Variant::Fomaml, 8, true, MIB)).unwrap();
    assert_eq!(json["method"], "fomaml");
    assert_eq!(json["mode"], serde_json::Value::Null);
    assert_eq!(json["precision"], "f32");
    assert_eq!(json["checkpointing"], true);
    assert_eq!(json["predicted_bytes"], serde_json::Value::Null);
    assert_eq!(json["seconds_per_iter"], 0.2);
}

#[test]
fn row_configs_set_the_point_and_refused_combinations_fail_validation() {
    let base = bench_config(&BenchModel::Builtin(DEFAULT_MODEL.into()));
    assert_eq!(
        (
            base.model.max_length,
            base.lora.rank,
            base.meta_learning.meta_batch_size
        ),
        (32, 8, 4)
    );
    let point = GridPoint {
        variant: Variant::MeloraGaussNewton,
        k: 4,
        checkpointing: true,
        precision: Precision::Bf16,
    };
    let c = row_config(&base, &point);
    assert_eq!(c.meta_learning.method, Method::Melora);
    assert_eq!(
        c.memory_optimization.hessian_approximation.kind,
        HessianKind::GaussNewton
    );
    assert_eq!(c.meta_learning.inner.steps, 4);
    assert!(c.memory_optimization.checkpointing.enabled);
    c.validate().unwrap();
    let full = row_config(
        &base,
        &GridPoint {
            variant: Variant::MamlFullGraph,
            ..point
        },
    );
    assert_eq!(full.meta_learning.inner.mode, InnerMode::FullGraph);
    let f16 = row_config(
        &base,
        &GridPoint {
            precision: Precision::F16,
            ..point
        },
    );
    assert!(f16.validate().is_err());
}

#[test]
fn model_info_reads_the_builtin_architecture() {
    let info = ModelInfo::of(&bench_config(&BenchModel::Builtin(DEFAULT_MODEL.into()))).unwrap();
    assert_eq!(info.family.as_deref(), Some("bert"));
    let text = info.describe();
    assert!(
        text.contains("6 layers, width 384, 12 heads, FFN 1536, vocab 30522"),
        "{text}"
    );
    assert!(
        text.contains(
            "LoRA r=8 on query, value + head; 5-way 5-shot, 5 queries, 32 tokens; meta-batch 4"
        ),
        "{text}"
    );
}

#[test]
fn summary_compares_with_full_graph_maml_and_checks_acceptance() {
    let rows = vec![
        row(Variant::MamlFullGraph, 1, false, 100 * MIB),
        row(Variant::MamlFullGraph, 8, false, 500 * MIB),
        row(Variant::Maml, 1, false, 100 * MIB),
        row(Variant::Maml, 8, false, 90 * MIB),
        row(Variant::Fomaml, 1, false, 20 * MIB),
        row(Variant::Fomaml, 8, false, 80 * MIB),
        row(Variant::MamlFullGraph, 8, true, 200 * MIB),
        row(Variant::Maml, 8, true, 60 * MIB),
        row(Variant::Fomaml, 8, true, 40 * MIB),
    ];
    let b = bench(rows);
    let s = &b.summary;
    assert_eq!(s.ks, vec![1, 8]);
    let fomaml8 = s
        .relative_to_full_graph_maml
        .iter()
        .find(|r| r.variant == Variant::Fomaml && r.k == 8 && !r.checkpointing)
        .unwrap();
    assert!((fomaml8.ratio - 0.16).abs() < 1e-12);
    assert_eq!(s.acceptance.len(), 2);
    let off = &s.acceptance[0];
    assert!(!off.checkpointing);
    assert!((off.over_full_graph.unwrap() - 0.18).abs() < 1e-12);
    assert!((off.over_fomaml.unwrap() - 1.125).abs() < 1e-12);
    assert_eq!(off.met(), Some(true));
    // With checkpointing: 30% of full graph, 1.5× FOMAML.
    assert_eq!(s.acceptance[1].met(), Some(false));

    let md = b.to_markdown();
    assert!(md.contains("| maml | full_graph | 8 | off | f32 |"), "{md}");
    assert!(
        md.contains("| fomaml | 20.0% (20.0 MiB) | 16.0% (80.0 MiB) |"),
        "{md}"
    );
    assert!(
        md.contains("f32, checkpointing off: recompute-MAML at K=8 uses 18.0% of full-graph MAML's peak (≤ 20.0%: yes) and 1.12× FOMAML's (≤ 1.25×: yes): met."),
        "{md}"
    );
    assert!(
        md.contains("checkpointing on: recompute-MAML at K=8"),
        "{md}"
    );
    assert!(md.contains(": NOT met."), "{md}");
    assert!(
        md.contains("![Peak memory against K, f32, checkpointing off](memory.png)"),
        "{md}"
    );
    assert!(md.contains("(memory-f32-checkpointing.png)"), "{md}");
}

#[test]
fn failed_and_skipped_points_are_reported_not_compared() {
    let point = GridPoint {
        variant: Variant::Reptile,
        k: 2,
        checkpointing: false,
        precision: Precision::F32,
    };
    let mut b = bench(vec![MemoryRow::new(
        &point,
        Err("no planner".into()),
        Err("out of memory".into()),
    )]);
    b.skip(SkippedRow::new(
        &GridPoint {
            precision: Precision::F16,
            checkpointing: true,
            ..point
        },
        "f16 with checkpointing is refused".into(),
    ));
    assert!(b.summary.relative_to_full_graph_maml.is_empty());
    assert!(b.summary.acceptance.is_empty());
    let md = b.to_markdown();
    assert!(md.contains("failed: out of memory"), "{md}");
    assert!(md.contains("## Skipped"), "{md}");
    assert!(md.contains("f16 with checkpointing is refused"), "{md}");
    let json = serde_json::to_value(&b).unwrap();
    assert_eq!(json["rows"][0]["error"], "out of memory");
    assert_eq!(json["rows"][0]["peak_bytes"], serde_json::Value::Null);
    assert_eq!(json["skipped"][0]["precision"], "f16");
}

#[test]
fn results_are_written_and_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let b = bench(vec![
        row(Variant::MamlFullGraph, 1, false, 100 * MIB),
        row(Variant::MamlFullGraph, 8, false, 500 * MIB),
        row(Variant::Maml, 1, false, 100 * MIB),
        row(Variant::Maml, 8, false, 90 * MIB),
    ]);
    let (json, md, png) = b.write(dir.path()).unwrap();
    assert_eq!(png, dir.path().join("memory.png"));
    assert!(png.exists() && dir.path().join("memory.svg").exists());
    assert!(std::fs::read_to_string(md)
        .unwrap()
        .starts_with("# Peak memory"));
    let back: MemoryBench = serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
    assert_eq!(back, b);
}

#[test]
fn tasks_have_the_configured_shape_and_length() {
    use crate::data::EpisodeSource;
    let config = bench_config(&BenchModel::Builtin(QUICK_MODEL.into()));
    let episode = tasks(&config).episode(3).unwrap();
    let tokens = episode.support.tokens().unwrap();
    assert_eq!(tokens.input_ids.dims(), &[25, 32]);
    assert_eq!(episode.query.tokens().unwrap().input_ids.dims(), &[25, 32]);
}

#[test]
fn median_of_odd_and_even_counts() {
    assert_eq!(measure::median(&[3.0, 1.0, 2.0]), 2.0);
    assert_eq!(measure::median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    assert!(measure::median(&[]).is_nan());
}

#[test]
fn predictions_come_from_the_planner_where_it_models_the_configuration() {
    let base = quick_config();
    let point = GridPoint {
        variant: Variant::MamlFullGraph,
        k: 2,
        checkpointing: false,
        precision: Precision::F32,
    };
    // The planner measures, and other tests allocate beside it in this process: the
    // relations between its figures are `tests/plan_relations.rs`'s, which runs them
    // one at a time.
    let two = predicted_bytes(&row_config(&base, &point)).unwrap();
    let one = predicted_bytes(&row_config(&base, &GridPoint { k: 1, ..point })).unwrap();
    assert!(two > 0 && one > 0, "{one} {two}");
    let bf16 = row_config(
        &base,
        &GridPoint {
            precision: Precision::Bf16,
            ..point
        },
    );
    assert!(predicted_bytes(&bf16).unwrap() > 0);
}

#[test]
fn predictions_leave_out_loading_which_the_measurement_starts_after() {
    // The benchmark measures after a warm-up, so its prediction is the meta-steps'
    // peak without loading (which `tests/plan_relations.rs` shows peaking above
    // them, one plan at a time: here other tests allocate beside the planner).
    let base = bench_config(&BenchModel::Builtin("tiny-bert".into()));
    let config = row_config(
        &base,
        &GridPoint {
            variant: Variant::Fomaml,
            k: 1,
            checkpointing: true,
            precision: Precision::Bf16,
        },
    );
    let plan = crate::plan::plan(&config).unwrap();
    assert_eq!(
        plan.peak_bytes,
        plan.load_peak_bytes.max(plan.step_peak_bytes())
    );
    assert!(predicted_bytes(&config).unwrap() > 0);
}

#[test]
fn a_resumed_bench_keeps_earlier_rows_and_measures_the_rest() {
    let mut failed = row(Variant::Fomaml, 8, false, 5 * MIB);
    failed.error = Some("killed".into());
    let earlier = bench(vec![row(Variant::Reptile, 1, false, 3 * MIB), failed]);
    let earlier = MemoryBench {
        points: 2,
        date: "2026-01-01T00:00:00Z".into(),
        ..earlier
    };
    let grid = Grid {
        variants: vec![Variant::MamlFullGraph, Variant::Reptile],
        ks: vec![1],
        checkpointing: vec![false],
        precisions: vec![Precision::F32],
    }
    .points();
    let mut now = bench(vec![]);
    now.resume(earlier.clone(), &grid).unwrap();
    assert_eq!(now.date, earlier.date, "the first run's start date");
    assert_eq!(now.points, 3, "reptile K=1 counted once");
    assert!(now.has_measured(&row(Variant::Reptile, 1, false, 0).point()));
    assert!(
        !now.has_measured(&row(Variant::Fomaml, 8, false, 0).point()),
        "a failed point is measured again"
    );
    assert!(!now.has_measured(&grid[0]));

    now.push(row(Variant::Fomaml, 8, false, 4 * MIB));
    now.push(row(Variant::MamlFullGraph, 1, false, 9 * MIB));
    let order: Vec<(Variant, Option<u64>, bool)> = now
        .rows
        .iter()
        .map(|r| (r.variant, r.peak_bytes, r.error.is_some()))
        .collect();
    assert_eq!(
        order,
        vec![
            (Variant::MamlFullGraph, Some(9 * MIB), false),
            (Variant::Fomaml, Some(4 * MIB), false),
            (Variant::Reptile, Some(3 * MIB), false),
        ],
        "grid order, the failed row replaced"
    );
    assert!(now.rows.iter().all(|r| r.measured_at.is_some()));
}

#[test]
fn resuming_refuses_results_that_would_not_compare() {
    let earlier = bench(vec![row(Variant::Reptile, 1, false, MIB)]);
    let mut other_iterations = bench(vec![]);
    other_iterations.iterations = 5;
    let e = other_iterations.resume(earlier.clone(), &[]).unwrap_err();
    assert!(e.contains("--iterations 3") && e.contains("use 5"), "{e}");

    let mut other_model = bench(vec![]);
    other_model.model.lora_rank = 4;
    let e = other_model.resume(earlier.clone(), &[]).unwrap_err();
    assert!(e.contains("the model") && e.contains("r=8"), "{e}");

    let mut other_machine = bench(vec![]);
    other_machine.machine.kernel_threads += 1;
    let e = other_machine.resume(earlier, &[]).unwrap_err();
    assert!(e.contains("the machine"), "{e}");
}

#[test]
fn skipped_rows_name_their_grid_point() {
    for point in Grid::full().points() {
        let skipped = SkippedRow::new(&point, "refused".into());
        assert_eq!(skipped.point(), Some(point));
    }
}

/// A baseline's point times its adaptation to test tasks (it has no meta-iteration),
/// and MetaSGD's its meta-iterations with the step sizes.
#[test]
fn baselines_and_metasgd_are_measured() {
    for method in [
        crate::config::Method::Finetune,
        crate::config::Method::Metasgd,
    ] {
        let mut c = Config::default();
        c.model.max_length = 8;
        c.data.n_way = 2;
        c.data.k_shot = 1;
        c.data.n_query = 1;
        c.meta_learning.meta_batch_size = 1;
        c.meta_learning.method = method;
        c.evaluation.finetune_steps = 2;
        let m = measure::measure(&c, 2).unwrap();
        assert_eq!(m.seconds.len(), 2, "{method}");
        assert!(m.seconds_per_iter > 0.0);
    }
}
