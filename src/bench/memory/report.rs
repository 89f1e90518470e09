//! The memory benchmark's summary (each method against full-graph MAML), Markdown
//! and plots.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{label, GridPoint, MemoryBench, MemoryRow, VARIANTS};
use crate::config::{Precision, Variant};
use crate::memory::format_bytes;
use crate::report::plots::memory_vs_k;
use crate::report::Table;
use crate::Result;

/// The acceptance bound on recompute-MAML's peak over full-graph MAML's at the
/// largest K.
pub const MAX_OVER_FULL_GRAPH: f64 = 0.20;
/// The acceptance bound on recompute-MAML's peak over FOMAML's at the largest K.
pub const MAX_OVER_FOMAML: f64 = 1.25;

/// One method's peak against full-graph MAML's at the same K, precision and
/// checkpointing setting.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Relative {
    /// The method.
    pub variant: Variant,
    /// Precision.
    pub precision: Precision,
    /// Gradient checkpointing.
    pub checkpointing: bool,
    /// Inner steps K.
    pub k: usize,
    /// The method's peak.
    pub peak_bytes: u64,
    /// Full-graph MAML's peak at the same point.
    pub full_graph_maml_bytes: u64,
    /// `peak_bytes / full_graph_maml_bytes`.
    pub ratio: f64,
}

/// Recompute-MAML against full-graph MAML and FOMAML at the largest K of the grid.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Acceptance {
    /// Precision.
    pub precision: Precision,
    /// Gradient checkpointing.
    pub checkpointing: bool,
    /// Inner steps K (the grid's largest).
    pub k: usize,
    /// Recompute-MAML's peak over full-graph MAML's, if both were measured.
    pub over_full_graph: Option<f64>,
    /// Recompute-MAML's peak over FOMAML's, if both were measured.
    pub over_fomaml: Option<f64>,
    /// Whether `over_full_graph <= MAX_OVER_FULL_GRAPH` (`None`: not measured).
    pub within_full_graph_bound: Option<bool>,
    /// Whether `over_fomaml <= MAX_OVER_FOMAML` (`None`: not measured).
    pub within_fomaml_bound: Option<bool>,
}

impl Acceptance {
    /// Whether both ratios were measured and both are within their bounds.
    pub fn met(&self) -> Option<bool> {
        Some(self.within_full_graph_bound? && self.within_fomaml_bound?)
    }
}

/// The comparison with full-graph MAML, recomputed from the rows.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Smallest and largest K of the measured rows (1 and 8 on both grids).
    pub ks: Vec<usize>,
    /// Every measured method at those K, against full-graph MAML.
    pub relative_to_full_graph_maml: Vec<Relative>,
    /// Recompute-MAML at the largest K, per precision and checkpointing setting.
    pub acceptance: Vec<Acceptance>,
    /// The bound on recompute over full-graph MAML.
    pub max_over_full_graph: f64,
    /// The bound on recompute over FOMAML.
    pub max_over_fomaml: f64,
}

fn peak(rows: &[MemoryRow], point: GridPoint) -> Option<u64> {
    rows.iter()
        .find(|r| r.point() == point)
        .and_then(|r| r.peak_bytes)
        .filter(|&b| b > 0)
}

/// Precision × checkpointing combinations present in `rows`, f32 and "off" first.
fn settings(rows: &[MemoryRow]) -> Vec<(Precision, bool)> {
    let mut out: Vec<(Precision, bool)> = Vec::new();
    for r in rows {
        if !out.contains(&(r.precision, r.checkpointing)) {
            out.push((r.precision, r.checkpointing));
        }
    }
    out.sort_by_key(|&(p, c)| (Precision::ALL.iter().position(|x| *x == p), c));
    out
}

impl Summary {
    /// The summary of `rows`.
    pub fn of(rows: &[MemoryRow]) -> Self {
        let measured: Vec<&MemoryRow> = rows.iter().filter(|r| r.peak_bytes.is_some()).collect();
        let ks = match (
            measured.iter().map(|r| r.k).min(),
            measured.iter().map(|r| r.k).max(),
        ) {
            (Some(a), Some(b)) if a == b => vec![a],
            (Some(a), Some(b)) => vec![a, b],
            _ => Vec::new(),
        };
        let mut relative = Vec::new();
        let mut acceptance = Vec::new();
        for (precision, checkpointing) in settings(rows) {
            let at = |variant, k| {
                peak(
                    rows,
                    GridPoint {
                        variant,
                        k,
                        checkpointing,
                        precision,
                    },
                )
            };
            for &k in &ks {
                let Some(reference) = at(Variant::MamlFullGraph, k) else {
                    continue;
                };
                for variant in VARIANTS {
                    if let Some(bytes) = at(variant, k) {
                        relative.push(Relative {
                            variant,
                            precision,
                            checkpointing,
                            k,
                            peak_bytes: bytes,
                            full_graph_maml_bytes: reference,
                            ratio: bytes as f64 / reference as f64,
                        });
                    }
                }
            }
            if let Some(&k) = ks.last() {
                let recompute = at(Variant::Maml, k);
                let ratio = |other: Option<u64>| Some(recompute? as f64 / other? as f64);
                let over_full_graph = ratio(at(Variant::MamlFullGraph, k));
                let over_fomaml = ratio(at(Variant::Fomaml, k));
                if over_full_graph.is_some() || over_fomaml.is_some() {
                    acceptance.push(Acceptance {
                        precision,
                        checkpointing,
                        k,
                        over_full_graph,
                        over_fomaml,
                        within_full_graph_bound: over_full_graph.map(|r| r <= MAX_OVER_FULL_GRAPH),
                        within_fomaml_bound: over_fomaml.map(|r| r <= MAX_OVER_FOMAML),
                    });
                }
            }
        }
        Summary {
            ks,
            relative_to_full_graph_maml: relative,
            acceptance,
            max_over_full_graph: MAX_OVER_FULL_GRAPH,
            max_over_fomaml: MAX_OVER_FOMAML,
        }
    }
}

fn on_off(checkpointing: bool) -> &'static str {
    if checkpointing {
        "on"
    } else {
        "off"
    }
}

fn yes_no(ok: bool) -> &'static str {
    if ok {
        "yes"
    } else {
        "no"
    }
}

fn percent(ratio: f64) -> String {
    format!("{:.1}%", 100.0 * ratio)
}

/// File stem of the plot of one precision/checkpointing combination: `memory` for
/// f32 without checkpointing, e.g. `memory-bf16-checkpointing` for the others.
pub(crate) fn plot_stem(precision: Precision, checkpointing: bool) -> String {
    match (precision, checkpointing) {
        (Precision::F32, false) => "memory".into(),
        (p, false) => format!("memory-{p}"),
        (p, true) => format!("memory-{p}-checkpointing"),
    }
}

impl MemoryBench {
    /// The results table: one line per row, failed rows with their error.
    pub fn table(&self) -> Table {
        let bytes = |b: Option<u64>| b.map_or("–".to_string(), format_bytes);
        let rows = self
            .rows
            .iter()
            .map(|r| {
                let (peak, rss, ratio, seconds) = match &r.error {
                    Some(e) => (
                        format!("failed: {e}"),
                        String::new(),
                        String::new(),
                        String::new(),
                    ),
                    None => (
                        bytes(r.peak_bytes),
                        bytes(r.rss_bytes),
                        match (r.predicted_bytes, r.peak_bytes) {
                            (Some(p), Some(m)) if m > 0 => format!("{:.2}", p as f64 / m as f64),
                            _ => "–".to_string(),
                        },
                        r.seconds_per_iter
                            .map_or("–".to_string(), |s| format!("{s:.3}")),
                    ),
                };
                vec![
                    r.method.to_string(),
                    r.mode.clone().unwrap_or_else(|| "–".into()),
                    r.k.to_string(),
                    on_off(r.checkpointing).to_string(),
                    r.precision.to_string(),
                    peak,
                    rss,
                    bytes(r.predicted_bytes),
                    ratio,
                    seconds,
                ]
            })
            .collect();
        let peak_header = if self.device == "cpu" {
            "peak (heap)".to_string()
        } else {
            format!("peak ({} memory)", self.device)
        };
        Table {
            headers: [
                "method",
                "mode",
                "K",
                "checkpointing",
                "precision",
                peak_header.as_str(),
                "peak RSS",
                "predicted",
                "predicted / peak",
                "s / iteration",
            ]
            .map(String::from)
            .to_vec(),
            rows,
        }
    }

    /// Per precision: each method's peak as a percentage of full-graph MAML's at the
    /// same K and checkpointing setting, at the smallest and largest K.
    fn relative_tables(&self) -> Vec<(Precision, Table)> {
        let s = &self.summary;
        let mut precisions: Vec<Precision> = Vec::new();
        for r in &s.relative_to_full_graph_maml {
            if !precisions.contains(&r.precision) {
                precisions.push(r.precision);
            }
        }
        precisions
            .into_iter()
            .map(|precision| {
                let columns: Vec<(usize, bool)> = [false, true]
                    .into_iter()
                    .flat_map(|c| s.ks.iter().map(move |&k| (k, c)))
                    .filter(|&(k, c)| {
                        s.relative_to_full_graph_maml
                            .iter()
                            .any(|r| r.precision == precision && r.k == k && r.checkpointing == c)
                    })
                    .collect();
                let mut headers = vec!["method".to_string()];
                headers.extend(
                    columns
                        .iter()
                        .map(|&(k, c)| format!("K={k}{}", if c { ", checkpointing" } else { "" })),
                );
                let rows = VARIANTS
                    .iter()
                    .filter_map(|&variant| {
                        let cells: Vec<String> = columns
                            .iter()
                            .map(|&(k, c)| {
                                s.relative_to_full_graph_maml
                                    .iter()
                                    .find(|r| {
                                        r.variant == variant
                                            && r.precision == precision
                                            && r.k == k
                                            && r.checkpointing == c
                                    })
                                    .map_or("–".to_string(), |r| {
                                        format!(
                                            "{} ({})",
                                            percent(r.ratio),
                                            format_bytes(r.peak_bytes)
                                        )
                                    })
                            })
                            .collect();
                        cells.iter().any(|c| c != "–").then(|| {
                            let mut row = vec![label(variant)];
                            row.extend(cells);
                            row
                        })
                    })
                    .collect();
                (precision, Table { headers, rows })
            })
            .collect()
    }

    /// The acceptance lines: recompute-MAML at the largest K against full-graph MAML
    /// and FOMAML.
    fn acceptance_text(&self) -> String {
        let mut out = String::new();
        for a in &self.summary.acceptance {
            let full = a.over_full_graph.map_or("not measured".to_string(), |r| {
                format!(
                    "{} of full-graph MAML's peak (≤ {}: {})",
                    percent(r),
                    percent(MAX_OVER_FULL_GRAPH),
                    yes_no(r <= MAX_OVER_FULL_GRAPH)
                )
            });
            let fo = a.over_fomaml.map_or("not measured".to_string(), |r| {
                format!(
                    "{r:.2}× FOMAML's (≤ {MAX_OVER_FOMAML:.2}×: {})",
                    yes_no(r <= MAX_OVER_FOMAML)
                )
            });
            let verdict = match a.met() {
                Some(true) => "met",
                Some(false) => "NOT met",
                None => "not decided (a reference row is missing)",
            };
            let _ = writeln!(
                out,
                "- {}, checkpointing {}: recompute-MAML at K={} uses {full} and {fo}: {verdict}.",
                a.precision,
                on_off(a.checkpointing),
                a.k
            );
        }
        out
    }

    /// `memory.md`: what was measured, the table, the comparison with full-graph MAML,
    /// the acceptance check, skipped points and the plots.
    pub fn to_markdown(&self) -> String {
        let mut md = String::from("# Peak memory of a meta-iteration\n\n");
        let _ = writeln!(md, "Model: {}.\n", self.model.describe());
        let _ = writeln!(
            md,
            "Machine: {}. Started {}. {} of {} points{}; {} timed meta-iterations per point \
             after one warm-up, each point in its own process.\n",
            self.machine.describe(),
            self.date,
            self.rows.len() + self.skipped.len(),
            self.points,
            if self.quick {
                " (reduced grid, --quick)"
            } else {
                ""
            },
            self.iterations
        );
        for note in &self.notes {
            let _ = writeln!(md, "- {note}");
        }
        md.push('\n');
        md.push_str(&self.table().to_markdown());

        let relative = self.relative_tables();
        if !relative.is_empty() {
            md.push_str("\n## Against full-graph MAML\n\n");
            md.push_str(
                "Each method's peak as a percentage of full-graph MAML's at the same K, \
                 precision and checkpointing setting (the peak in brackets).\n",
            );
            for (precision, table) in relative {
                let _ = writeln!(md, "\n{precision}:\n");
                md.push_str(&table.to_markdown());
            }
        }
        if !self.summary.acceptance.is_empty() {
            md.push_str("\n## Acceptance: recompute-MAML at the largest K\n\n");
            let _ = writeln!(
                md,
                "Criterion (default configuration): recompute-MAML at K = 8 uses at most {} of \
                 full-graph MAML's peak and at most {MAX_OVER_FOMAML:.2}× FOMAML's.{}\n",
                percent(MAX_OVER_FULL_GRAPH),
                if self.quick {
                    " These rows are the reduced grid's small model, not the default \
                     configuration."
                } else {
                    ""
                }
            );
            md.push_str(&self.acceptance_text());
        }
        if !self.skipped.is_empty() {
            md.push_str("\n## Skipped\n\n");
            for s in &self.skipped {
                let _ = writeln!(
                    md,
                    "- {} {}, K={}, checkpointing {}, {}: {}",
                    s.method,
                    s.mode.as_deref().unwrap_or(""),
                    s.k,
                    on_off(s.checkpointing),
                    s.precision,
                    s.reason
                );
            }
        }
        let plots = self.plot_series();
        if !plots.is_empty() {
            md.push_str("\n## Peak memory against K\n\n");
            for ((precision, checkpointing), _) in plots {
                let stem = plot_stem(precision, checkpointing);
                let _ = writeln!(
                    md,
                    "![Peak memory against K, {precision}, checkpointing {}]({stem}.png)\n",
                    on_off(checkpointing)
                );
            }
        }
        md
    }

    /// Per precision/checkpointing combination, one series per method of
    /// `(K, peak bytes)`.
    #[allow(clippy::type_complexity)]
    fn plot_series(&self) -> Vec<((Precision, bool), Vec<(String, Vec<(usize, u64)>)>)> {
        settings(&self.rows)
            .into_iter()
            .filter_map(|(precision, checkpointing)| {
                let series: Vec<(String, Vec<(usize, u64)>)> = VARIANTS
                    .iter()
                    .filter_map(|&variant| {
                        let mut points: Vec<(usize, u64)> = self
                            .rows
                            .iter()
                            .filter(|r| {
                                r.variant == variant
                                    && r.precision == precision
                                    && r.checkpointing == checkpointing
                            })
                            .filter_map(|r| Some((r.k, r.peak_bytes?)))
                            .collect();
                        points.sort_unstable();
                        (!points.is_empty()).then(|| (label(variant), points))
                    })
                    .collect();
                (!series.is_empty()).then_some(((precision, checkpointing), series))
            })
            .collect()
    }

    /// Draws peak memory against K, one line per method, for each precision and
    /// checkpointing combination measured (`memory.png` and `.svg` for f32 without
    /// checkpointing; see `plot_stem`). Returns the main PNG's path (that of the
    /// first combination when f32 without checkpointing was not measured).
    pub fn plot(&self, dir: &Path) -> Result<PathBuf> {
        let mut main = dir.join("memory.png");
        for (i, ((precision, checkpointing), series)) in self.plot_series().into_iter().enumerate()
        {
            let (png, _svg) = memory_vs_k(dir.join(plot_stem(precision, checkpointing)), &series)?;
            if i == 0 {
                main = png;
            }
        }
        Ok(main)
    }
}
