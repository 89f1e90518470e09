//! Plots for reports, each written as `<stem>.png` and `<stem>.svg`.
//!
//! Drawing uses `plotters` without system font libraries: text is rendered with
//! `ab_glyph` from a font file read at run time (DejaVu Sans from Debian's
//! `fonts-dejavu-core`, or the file named by `MELORA_FONT`). Without a font the plots are
//! still drawn, only without any text, so a missing font never fails an experiment;
//! [`font_available`] tells the report to say so.
//!
//! Both images are rendered in memory and written with the crate's atomic writer, so an
//! interrupted run never leaves a truncated image behind.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor;

use crate::io::write_atomic;
use crate::{Error, Result};

/// Environment variable naming a TrueType/OpenType font file to draw text with, instead
/// of the default DejaVu Sans.
pub const FONT_ENV: &str = "MELORA_FONT";

const DEFAULT_FONTS: [&str; 2] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

/// The font family name plotters looks the registered font up by.
const FAMILY: &str = "sans-serif";

/// Whether a font could be loaded, so plots carry titles, axis labels and legends.
///
/// The first call reads and registers the font; later calls return the cached answer.
pub fn font_available() -> bool {
    static READY: OnceLock<bool> = OnceLock::new();
    *READY.get_or_init(|| {
        let candidates: Vec<PathBuf> = std::env::var_os(FONT_ENV)
            .map(PathBuf::from)
            .into_iter()
            .chain(DEFAULT_FONTS.iter().map(PathBuf::from))
            .collect();
        for path in candidates {
            let Ok(bytes) = std::fs::read(&path) else {
                continue;
            };
            // plotters keeps registered fonts for the life of the program and wants
            // 'static bytes; this runs once, so leaking one font file is the intent.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font(FAMILY, FontStyle::Normal, bytes).is_ok() {
                return true;
            }
        }
        false
    })
}

/// Colour-blind-friendly categorical colours (Tableau 10), cycled by series index.
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

fn color(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

/// Turns plotters' backend-generic errors into strings, so one drawing routine can
/// serve both the bitmap and the SVG backend.
trait OrMessage<T> {
    fn or_msg(self) -> std::result::Result<T, String>;
}

impl<T, E: std::fmt::Display> OrMessage<T> for std::result::Result<T, E> {
    fn or_msg(self) -> std::result::Result<T, String> {
        self.map_err(|e| e.to_string())
    }
}

type DrawResult = std::result::Result<(), String>;

/// A figure that can draw itself on any plotters backend.
trait Figure {
    /// Pixel size of the image.
    fn size(&self) -> (u32, u32);
    /// Draws the figure; `text` is false when no font is available.
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>, text: bool) -> DrawResult;
}

/// Renders `figure` to `<stem>.png` and `<stem>.svg` and returns their paths.
fn render(stem: &Path, what: &str, figure: &impl Figure) -> Result<(PathBuf, PathBuf)> {
    let text = font_available();
    let (w, h) = figure.size();
    let fail = |e: String| Error::Report(format!("{what} plot {}: {e}", stem.display()));

    let mut rgb = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (w, h)).into_drawing_area();
        figure.draw(&root, text).map_err(fail)?;
        root.present().or_msg().map_err(fail)?;
    }
    let png_path = with_extension(stem, "png");
    write_atomic(&png_path, &encode_png(&rgb, w, h).map_err(fail)?)?;

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (w, h)).into_drawing_area();
        figure.draw(&root, text).map_err(fail)?;
        root.present().or_msg().map_err(fail)?;
    }
    let svg_path = with_extension(stem, "svg");
    write_atomic(&svg_path, svg.as_bytes())?;
    Ok((png_path, svg_path))
}

/// `stem` with `.ext` appended (not replacing: stems such as `acc_k2.5` keep their dot).
fn with_extension(stem: &Path, ext: &str) -> PathBuf {
    let mut s = stem.as_os_str().to_owned();
    s.push(".");
    s.push(ext);
    PathBuf::from(s)
}

fn encode_png(rgb: &[u8], w: u32, h: u32) -> std::result::Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, w, h);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().or_msg()?;
    writer.write_image_data(rgb).or_msg()?;
    writer.finish().or_msg()?;
    Ok(out)
}

/// `(min, max)` of finite values, widened so that a flat series still gets a range and
/// padded by 5% so markers do not sit on the frame.
fn padded_range(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if lo > hi {
        return None;
    }
    let span = if hi > lo {
        hi - lo
    } else {
        lo.abs().max(1.0) * 0.1
    };
    Some((lo - 0.05 * span, hi + 0.05 * span))
}

const MIB: f64 = 1024.0 * 1024.0;

/// Formats a tick value compactly: few digits, no trailing noise.
fn tick(v: &f64) -> String {
    let a = v.abs();
    if a != 0.0 && !(1e-3..1e5).contains(&a) {
        format!("{v:.1e}")
    } else if a >= 100.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else if a >= 1.0 {
        format!("{v:.2}")
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_string()
    } else {
        format!("{v:.3}")
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_string()
    }
}

/// A line chart of several `(x, y)` series with a shared legend.
struct LineChart<'a> {
    title: &'a str,
    x_label: &'a str,
    y_label: &'a str,
    series: Vec<(String, Vec<(f64, f64)>)>,
    markers: bool,
    /// Points drawn as black dots without a line (a regression's support set).
    scatter: Option<(String, Vec<(f64, f64)>)>,
}

impl Figure for LineChart<'_> {
    fn size(&self) -> (u32, u32) {
        (900, 560)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>, text: bool) -> DrawResult {
        root.fill(&WHITE).or_msg()?;
        let points = || {
            self.series
                .iter()
                .flat_map(|(_, p)| p.iter())
                .chain(self.scatter.iter().flat_map(|(_, p)| p.iter()))
        };
        let (x0, x1) = padded_range(points().map(|p| p.0)).unwrap_or((0.0, 1.0));
        let (y0, y1) = padded_range(points().map(|p| p.1)).unwrap_or((0.0, 1.0));
        let mut builder = ChartBuilder::on(root);
        builder.margin(16);
        if text {
            builder
                .caption(self.title, (FAMILY, 24))
                .x_label_area_size(48)
                .y_label_area_size(72);
        } else {
            builder.x_label_area_size(8).y_label_area_size(8);
        }
        let mut chart = builder.build_cartesian_2d(x0..x1, y0..y1).or_msg()?;
        let mut mesh = chart.configure_mesh();
        mesh.light_line_style(RGBColor(235, 235, 235));
        if text {
            mesh.x_desc(self.x_label)
                .y_desc(self.y_label)
                .x_label_formatter(&tick)
                .y_label_formatter(&tick)
                .label_style((FAMILY, 15))
                .axis_desc_style((FAMILY, 17));
        } else {
            mesh.x_labels(0).y_labels(0);
        }
        mesh.draw().or_msg()?;
        for (i, (name, pts)) in self.series.iter().enumerate() {
            let c = color(i);
            let finite: Vec<(f64, f64)> = pts
                .iter()
                .copied()
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .collect();
            let drawn = chart
                .draw_series(LineSeries::new(finite.clone(), c.stroke_width(2)))
                .or_msg()?;
            if text {
                drawn.label(name.as_str()).legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 24, y)], c.stroke_width(3))
                });
            }
            if self.markers {
                chart
                    .draw_series(finite.iter().map(|&p| Circle::new(p, 4, c.filled())))
                    .or_msg()?;
            }
        }
        if let Some((name, pts)) = &self.scatter {
            let drawn = chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 5, BLACK.filled())))
                .or_msg()?;
            if text {
                drawn
                    .label(name.as_str())
                    .legend(|(x, y)| Circle::new((x + 12, y), 5, BLACK.filled()));
            }
        }
        if text && !self.series.is_empty() {
            // The lines' points and the midpoints of their segments, so that a corner
            // a line only crosses counts too.
            let along: Vec<(f64, f64)> = self
                .series
                .iter()
                .flat_map(|(_, p)| {
                    p.iter()
                        .copied()
                        .chain(
                            p.windows(2)
                                .map(|w| ((w[0].0 + w[1].0) / 2.0, (w[0].1 + w[1].1) / 2.0)),
                        )
                        .collect::<Vec<_>>()
                })
                .collect();
            chart
                .configure_series_labels()
                .position(emptiest_corner(&along, (x0, x1), (y0, y1)))
                .background_style(WHITE.mix(0.85))
                .border_style(RGBColor(180, 180, 180))
                .label_font((FAMILY, 15))
                .draw()
                .or_msg()?;
        }
        Ok(())
    }
}

/// Training curves: one line per series of `(step, value)` points, e.g. query loss per
/// outer step for each method. Writes `<path_stem>.png` and `<path_stem>.svg` and returns
/// their paths. Non-finite values (a diverged run) are skipped rather than failing.
pub fn training_curves<S: AsRef<str>>(
    path_stem: impl AsRef<Path>,
    series: &[(S, Vec<(f64, f64)>)],
    y_label: &str,
) -> Result<(PathBuf, PathBuf)> {
    let chart = LineChart {
        title: "Training curves",
        x_label: "step",
        y_label,
        series: series
            .iter()
            .map(|(n, p)| (n.as_ref().to_string(), p.clone()))
            .collect(),
        markers: false,
        scatter: None,
    };
    render(path_stem.as_ref(), "training-curves", &chart)
}

/// Peak memory against the number of inner steps k, one line per method (bytes are
/// shown in MiB). Writes `<path_stem>.png` and `<path_stem>.svg`.
pub fn memory_vs_k<S: AsRef<str>>(
    path_stem: impl AsRef<Path>,
    series: &[(S, Vec<(usize, u64)>)],
) -> Result<(PathBuf, PathBuf)> {
    let chart = LineChart {
        title: "Peak memory vs inner steps",
        x_label: "inner steps k",
        y_label: "peak memory (MiB)",
        series: series
            .iter()
            .map(|(n, p)| {
                let pts = p.iter().map(|&(k, b)| (k as f64, b as f64 / MIB)).collect();
                (n.as_ref().to_string(), pts)
            })
            .collect(),
        markers: true,
        scatter: None,
    };
    render(path_stem.as_ref(), "memory-vs-k", &chart)
}

/// A score against the number of adaptation steps, one line per method (the MSE or
/// accuracy of Finn et al.'s Figure 3). Writes `<path_stem>.png` and `.svg`.
pub fn score_vs_steps<S: AsRef<str>>(
    path_stem: impl AsRef<Path>,
    series: &[(S, Vec<(usize, f64)>)],
    y_label: &str,
) -> Result<(PathBuf, PathBuf)> {
    let chart = LineChart {
        title: "Score after adaptation steps on the test tasks",
        x_label: "adaptation steps",
        y_label,
        series: series
            .iter()
            .map(|(n, p)| {
                let pts = p.iter().map(|&(k, v)| (k as f64, v)).collect();
                (n.as_ref().to_string(), pts)
            })
            .collect(),
        markers: true,
        scatter: None,
    };
    render(path_stem.as_ref(), "score-vs-steps", &chart)
}

/// One regression task fitted (Finn et al.'s Figure 2): the true curve and each
/// prediction as lines over `(x, y)` points, the support set as dots. Writes
/// `<path_stem>.png` and `.svg`.
pub fn regression_fit<S: AsRef<str>>(
    path_stem: impl AsRef<Path>,
    title: &str,
    lines: &[(S, Vec<(f64, f64)>)],
    support: &[(f64, f64)],
) -> Result<(PathBuf, PathBuf)> {
    let chart = LineChart {
        title,
        x_label: "x",
        y_label: "y",
        series: lines
            .iter()
            .map(|(n, p)| (n.as_ref().to_string(), p.clone()))
            .collect(),
        markers: false,
        scatter: Some(("support points".into(), support.to_vec())),
    };
    render(path_stem.as_ref(), "regression-fit", &chart)
}

/// Accuracy against peak memory, with confidence-interval bars.
struct Pareto {
    /// `(method, peak MiB, accuracy, CI half width)`.
    points: Vec<(String, f64, f64, f64)>,
}

impl Pareto {
    /// Indices of the points no other point beats on both axes (less memory and at
    /// least as accurate), sorted by memory: the front worth drawing a line through.
    fn front(&self) -> Vec<usize> {
        let p = &self.points;
        let mut idx: Vec<usize> = (0..p.len())
            .filter(|&i| {
                !(0..p.len()).any(|j| {
                    j != i
                        && p[j].1 <= p[i].1
                        && p[j].2 >= p[i].2
                        && (p[j].1 < p[i].1 || p[j].2 > p[i].2)
                })
            })
            .collect();
        idx.sort_by(|&i, &j| p[i].1.total_cmp(&p[j].1));
        idx
    }
}

/// The corner of the plot (`x0..x1` × `y0..y1`) whose quarter holds the fewest of
/// `points`, for the legend: a fixed corner covers points whenever they happen to lie
/// there.
fn emptiest_corner(
    points: &[(f64, f64)],
    (x0, x1): (f64, f64),
    (y0, y1): (f64, f64),
) -> SeriesLabelPosition {
    let (x_mid, y_mid) = ((x0 + x1) / 2.0, (y0 + y1) / 2.0);
    let count = |right: bool, upper: bool| {
        points
            .iter()
            .filter(|(x, y)| (*x > x_mid) == right && (*y > y_mid) == upper)
            .count()
    };
    [
        (SeriesLabelPosition::UpperRight, count(true, true)),
        (SeriesLabelPosition::LowerRight, count(true, false)),
        (SeriesLabelPosition::UpperLeft, count(false, true)),
        (SeriesLabelPosition::LowerLeft, count(false, false)),
    ]
    .into_iter()
    .min_by_key(|(_, n)| *n)
    .map(|(corner, _)| corner)
    .expect("four corners")
}

/// Approximate width in pixels of a 15-pixel label (proportional font).
fn label_width(text: &str) -> i32 {
    (text.chars().count() as i32 * 8).max(8)
}

/// Height in pixels of a 15-pixel label.
const LABEL_HEIGHT: i32 = 17;

/// For each marker at `pixels` with a label `widths[i]` wide, the offset of its
/// label's top-left corner: the first of a few places around the marker where the
/// label stays inside `area` (left, top, right, bottom) and overlaps neither a label
/// already placed nor any marker, or the first place when none is free.
fn label_offsets(
    pixels: &[(i32, i32)],
    area: (i32, i32, i32, i32),
    widths: &[i32],
) -> Vec<(i32, i32)> {
    const MARKER: i32 = 8;
    let overlaps = |a: (i32, i32, i32, i32), b: (i32, i32, i32, i32)| {
        a.0 < b.2 && b.0 < a.2 && a.1 < b.3 && b.1 < a.3
    };
    let markers: Vec<(i32, i32, i32, i32)> = pixels
        .iter()
        .map(|&(x, y)| (x - MARKER, y - MARKER, x + MARKER, y + MARKER))
        .collect();
    let mut placed: Vec<(i32, i32, i32, i32)> = Vec::new();
    pixels
        .iter()
        .zip(widths)
        .map(|(&(x, y), &w)| {
            let candidates = [
                (9, -22),
                (9, 4),
                (-w - 9, -22),
                (-w - 9, 4),
                (9, -40),
                (-w / 2, -44),
                (9, 22),
                (-w / 2, 26),
            ];
            let rect = |(dx, dy): (i32, i32)| (x + dx, y + dy, x + dx + w, y + dy + LABEL_HEIGHT);
            let chosen = candidates
                .iter()
                .copied()
                .find(|&c| {
                    let r = rect(c);
                    let inside = r.0 >= area.0 && r.1 >= area.1 && r.2 <= area.2 && r.3 <= area.3;
                    inside && !placed.iter().chain(&markers).any(|&o| overlaps(r, o))
                })
                .unwrap_or(candidates[0]);
            placed.push(rect(chosen));
            chosen
        })
        .collect()
}

impl Figure for Pareto {
    fn size(&self) -> (u32, u32) {
        (900, 560)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>, text: bool) -> DrawResult {
        root.fill(&WHITE).or_msg()?;
        // Memory axis from 0: the point of the plot is how much memory a method saves,
        // which a zoomed axis would exaggerate.
        let x1 = padded_range(self.points.iter().map(|p| p.1))
            .map(|r| r.1)
            .unwrap_or(1.0)
            .max(1e-6);
        let (y0, y1) = padded_range(
            self.points
                .iter()
                .flat_map(|p| [p.2 - p.3.abs(), p.2 + p.3.abs()]),
        )
        .unwrap_or((0.0, 1.0));
        let mut builder = ChartBuilder::on(root);
        builder.margin(16);
        if text {
            builder
                .caption("Accuracy vs peak memory", (FAMILY, 24))
                .x_label_area_size(48)
                .y_label_area_size(72);
        } else {
            builder.x_label_area_size(8).y_label_area_size(8);
        }
        let mut chart = builder
            .build_cartesian_2d(0.0..x1 * 1.25, y0..y1)
            .or_msg()?;
        let mut mesh = chart.configure_mesh();
        mesh.light_line_style(RGBColor(235, 235, 235));
        if text {
            mesh.x_desc("peak memory (MiB)")
                .y_desc("accuracy")
                .x_label_formatter(&tick)
                .y_label_formatter(&tick)
                .label_style((FAMILY, 15))
                .axis_desc_style((FAMILY, 17));
        } else {
            mesh.x_labels(0).y_labels(0);
        }
        mesh.draw().or_msg()?;

        let front: Vec<(f64, f64)> = self
            .front()
            .into_iter()
            .map(|i| (self.points[i].1, self.points[i].2))
            .collect();
        chart
            .draw_series(LineSeries::new(
                front,
                RGBColor(160, 160, 160).stroke_width(1),
            ))
            .or_msg()?;
        // Label offsets chosen so that no label covers another or a marker.
        let pixels: Vec<(i32, i32)> = self
            .points
            .iter()
            .map(|p| chart.backend_coord(&(p.1, p.2)))
            .collect();
        let (x_range, y_range) = chart.plotting_area().get_pixel_range();
        let offsets = label_offsets(
            &pixels,
            (x_range.start, y_range.start, x_range.end, y_range.end),
            &self
                .points
                .iter()
                .map(|p| label_width(&p.0))
                .collect::<Vec<_>>(),
        );
        for (i, (name, mem, acc, hw)) in self.points.iter().enumerate() {
            if !(mem.is_finite() && acc.is_finite()) {
                continue;
            }
            let c = color(i);
            if hw.is_finite() && *hw > 0.0 {
                let (lo, hi) = (acc - hw.abs(), acc + hw.abs());
                let cap = x1 * 0.008;
                chart
                    .draw_series([
                        PathElement::new(vec![(*mem, lo), (*mem, hi)], c.stroke_width(2)),
                        PathElement::new(vec![(mem - cap, lo), (mem + cap, lo)], c.stroke_width(2)),
                        PathElement::new(vec![(mem - cap, hi), (mem + cap, hi)], c.stroke_width(2)),
                    ])
                    .or_msg()?;
            }
            chart
                .draw_series([Circle::new((*mem, *acc), 6, c.filled())])
                .or_msg()?;
            if text {
                chart
                    // Offset up and right in pixels so the name does not cover the marker.
                    .draw_series([EmptyElement::at((*mem, *acc))
                        + Text::new(
                            name.clone(),
                            offsets[i],
                            (FAMILY, 15).into_font().color(&BLACK),
                        )])
                    .or_msg()?
                    .label(name.as_str())
                    .legend(move |(x, y)| Circle::new((x + 10, y), 5, c.filled()));
            }
        }
        if text && !self.points.is_empty() {
            chart
                .configure_series_labels()
                .position(emptiest_corner(
                    &self.points.iter().map(|p| (p.1, p.2)).collect::<Vec<_>>(),
                    (0.0, x1 * 1.25),
                    (y0, y1),
                ))
                .background_style(WHITE.mix(0.85))
                .border_style(RGBColor(180, 180, 180))
                .label_font((FAMILY, 15))
                .draw()
                .or_msg()?;
        }
        Ok(())
    }
}

/// Accuracy against peak memory for each method, with vertical confidence-interval bars
/// of `ci_half_width` and a grey line along the Pareto front (methods no other method
/// beats on both memory and accuracy). Points are `(method, peak_bytes, accuracy,
/// ci_half_width)`. Writes `<path_stem>.png` and `<path_stem>.svg`.
pub fn pareto<S: AsRef<str>>(
    path_stem: impl AsRef<Path>,
    points: &[(S, u64, f64, f64)],
) -> Result<(PathBuf, PathBuf)> {
    let fig = Pareto {
        points: points
            .iter()
            .map(|(n, b, a, h)| (n.as_ref().to_string(), *b as f64 / MIB, *a, *h))
            .collect(),
    };
    render(path_stem.as_ref(), "pareto", &fig)
}

/// A labelled grid of coloured cells.
struct Heatmap<'a> {
    rows: &'a [String],
    cols: &'a [String],
    values: &'a [Vec<f64>],
    title: &'a str,
}

/// Viridis colour map, linearly interpolated between 5 stops: perceptually uniform and
/// readable in greyscale, so ablation differences are not over- or understated.
fn viridis(t: f64) -> RGBColor {
    const STOPS: [(f64, f64, f64); 5] = [
        (68.0, 1.0, 84.0),
        (59.0, 82.0, 139.0),
        (33.0, 145.0, 140.0),
        (94.0, 201.0, 98.0),
        (253.0, 231.0, 37.0),
    ];
    let t = t.clamp(0.0, 1.0) * (STOPS.len() - 1) as f64;
    let i = (t.floor() as usize).min(STOPS.len() - 2);
    let f = t - i as f64;
    let (a, b) = (STOPS[i], STOPS[i + 1]);
    let mix = |x: f64, y: f64| (x + f * (y - x)).round() as u8;
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

impl Heatmap<'_> {
    const CELL_W: u32 = 110;
    const CELL_H: u32 = 48;
    const LEFT: u32 = 190;
    const TOP: u32 = 70;
    const BOTTOM: u32 = 70;
    const RIGHT: u32 = 110;
}

impl Figure for Heatmap<'_> {
    fn size(&self) -> (u32, u32) {
        (
            Self::LEFT + Self::CELL_W * self.cols.len() as u32 + Self::RIGHT,
            Self::TOP + Self::CELL_H * self.rows.len() as u32 + Self::BOTTOM,
        )
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>, text: bool) -> DrawResult {
        root.fill(&WHITE).or_msg()?;
        let (lo, hi) = self
            .values
            .iter()
            .flatten()
            .filter(|v| v.is_finite())
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
                (lo.min(v), hi.max(v))
            });
        let scale = |v: f64| if hi > lo { (v - lo) / (hi - lo) } else { 0.5 };
        let (cw, ch) = (Self::CELL_W as i32, Self::CELL_H as i32);
        let (left, top) = (Self::LEFT as i32, Self::TOP as i32);
        let centred = |size: u32| {
            TextStyle::from((FAMILY, size).into_font()).pos(text_anchor::Pos::new(
                text_anchor::HPos::Center,
                text_anchor::VPos::Center,
            ))
        };
        for (r, row) in self.values.iter().enumerate() {
            for (c, &v) in row.iter().enumerate() {
                let (x, y) = (left + c as i32 * cw, top + r as i32 * ch);
                let fill = if v.is_finite() {
                    viridis(scale(v))
                } else {
                    RGBColor(200, 200, 200)
                };
                root.draw(&Rectangle::new([(x, y), (x + cw, y + ch)], fill.filled()))
                    .or_msg()?;
                root.draw(&Rectangle::new(
                    [(x, y), (x + cw, y + ch)],
                    WHITE.stroke_width(1),
                ))
                .or_msg()?;
                if text {
                    // Dark text on the light (yellow-green) end of the map, white on the
                    // dark end, so every value stays readable.
                    let ink = if v.is_finite() && scale(v) > 0.6 {
                        BLACK
                    } else {
                        WHITE
                    };
                    let label = if v.is_finite() {
                        tick(&v)
                    } else {
                        "–".into()
                    };
                    root.draw(&Text::new(
                        label,
                        (x + cw / 2, y + ch / 2),
                        centred(16).color(&ink),
                    ))
                    .or_msg()?;
                }
            }
        }
        if text {
            root.draw(&Text::new(
                self.title.to_string(),
                (left + cw * self.cols.len() as i32 / 2, top / 2),
                centred(22),
            ))
            .or_msg()?;
            let right_aligned = TextStyle::from((FAMILY, 15).into_font()).pos(
                text_anchor::Pos::new(text_anchor::HPos::Right, text_anchor::VPos::Center),
            );
            for (r, name) in self.rows.iter().enumerate() {
                root.draw(&Text::new(
                    name.clone(),
                    (left - 10, top + r as i32 * ch + ch / 2),
                    right_aligned.clone(),
                ))
                .or_msg()?;
            }
            let bottom = top + self.rows.len() as i32 * ch;
            for (c, name) in self.cols.iter().enumerate() {
                root.draw(&Text::new(
                    name.clone(),
                    (left + c as i32 * cw + cw / 2, bottom + 20),
                    centred(15),
                ))
                .or_msg()?;
            }
        }
        // Colour bar: top is the maximum.
        let bar_x = left + self.cols.len() as i32 * cw + 24;
        let bar_h = (self.rows.len() as i32 * ch).max(60);
        for i in 0..bar_h {
            let t = 1.0 - i as f64 / (bar_h - 1).max(1) as f64;
            root.draw(&Rectangle::new(
                [(bar_x, top + i), (bar_x + 18, top + i + 1)],
                viridis(t).filled(),
            ))
            .or_msg()?;
        }
        if text && lo <= hi {
            let left_aligned = TextStyle::from((FAMILY, 13).into_font()).pos(
                text_anchor::Pos::new(text_anchor::HPos::Left, text_anchor::VPos::Center),
            );
            for (v, y) in [(hi, top), (lo, top + bar_h)] {
                root.draw(&Text::new(tick(&v), (bar_x + 24, y), left_aligned.clone()))
                    .or_msg()?;
            }
        }
        Ok(())
    }
}

/// A heatmap of `values[row][col]` (e.g. accuracy over an ablation grid of rank × inner
/// steps) with row and column names, each cell printed, and a colour bar. Non-finite
/// cells (a run that failed) are grey. Writes `<path_stem>.png` and `<path_stem>.svg`.
pub fn heatmap(
    path_stem: impl AsRef<Path>,
    rows: &[String],
    cols: &[String],
    values: &[Vec<f64>],
    title: &str,
) -> Result<(PathBuf, PathBuf)> {
    let stem = path_stem.as_ref();
    if rows.is_empty() || cols.is_empty() {
        return Err(Error::Report(format!(
            "heatmap {}: needs at least one row and one column",
            stem.display()
        )));
    }
    if values.len() != rows.len() {
        return Err(Error::Report(format!(
            "heatmap {}: {} rows of values for {} row names",
            stem.display(),
            values.len(),
            rows.len()
        )));
    }
    if let Some((r, row)) = values
        .iter()
        .enumerate()
        .find(|(_, v)| v.len() != cols.len())
    {
        return Err(Error::Report(format!(
            "heatmap {}: row {r} has {} values for {} column names",
            stem.display(),
            row.len(),
            cols.len()
        )));
    }
    let fig = Heatmap {
        rows,
        cols,
        values,
        title,
    };
    render(stem, "heatmap", &fig)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Draws a figure as it would be drawn without a font (only the `text = false` path
    /// can be exercised here: a font registered by another test stays registered).
    fn draws_without_text(figure: &impl Figure) {
        let (w, h) = figure.size();
        let mut rgb = vec![255u8; (w * h * 3) as usize];
        let root = BitMapBackend::with_buffer(&mut rgb, (w, h)).into_drawing_area();
        figure.draw(&root, false).unwrap();
        root.present().unwrap();
        drop(root);
        assert!(rgb.iter().any(|&b| b != 255), "nothing was drawn");
    }

    #[test]
    fn figures_draw_without_text() {
        draws_without_text(&LineChart {
            title: "t",
            x_label: "x",
            y_label: "y",
            series: vec![("a".into(), vec![(0.0, 1.0), (1.0, f64::NAN), (2.0, 0.5)])],
            markers: true,
            scatter: Some(("s".into(), vec![(0.5, 0.7)])),
        });
        draws_without_text(&Pareto {
            points: vec![("a".into(), 10.0, 0.6, 0.02), ("b".into(), 20.0, 0.7, 0.0)],
        });
        let names = vec!["r".to_string()];
        draws_without_text(&Heatmap {
            rows: &names,
            cols: &names,
            values: &[vec![0.5]],
            title: "h",
        });
    }

    #[test]
    fn tick_labels_are_compact() {
        assert_eq!(tick(&0.0), "0");
        assert_eq!(tick(&1.25), "1.25");
        assert_eq!(tick(&0.7), "0.7");
        assert_eq!(tick(&900.0), "900");
        assert_eq!(tick(&2.5e6), "2.5e6");
    }
}
