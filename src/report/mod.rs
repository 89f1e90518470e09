//! Experiment reports: plots ([`plots`]) and a document rendered both as Markdown
//! (`report.md`, for reading in a repository) and as one self-contained HTML file
//! (`report.html`, inline CSS and images embedded as data URIs, so it can be mailed or
//! archived alone).

mod experiment;
pub mod plots;

pub use experiment::{
    best_baseline_table, comparison_table, statistics_table, write_experiment_report,
};

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use base64::Engine as _;

use crate::io::write_atomic;
use crate::{Error, Result};

/// A table of text cells; a row shorter than the header is padded with empty cells.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Table {
    /// Column headings.
    pub headers: Vec<String>,
    /// Rows of cells, in order.
    pub rows: Vec<Vec<String>>,
}

/// One piece of a section's content.
#[derive(Debug, Clone, PartialEq)]
pub enum Block {
    /// A sub-heading inside the section (rendered one level below the section heading).
    Heading(String),
    /// A paragraph of plain text (escaped, not interpreted as Markdown or HTML).
    Paragraph(String),
    /// A table.
    Table(Table),
    /// An image file, by a path relative to the report's directory.
    Image {
        /// Path relative to the directory the report is written to.
        path: PathBuf,
        /// Alternative text, also used as the caption.
        alt: String,
    },
}

/// A titled section of a report.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Section {
    /// The section's heading.
    pub heading: String,
    /// The section's content, in order.
    pub blocks: Vec<Block>,
}

impl Section {
    /// An empty section headed `heading`.
    pub fn new(heading: impl Into<String>) -> Self {
        Section {
            heading: heading.into(),
            blocks: Vec::new(),
        }
    }

    /// Appends a sub-heading.
    pub fn heading(mut self, text: impl Into<String>) -> Self {
        self.blocks.push(Block::Heading(text.into()));
        self
    }

    /// Appends a paragraph.
    pub fn paragraph(mut self, text: impl Into<String>) -> Self {
        self.blocks.push(Block::Paragraph(text.into()));
        self
    }

    /// Appends a table.
    pub fn table(mut self, table: Table) -> Self {
        self.blocks.push(Block::Table(table));
        self
    }

    /// Appends an image given by a path relative to the report directory.
    pub fn image(mut self, path: impl Into<PathBuf>, alt: impl Into<String>) -> Self {
        self.blocks.push(Block::Image {
            path: path.into(),
            alt: alt.into(),
        });
        self
    }
}

/// A report: a title and sections, written by [`Report::write`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    /// The report's title.
    pub title: String,
    /// The sections, in order.
    pub sections: Vec<Section>,
}

/// Said in the report when plots were drawn without a font, so that a reader does not
/// mistake unlabelled plots for a bug in the data.
const NO_FONT_NOTE: &str = "Note: no font was found when the plots were drawn (looked for \
     DejaVu Sans from the fonts-dejavu-core package, or a file named by MELORA_FONT), so \
     the plots have no titles, axis labels or legends.";

impl Report {
    /// An empty report titled `title`.
    pub fn new(title: impl Into<String>) -> Self {
        Report {
            title: title.into(),
            sections: Vec::new(),
        }
    }

    /// Appends a section.
    pub fn section(mut self, section: Section) -> Self {
        self.sections.push(section);
        self
    }

    fn has_images(&self) -> bool {
        self.sections
            .iter()
            .flat_map(|s| &s.blocks)
            .any(|b| matches!(b, Block::Image { .. }))
    }

    /// A note to show at the top, if plots were drawn without text.
    fn font_note(&self) -> Option<&'static str> {
        (self.has_images() && !plots::font_available()).then_some(NO_FONT_NOTE)
    }

    /// Renders the report as Markdown; images are linked by their relative paths.
    pub fn to_markdown(&self) -> String {
        let mut md = format!("# {}\n\n", one_line(&self.title));
        if let Some(note) = self.font_note() {
            let _ = write!(md, "> {note}\n\n");
        }
        for section in &self.sections {
            let _ = write!(md, "## {}\n\n", one_line(&section.heading));
            for block in &section.blocks {
                match block {
                    Block::Heading(text) => {
                        let _ = write!(md, "### {}\n\n", one_line(text));
                    }
                    Block::Paragraph(text) => {
                        let _ = write!(md, "{}\n\n", text.trim());
                    }
                    Block::Table(table) => {
                        md.push_str(&markdown_table(table));
                        md.push('\n');
                    }
                    Block::Image { path, alt } => {
                        let _ = write!(
                            md,
                            "![{}]({})\n\n",
                            one_line(alt).replace(['[', ']'], ""),
                            url_path(path)
                        );
                    }
                }
            }
        }
        md
    }

    /// Renders the report as one self-contained HTML page. Images are read from
    /// `dir.join(path)` and embedded as base64 data URIs.
    pub fn to_html(&self, dir: &Path) -> Result<String> {
        let mut html = String::new();
        let title = escape_html(&self.title);
        let _ = write!(
            html,
            "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
             <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
             <title>{title}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n\
             <h1>{title}</h1>\n"
        );
        if let Some(note) = self.font_note() {
            let _ = writeln!(html, "<p class=\"note\">{}</p>", escape_html(note));
        }
        for section in &self.sections {
            let _ = writeln!(
                html,
                "<section>\n<h2>{}</h2>",
                escape_html(&section.heading)
            );
            for block in &section.blocks {
                match block {
                    Block::Heading(text) => {
                        let _ = writeln!(html, "<h3>{}</h3>", escape_html(text));
                    }
                    Block::Paragraph(text) => {
                        let _ = writeln!(html, "<p>{}</p>", escape_html(text.trim()));
                    }
                    Block::Table(table) => html.push_str(&html_table(table)),
                    Block::Image { path, alt } => {
                        let _ = writeln!(
                            html,
                            "<figure>\n<img src=\"{}\" alt=\"{alt}\">\n\
                             <figcaption>{alt}</figcaption>\n</figure>",
                            data_uri(&dir.join(path))?,
                            alt = escape_html(alt),
                        );
                    }
                }
            }
            html.push_str("</section>\n");
        }
        html.push_str("</main>\n</body>\n</html>\n");
        Ok(html)
    }

    /// Writes `report.md` and `report.html` into `dir` (created if needed), atomically,
    /// and returns their paths. Image paths are relative to `dir`; a missing image is an
    /// error, because the HTML would otherwise silently lose a figure.
    pub fn write(&self, dir: impl AsRef<Path>) -> Result<(PathBuf, PathBuf)> {
        let dir = dir.as_ref();
        let html = self.to_html(dir)?;
        let md_path = dir.join("report.md");
        let html_path = dir.join("report.html");
        write_atomic(&md_path, self.to_markdown().as_bytes())?;
        write_atomic(&html_path, html.as_bytes())?;
        Ok((md_path, html_path))
    }
}

/// Inline stylesheet: readable measure, zebra tables, numbers right-aligned.
const CSS: &str = "\
body{margin:0;background:#fafafa;color:#222;font:16px/1.5 system-ui,-apple-system,\
'Segoe UI',Roboto,'DejaVu Sans',sans-serif}\
main{max-width:60rem;margin:0 auto;padding:1.5rem 2rem 4rem;background:#fff}\
h1{border-bottom:2px solid #ddd;padding-bottom:.3rem}\
h2{margin-top:2.2rem;border-bottom:1px solid #eee}\
table{border-collapse:collapse;margin:1rem 0;font-variant-numeric:tabular-nums}\
th,td{border:1px solid #ddd;padding:.35rem .7rem;text-align:left}\
th{background:#f0f0f0}tr:nth-child(even) td{background:#fafafa}\
td.num{text-align:right}\
figure{margin:1.2rem 0}img{max-width:100%;height:auto;border:1px solid #eee}\
figcaption{color:#666;font-size:.9rem}\
.note{background:#fff6d6;border-left:4px solid #e0b000;padding:.5rem .8rem}";

/// Collapses line breaks, which would end a Markdown heading or link text early.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A relative path in URL form: forward slashes, spaces escaped.
fn url_path(path: &Path) -> String {
    path.components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join("/")
        .replace(' ', "%20")
}

fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for ch in text.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(ch),
        }
    }
    out
}

/// A Markdown table cell: pipes escaped and line breaks flattened, which would
/// otherwise split the cell or the row.
fn markdown_cell(text: &str) -> String {
    one_line(text).replace('|', "\\|")
}

fn padded_row(row: &[String], width: usize) -> Vec<&str> {
    (0..width)
        .map(|i| row.get(i).map(String::as_str).unwrap_or(""))
        .collect()
}

fn table_width(table: &Table) -> usize {
    table
        .rows
        .iter()
        .map(Vec::len)
        .chain([table.headers.len()])
        .max()
        .unwrap_or(0)
}

impl Table {
    /// The table in Markdown (GitHub's pipe tables).
    pub fn to_markdown(&self) -> String {
        markdown_table(self)
    }

    /// The table as aligned plain text for a terminal: columns padded to their widest
    /// cell, a rule under the headers.
    pub fn to_text(&self) -> String {
        let width = table_width(self);
        let mut widths = vec![0usize; width];
        for row in std::iter::once(&self.headers).chain(&self.rows) {
            for (i, cell) in row.iter().enumerate() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let line = |row: &Vec<String>| {
            let cells: Vec<String> = (0..width)
                .map(|i| {
                    let cell = row.get(i).map_or("", String::as_str);
                    let pad = widths[i] - cell.chars().count();
                    format!("{cell}{}", " ".repeat(pad))
                })
                .collect();
            format!("{}\n", cells.join("  ").trim_end())
        };
        let mut text = line(&self.headers);
        let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
        text.push_str(&format!("{}\n", rule.join("  ")));
        for row in &self.rows {
            text.push_str(&line(row));
        }
        text
    }
}

fn markdown_table(table: &Table) -> String {
    let width = table_width(table).max(1);
    let mut md = String::new();
    let line = |cells: Vec<&str>| {
        let cells: Vec<String> = cells.into_iter().map(markdown_cell).collect();
        format!("| {} |\n", cells.join(" | "))
    };
    md.push_str(&line(padded_row(&table.headers, width)));
    let rule: Vec<&str> = (0..width)
        .map(|i| {
            // Right-align columns whose cells are all numbers, as in the HTML.
            if is_numeric_column(table, i) {
                "---:"
            } else {
                "---"
            }
        })
        .collect();
    md.push_str(&format!("| {} |\n", rule.join(" | ")));
    for row in &table.rows {
        md.push_str(&line(padded_row(row, width)));
    }
    md
}

fn is_numeric(cell: &str) -> bool {
    let c = cell
        .trim()
        .trim_end_matches('%')
        .split(['±', ' '])
        .next()
        .unwrap_or("");
    !c.is_empty() && c.parse::<f64>().is_ok()
}

fn is_numeric_column(table: &Table, col: usize) -> bool {
    let mut cells = table.rows.iter().filter_map(|r| r.get(col)).peekable();
    cells.peek().is_some() && cells.all(|c| is_numeric(c))
}

fn html_table(table: &Table) -> String {
    let width = table_width(table);
    let mut html = String::from("<table>\n<thead><tr>");
    for h in padded_row(&table.headers, width) {
        let _ = write!(html, "<th>{}</th>", escape_html(h));
    }
    html.push_str("</tr></thead>\n<tbody>\n");
    let numeric: Vec<bool> = (0..width).map(|i| is_numeric_column(table, i)).collect();
    for row in &table.rows {
        html.push_str("<tr>");
        for (i, cell) in padded_row(row, width).into_iter().enumerate() {
            let class = if numeric[i] { " class=\"num\"" } else { "" };
            let _ = write!(html, "<td{class}>{}</td>", escape_html(cell));
        }
        html.push_str("</tr>\n");
    }
    html.push_str("</tbody>\n</table>\n");
    html
}

/// The file at `path` as a `data:` URI, with the MIME type from its extension.
fn data_uri(path: &Path) -> Result<String> {
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    let mime = match ext.as_str() {
        "png" => "image/png",
        "svg" => "image/svg+xml",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        _ => {
            return Err(Error::Report(format!(
                "{}: unsupported image type (use .png, .svg, .jpg, .gif or .webp)",
                path.display()
            )))
        }
    };
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    Ok(format!(
        "data:{mime};base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    ))
}

#[cfg(test)]
mod tests;
