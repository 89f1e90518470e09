//! The FS-CT reference project's own memory scenario (`melora bench fsct-memory`):
//! the Few-Shot Cosine Transformer with VIC regularization on a ResNet backbone,
//! 5-way 5-shot 16-query (105 RGB images a task, miniImagenet's shape), at 84×84
//! and 224×224, under each memory setting, with the planner's prediction, the
//! measured peak where it fits, and the reference project's figures beside them.
//!
//! The tasks are read from a generated folder of RGB class folders
//! ([`write_scenario_images`]) through the image-folder reader, as a user's
//! miniImagenet would be: decoded once, cached at ⌊1.15·side⌋, cropped and
//! normalised per batch. Its cache is counted in the peaks and reported apart,
//! since the reference's figures are GPU memory, which holds no data set.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::machine::Machine;
use crate::config::Config;
use crate::memory::format_bytes;
use crate::{Error, Result};

/// Classes of the generated image folder: 15 meta-training, 5 validation, 5 test
/// (the seeded 60/20/20 split), each of [`IMAGES_PER_CLASS`] images.
pub const CLASSES: usize = 25;
/// Images per generated class: one task's 5 shots and 16 queries.
pub const IMAGES_PER_CLASS: usize = 21;
/// Side of the generated PNGs (the reader resizes them to the configured size).
const SOURCE_SIDE: u32 = 48;

/// A memory setting of the scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Setting {
    /// f32, the whole graph kept.
    Plain,
    /// Every residual stage checkpointed.
    Checkpointing,
    /// bf16 activations with f32 master weights.
    Bf16,
    /// bf16 and checkpointing.
    Bf16Checkpointing,
    /// Each task's images in 4 micro-batches.
    MicroBatches,
}

impl Setting {
    /// Every setting, in table order.
    pub const ALL: [Setting; 5] = [
        Setting::Plain,
        Setting::Checkpointing,
        Setting::Bf16,
        Setting::Bf16Checkpointing,
        Setting::MicroBatches,
    ];

    /// The setting's name on the command line and in the results.
    pub fn name(self) -> &'static str {
        match self {
            Setting::Plain => "plain",
            Setting::Checkpointing => "checkpointing",
            Setting::Bf16 => "bf16",
            Setting::Bf16Checkpointing => "bf16-checkpointing",
            Setting::MicroBatches => "micro-batches",
        }
    }

    /// The `memory_optimization` section of the setting.
    fn yaml(self) -> &'static str {
        match self {
            Setting::Plain => "",
            Setting::Checkpointing => "  checkpointing:\n    enabled: true\n    every: 1\n",
            Setting::Bf16 => "  precision: bf16\n",
            Setting::Bf16Checkpointing => {
                "  precision: bf16\n  checkpointing:\n    enabled: true\n    every: 1\n"
            }
            // 105 images in 4 micro-batches.
            Setting::MicroBatches => "  gradient_accumulation:\n    micro_batch: 27\n",
        }
    }

    /// The reference project's figure for ResNet-34 on a 16 GB GPU (the seed
    /// documents: "~14.4 GB before, ~9.2 GB with checkpointing, ~6 GB with AMP and
    /// 4-step accumulation"), beside the 224×224 rows, its images' size.
    pub fn reference(self, backbone: &str, image_size: usize) -> Option<&'static str> {
        if backbone != "resnet34" || image_size != 224 {
            return None;
        }
        match self {
            Setting::Plain => Some("~14.4 GB"),
            Setting::Checkpointing => Some("~9.2 GB"),
            Setting::MicroBatches => Some("~6 GB (with AMP)"),
            _ => None,
        }
    }
}

impl std::fmt::Display for Setting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Setting {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Setting::ALL
            .into_iter()
            .find(|setting| setting.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Setting::ALL.iter().map(|s| s.name()).collect();
                format!(
                    "unknown setting `{s}`; expected one of {}",
                    names.join(", ")
                )
            })
    }
}

/// The scenario's configuration for `backbone` at `image_size` under `setting`,
/// reading the image folder `images`: FS-CT (cosine attention) + VIC with the
/// reference's defaults, AdamW 1e-3, 5-way 5-shot 16-query, meta-batches of one
/// task. An error where melora refuses the combination (it says why).
pub fn scenario_config(
    backbone: &str,
    image_size: usize,
    setting: Setting,
    images: &Path,
) -> Result<Config> {
    let yaml = format!(
        "seed: 42\nmodel:\n  name: {backbone}\nmeta_learning:\n  method: fsct_cosine\n  \
         meta_batch_size: 1\n  num_iterations: 2\n  outer:\n    lr: 0.001\n    \
         weight_decay: 0.00001\n    grad_clip: null\ndata:\n  source: image_folder\n  \
         path: {}\n  n_way: 5\n  k_shot: 5\n  n_query: 16\n  image_size: {image_size}\n  \
         color: rgb\n  normalization: imagenet\n  train_aug: true\nevaluation:\n  \
         episodes: 2\n  eval_every: 2\n  val_episodes: 1\nmemory_optimization:\n{}",
        serde_json::to_string(&images.display().to_string()).unwrap_or_default(),
        setting.yaml()
    );
    let config = Config::from_yaml_str(&yaml)?;
    config.validate()?;
    Ok(config)
}

/// Writes the scenario's image folder into `dir` (class folders `c00` … of
/// [`IMAGES_PER_CLASS`] RGB PNGs each, with seeded colour patterns), unless it is
/// already there.
pub fn write_scenario_images(dir: &Path) -> Result<()> {
    for class in 0..CLASSES {
        let folder = dir.join(format!("c{class:02}"));
        std::fs::create_dir_all(&folder).map_err(|e| Error::Io {
            path: folder.clone(),
            source: e,
        })?;
        for index in 0..IMAGES_PER_CLASS {
            let path = folder.join(format!("{index:02}.png"));
            if path.is_file() {
                continue;
            }
            let image = image::RgbImage::from_fn(SOURCE_SIDE, SOURCE_SIDE, |x, y| {
                let wave =
                    |k: u32| ((x * (class as u32 + k) + y * (index as u32 + 2 * k)) % 256) as u8;
                image::Rgb([wave(1), wave(3), wave(5)])
            });
            let partial = path.with_extension("png.partial");
            image
                .save_with_format(&partial, image::ImageFormat::Png)
                .map_err(|e| Error::Format {
                    path: partial.clone(),
                    message: format!("cannot write the image: {e}"),
                })?;
            std::fs::rename(&partial, &path).map_err(|e| Error::Io {
                path: path.clone(),
                source: e,
            })?;
        }
    }
    Ok(())
}

/// One row of the scenario.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScenarioRow {
    /// `resnet34`, `resnet18`, …
    pub backbone: String,
    /// Side of the square images.
    pub image_size: usize,
    /// The memory setting.
    pub setting: Setting,
    /// Why melora refuses the combination, if it does (nothing else is filled in).
    pub refused: Option<String>,
    /// The planner's peak of the meta-steps, data set included.
    pub predicted_bytes: Option<u64>,
    /// The image cache's share of it.
    pub dataset_bytes: Option<u64>,
    /// The measured heap peak of the timed meta-iterations.
    pub measured_bytes: Option<u64>,
    /// The measuring process's peak resident set.
    pub rss_bytes: Option<u64>,
    /// Median seconds per meta-iteration.
    pub seconds_per_iter: Option<f64>,
    /// Why the row was not measured (predicted above the limit, or the measuring
    /// process failed: its message).
    pub not_measured: Option<String>,
}

impl ScenarioRow {
    /// (predicted − measured) / measured, where both exist.
    pub fn relative_error(&self) -> Option<f64> {
        let (p, m) = (self.predicted_bytes?, self.measured_bytes?);
        (m > 0).then(|| (p as f64 - m as f64) / m as f64)
    }
}

/// The scenario's results (`fsct-memory.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScenarioBench {
    /// Where and when it ran.
    pub machine: Machine,
    /// Rows whose prediction is at most this many bytes were measured.
    pub measure_up_to_bytes: u64,
    /// Timed meta-iterations per measured row (after a warm-up).
    pub iterations: usize,
    /// The rows, in the order measured.
    pub rows: Vec<ScenarioRow>,
}

impl ScenarioBench {
    /// The Markdown table (`fsct-memory.md`).
    pub fn to_markdown(&self) -> String {
        let mut out = String::from(
            "FS-CT + VIC, 5-way 5-shot 16-query (105 RGB images a task), meta-batches of \
             one task, AdamW: peak heap of the meta-steps (model, parameters, optimiser \
             state, episodes, the image cache and the step's graphs)\n\n\
             | backbone | images | setting | predicted | image cache | measured | \
             error | s/iter | reference (PyTorch, 16 GB GPU) |\n\
             |---|---|---|---:|---:|---:|---:|---:|---|\n",
        );
        let bytes = |b: Option<u64>| b.map_or("–".to_string(), format_bytes);
        for row in &self.rows {
            let reference = row
                .setting
                .reference(&row.backbone, row.image_size)
                .unwrap_or("–");
            let size = format!("{0}×{0}", row.image_size);
            if let Some(why) = &row.refused {
                out.push_str(&format!(
                    "| {} | {size} | {} | refused: {why} | | | | | {reference} |\n",
                    row.backbone, row.setting
                ));
                continue;
            }
            let measured = match (&row.measured_bytes, &row.not_measured) {
                (Some(b), _) => format_bytes(*b),
                (None, Some(why)) => format!("not measured: {why}"),
                (None, None) => "–".into(),
            };
            out.push_str(&format!(
                "| {} | {size} | {} | {} | {} | {measured} | {} | {} | {reference} |\n",
                row.backbone,
                row.setting,
                bytes(row.predicted_bytes),
                bytes(row.dataset_bytes),
                row.relative_error()
                    .map_or("–".into(), |e| format!("{:+.1}%", 100.0 * e)),
                row.seconds_per_iter
                    .map_or("–".into(), |s| format!("{s:.1}")),
            ));
        }
        out.push_str(&format!(
            "\n{}. Rows predicted at most {} were measured ({} timed meta-iteration(s) \
             after a warm-up, each row in a fresh process). The reference's figures are \
             GPU memory of the PyTorch project (no data set on the GPU, CUDA's caching \
             allocator); melora's are CPU heap bytes.\n",
            self.machine.describe(),
            format_bytes(self.measure_up_to_bytes),
            self.iterations
        ));
        out
    }

    /// Writes `fsct-memory.json` and `fsct-memory.md` into `dir` (each through a
    /// temporary file); returns their paths.
    pub fn write(&self, dir: &Path) -> Result<(PathBuf, PathBuf)> {
        let json_path = dir.join("fsct-memory.json");
        let json = serde_json::to_string_pretty(self).map_err(|e| Error::Format {
            path: json_path.clone(),
            message: e.to_string(),
        })?;
        crate::io::write_atomic(&json_path, format!("{json}\n").as_bytes())?;
        let md_path = dir.join("fsct-memory.md");
        crate::io::write_atomic(&md_path, self.to_markdown().as_bytes())?;
        Ok((json_path, md_path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plain and checkpointed configurations are valid for every backbone; names
    /// round-trip; the reference's figures sit beside ResNet-34 at 224×224 only.
    #[test]
    fn settings_make_the_scenario_configurations() {
        let dir = Path::new("images");
        for setting in Setting::ALL {
            assert_eq!(setting.name().parse::<Setting>().unwrap(), setting);
        }
        assert!("amp"
            .parse::<Setting>()
            .unwrap_err()
            .contains("micro-batches"));
        for backbone in ["resnet18", "resnet34"] {
            let plain = scenario_config(backbone, 84, Setting::Plain, dir).unwrap();
            assert_eq!(
                (plain.data.n_way, plain.data.k_shot, plain.data.n_query),
                (5, 5, 16)
            );
            let checkpointed = scenario_config(backbone, 224, Setting::Checkpointing, dir).unwrap();
            assert!(checkpointed.memory_optimization.checkpointing.enabled);
        }
        assert_eq!(Setting::Plain.reference("resnet34", 224), Some("~14.4 GB"));
        assert_eq!(Setting::Plain.reference("resnet34", 84), None);
    }

    /// The generated folder has every class and image, readable as RGB PNGs, and
    /// writing it again keeps it.
    #[test]
    fn the_image_folder_is_written_once() {
        let dir = tempfile::tempdir().unwrap();
        write_scenario_images(dir.path()).unwrap();
        write_scenario_images(dir.path()).unwrap();
        let classes = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(classes, CLASSES);
        let image = image::open(dir.path().join("c03/07.png")).unwrap();
        assert_eq!(image.color(), image::ColorType::Rgb8);
        let other = image::open(dir.path().join("c04/07.png")).unwrap();
        assert_ne!(image.as_bytes(), other.as_bytes());
    }

    /// A refused row says why; a measured one shows the error; the table has both.
    #[test]
    fn the_table_shows_refusals_and_errors() {
        let row = |setting, predicted, measured, refused: Option<&str>| ScenarioRow {
            backbone: "resnet34".into(),
            image_size: 224,
            setting,
            refused: refused.map(String::from),
            predicted_bytes: predicted,
            dataset_bytes: predicted.map(|_| 1 << 20),
            measured_bytes: measured,
            rss_bytes: None,
            seconds_per_iter: measured.map(|_| 2.0),
            not_measured: None,
        };
        let bench = ScenarioBench {
            machine: Machine::current(),
            measure_up_to_bytes: 1 << 30,
            iterations: 1,
            rows: vec![
                row(Setting::Plain, Some(110), Some(100), None),
                row(Setting::Bf16, None, None, Some("no bf16 here")),
            ],
        };
        assert!((bench.rows[0].relative_error().unwrap() - 0.1).abs() < 1e-12);
        let md = bench.to_markdown();
        assert!(md.contains("+10.0%") && md.contains("~14.4 GB"), "{md}");
        assert!(md.contains("refused: no bf16 here"), "{md}");
    }
}
