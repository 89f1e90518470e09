//! The report of a `melora full` experiment: comparison table, paired statistics,
//! ablation, memory, and plots, rendered from the experiment folder's `results.json`
//! and each run's `metrics.jsonl` (so `melora report` can redraw it at any time).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::memory::format_bytes;
use crate::track::read_metrics;
use crate::train::{load_results, Comparison, FullResults};
use crate::Result;

use super::{plots, Report, Section, Table};

/// Folder of the plots, inside the experiment folder.
const PLOTS: &str = "plots";

fn bytes(b: Option<u64>) -> String {
    b.map_or("–".into(), format_bytes)
}

fn p_value(p: Option<f64>) -> String {
    match p {
        Some(p) if p < 1e-4 => format!("{p:.1e}"),
        Some(p) => format!("{p:.4}"),
        None => "–".into(),
    }
}

/// The comparison table: one row per method, the configured one first.
pub fn comparison_table(results: &FullResults) -> Table {
    let metric = if results.regression {
        "MSE"
    } else {
        "accuracy"
    };
    let level = (results.confidence * 100.0).round();
    let mut headers = vec!["method".to_string(), format!("{metric} ± {level}% CI")];
    if !results.regression {
        headers.push("macro-F1".into());
    }
    headers.extend([
        "peak memory".into(),
        "s / meta-iteration".into(),
        "adaptation ms / task".into(),
        "seeds".into(),
    ]);
    let rows = results
        .methods
        .iter()
        .map(|m| {
            let mut row = vec![
                m.label.clone(),
                format!("{:.4} ± {:.4}", m.headline.mean, m.headline.half_width),
            ];
            if !results.regression {
                row.push(m.macro_f1.map_or("–".into(), |f| format!("{f:.4}")));
            }
            row.extend([
                bytes(m.peak_bytes),
                m.seconds_per_iteration
                    .map_or("– (no meta-training)".into(), |s| format!("{s:.3}")),
                format!("{:.1}", m.adapt_seconds * 1e3),
                m.seeds.to_string(),
            ]);
            row
        })
        .collect();
    Table { headers, rows }
}

/// The paired statistics of the configured method against each other method.
pub fn statistics_table(results: &FullResults) -> Table {
    paired_table(&results.comparisons, "vs", |c| &c.baseline)
}

/// The paired statistics of every method with meta-learning against the best
/// baseline without it.
pub fn best_baseline_table(results: &FullResults) -> Table {
    paired_table(&results.against_best_baseline, "method", |c| &c.method)
}

/// One row per comparison, named by `name`.
fn paired_table(
    comparisons: &[Comparison],
    first: &str,
    name: fn(&Comparison) -> &String,
) -> Table {
    let headers = [
        first,
        "mean difference",
        "bootstrap CI of the difference",
        "paired t (p)",
        "Wilcoxon W (p)",
        "Cohen's d",
    ]
    .map(String::from)
    .to_vec();
    let rows = comparisons
        .iter()
        .map(|c| {
            vec![
                name(c).clone(),
                format!("{:+.4}", c.mean_difference),
                c.bootstrap
                    .map_or("–".into(), |(lo, hi)| format!("[{lo:+.4}, {hi:+.4}]")),
                c.t_test.map_or("–".into(), |t| {
                    format!("{:.3} ({})", t.statistic, p_value(Some(t.p_value)))
                }),
                c.wilcoxon.map_or("–".into(), |w| {
                    format!("{:.1} ({})", w.statistic, p_value(Some(w.p_value)))
                }),
                c.cohens_d.map_or("–".into(), |d| format!("{d:+.3}")),
            ]
        })
        .collect();
    Table { headers, rows }
}

/// Writes the plots and `report.md` / `report.html` of the experiment in `dir`;
/// returns the report's two paths.
pub fn write_experiment_report(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let results = load_results(dir)?;
    let plot_dir = dir.join(PLOTS);
    std::fs::create_dir_all(&plot_dir).map_err(|e| crate::Error::io(&plot_dir, e))?;
    let relative = |name: &str| PathBuf::from(PLOTS).join(format!("{name}.png"));
    let metric = if results.regression {
        "MSE"
    } else {
        "accuracy"
    };

    let mut summary = Section::new("Comparison").paragraph(format!(
        "Every method was evaluated on the same {} meta-test episodes (episode seed {}); \
         intervals are {}% t intervals over episodes (each episode's score averaged over \
         seeds). Peak memory is the counting allocator's peak of the training run (model, \
         data and graphs), or of the evaluation for methods without meta-training.{}",
        results.episodes,
        results.episode_seed,
        (results.confidence * 100.0).round(),
        if results.interrupted {
            " The comparison was interrupted: only finished runs are shown."
        } else {
            ""
        }
    ));
    summary = summary.table(comparison_table(&results));
    let mut report = Report::new(format!("melora experiment `{}`", results.experiment));
    report = report.section(summary);

    if !results.comparisons.is_empty() {
        report = report.section(
            Section::new(format!(
                "Paired statistics: {} against each method",
                results.main
            ))
            .paragraph(format!(
                "Differences are {} − other in {metric}, paired by test episode. Tests are \
                     two-sided; the bootstrap interval uses 2,000 resamples of the episodes.",
                results.main
            ))
            .table(statistics_table(&results)),
        );
    }
    if let Some(best) = results.against_best_baseline.first() {
        report = report.section(
            Section::new(format!(
                "Does meta-learning pay off? Each method against the best baseline ({})",
                best.baseline
            ))
            .paragraph(format!(
                "The baseline without meta-learning with the best mean {metric} is {}; \
                 differences are method − {} in {metric}, paired by test episode.",
                best.baseline, best.baseline
            ))
            .table(best_baseline_table(&results)),
        );
    }

    // Training curves of each method's first seed.
    let mut curves: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    let mut validation: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    let mut seen = Vec::new();
    for run in &results.runs {
        let Some(run_dir) = &run.run_dir else {
            continue;
        };
        if seen.contains(&run.label) || run.label.starts_with("ablation-") {
            continue;
        }
        seen.push(run.label.clone());
        let Ok(rows) = read_metrics(&run_dir.join("metrics.jsonl")) else {
            continue;
        };
        let series = |key: &str| -> Vec<(f64, f64)> {
            rows.iter()
                .filter_map(|r| r.values.get(key).map(|v| (r.step as f64, *v)))
                .filter(|(_, v)| v.is_finite())
                .collect()
        };
        curves.push((run.label.clone(), series("train/query_loss")));
        validation.push((run.label.clone(), series("val/score")));
    }
    let mut training = Section::new("Meta-training");
    if curves.iter().any(|(_, s)| !s.is_empty()) {
        plots::training_curves(
            plot_dir.join("training-loss"),
            &curves,
            "query loss after adaptation",
        )?;
        training = training.image(
            relative("training-loss"),
            "Query loss after adaptation per meta-iteration",
        );
        let val_label = if results.regression {
            "validation score (− MSE)"
        } else {
            "validation accuracy"
        };
        plots::training_curves(plot_dir.join("validation"), &validation, val_label)?;
        training = training.image(relative("validation"), val_label);
        report = report.section(training);
    }

    if results.runs.iter().any(|r| !r.curve.is_empty()) {
        report = curve_section(report, &results, &plot_dir, metric)?;
    }

    let pareto: Vec<(String, u64, f64, f64)> = results
        .methods
        .iter()
        .filter_map(|m| {
            m.peak_bytes
                .map(|b| (m.label.clone(), b, m.headline.mean, m.headline.half_width))
        })
        .collect();
    if !pareto.is_empty() && !results.regression {
        plots::pareto(plot_dir.join("pareto"), &pareto)?;
        report = report.section(Section::new("Accuracy against peak memory").image(
            relative("pareto"),
            "Accuracy vs peak memory; the grey line is the Pareto front",
        ));
    }

    if !results.memory_vs_k.is_empty() {
        let mut by_label: BTreeMap<String, Vec<(usize, u64)>> = BTreeMap::new();
        for p in &results.memory_vs_k {
            by_label
                .entry(p.label.clone())
                .or_default()
                .push((p.k, p.peak_bytes));
        }
        let series: Vec<(String, Vec<(usize, u64)>)> = by_label.into_iter().collect();
        plots::memory_vs_k(plot_dir.join("memory-vs-k"), &series)?;
        let mut ks: Vec<usize> = results.memory_vs_k.iter().map(|p| p.k).collect();
        ks.sort_unstable();
        ks.dedup();
        let mut headers = vec!["method".to_string()];
        headers.extend(ks.iter().map(|k| format!("K = {k}")));
        let rows = series
            .iter()
            .map(|(label, points)| {
                let mut row = vec![label.clone()];
                row.extend(ks.iter().map(|k| {
                    points
                        .iter()
                        .find(|(pk, _)| pk == k)
                        .map_or("–".into(), |(_, b)| format_bytes(*b))
                }));
                row
            })
            .collect();
        report = report.section(
            Section::new("Peak memory against inner steps")
                .paragraph(
                    "Peak heap bytes of one task's meta-gradient above the model and its \
                     parameters, measured by the counting allocator.",
                )
                .table(Table { headers, rows })
                .image(
                    relative("memory-vs-k"),
                    "Peak memory of one task's meta-gradient vs K",
                ),
        );
    }

    if !results.ablation.is_empty() {
        let mut section = Section::new("Ablation").table(Table {
            headers: ["LoRA rank", "inner steps", "Hessian", metric, "peak memory"]
                .map(String::from)
                .to_vec(),
            rows: results
                .ablation
                .iter()
                .map(|p| {
                    vec![
                        p.lora_rank.to_string(),
                        p.inner_steps.to_string(),
                        p.hessian.map_or("–".into(), |h| h.to_string()),
                        format!("{:.4} ± {:.4}", p.headline.mean, p.headline.half_width),
                        bytes(p.peak_bytes),
                    ]
                })
                .collect(),
        });
        let mut hessians: Vec<Option<String>> = Vec::new();
        for p in &results.ablation {
            let h = p.hessian.map(|h| h.to_string());
            if !hessians.contains(&h) {
                hessians.push(h);
            }
        }
        for h in hessians {
            let points: Vec<_> = results
                .ablation
                .iter()
                .filter(|p| p.hessian.map(|k| k.to_string()) == h)
                .collect();
            let mut ranks: Vec<usize> = points.iter().map(|p| p.lora_rank).collect();
            ranks.sort_unstable();
            ranks.dedup();
            let mut ks: Vec<usize> = points.iter().map(|p| p.inner_steps).collect();
            ks.sort_unstable();
            ks.dedup();
            let values: Vec<Vec<f64>> = ranks
                .iter()
                .map(|r| {
                    ks.iter()
                        .map(|k| {
                            points
                                .iter()
                                .find(|p| p.lora_rank == *r && p.inner_steps == *k)
                                .map_or(f64::NAN, |p| p.headline.mean)
                        })
                        .collect()
                })
                .collect();
            let name = format!("ablation-{}", h.as_deref().unwrap_or("grid"));
            let title = match &h {
                Some(h) => format!("{metric}: rank × inner steps, Hessian {h}"),
                None => format!("{metric}: rank × inner steps"),
            };
            plots::heatmap(
                plot_dir.join(&name),
                &ranks.iter().map(|r| format!("r={r}")).collect::<Vec<_>>(),
                &ks.iter().map(|k| format!("K={k}")).collect::<Vec<_>>(),
                &values,
                &title,
            )?;
            section = section.image(relative(&name), title);
        }
        report = report.section(section);
    }
    report.write(dir)
}

/// The score-against-steps table and plot, and each sinusoid fit (Finn et al.'s
/// Figures 3 and 2), of the runs that have them.
fn curve_section(
    report: Report,
    results: &FullResults,
    plot_dir: &Path,
    metric: &str,
) -> Result<Report> {
    let runs: Vec<_> = results
        .runs
        .iter()
        .filter(|r| !r.curve.is_empty())
        .collect();
    let several_seeds = runs
        .iter()
        .any(|r| runs.iter().any(|o| o.label == r.label && o.seed != r.seed));
    let name = |r: &crate::train::RunRecord| {
        if several_seeds {
            format!("{} (seed {})", r.label, r.seed)
        } else {
            r.label.clone()
        }
    };
    let mut steps: Vec<usize> = runs
        .iter()
        .flat_map(|r| r.curve.iter().map(|p| p.steps))
        .collect();
    steps.sort_unstable();
    steps.dedup();
    let mut headers = vec!["method".to_string()];
    headers.extend(steps.iter().map(|s| format!("{s} steps")));
    let rows = runs
        .iter()
        .map(|r| {
            let mut row = vec![name(r)];
            row.extend(steps.iter().map(|s| {
                r.curve
                    .iter()
                    .find(|p| p.steps == *s)
                    .map_or("–".into(), |p| match p.headline {
                        Some(h) => format!("{:.4} ± {:.4}", h.mean, h.half_width),
                        None => "diverged".into(),
                    })
            }));
            row
        })
        .collect();
    let series: Vec<(String, Vec<(usize, f64)>)> = runs
        .iter()
        .map(|r| {
            let points = r
                .curve
                .iter()
                .map(|p| (p.steps, p.headline.map_or(f64::NAN, |h| h.mean)))
                .collect();
            (name(r), points)
        })
        .collect();
    plots::score_vs_steps(plot_dir.join("score-vs-steps"), &series, metric)?;
    let relative = |name: &str| PathBuf::from(PLOTS).join(format!("{name}.png"));
    let mut section = Section::new("Score against adaptation steps")
        .paragraph(format!(
            "Each method adapted again to the same {} test tasks with each number of \
             steps of its inner loop (0: its starting parameters as they are); the \
             pre-trained baseline takes the same SGD steps (`meta_learning.inner`){}. \
             \"diverged\": adaptation reached a non-finite loss on a test task.",
            results.episodes,
            results
                .runs
                .iter()
                .find_map(|r| r.curve_lr)
                .map_or(String::new(), |lr| format!(
                    " with the step size that scored best on meta-validation tasks after \
                     the most steps, {lr}"
                ))
        ))
        .table(Table { headers, rows })
        .image(
            relative("score-vs-steps"),
            format!("{metric} against adaptation steps"),
        );
    let mut drawn = Vec::new();
    for run in runs {
        let Some(fit) = &run.fit else {
            continue;
        };
        if drawn.contains(&run.label) {
            continue;
        }
        drawn.push(run.label.clone());
        let truth = fit
            .grid
            .iter()
            .map(|&x| (x, fit.amplitude * (x - fit.phase).sin()))
            .collect();
        let mut lines = vec![("true function".to_string(), truth)];
        for p in &fit.predictions {
            let label = match p.steps {
                0 => "before adaptation".to_string(),
                1 => "after 1 step".to_string(),
                s => format!("after {s} steps"),
            };
            lines.push((
                label,
                fit.grid
                    .iter()
                    .copied()
                    .zip(p.values.iter().copied())
                    .collect(),
            ));
        }
        let file = format!("fit-{}", run.label.replace([' ', '(', ')', '/'], "_"));
        let title = format!(
            "{}: test task {} (amplitude {:.2}, phase {:.2})",
            run.label, fit.task, fit.amplitude, fit.phase
        );
        plots::regression_fit(plot_dir.join(&file), &title, &lines, &fit.support)?;
        section = section.image(relative(&file), title);
    }
    Ok(report.section(section))
}
