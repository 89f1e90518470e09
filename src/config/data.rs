//! The `data` section: where tasks come from and their shape.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::choice::choice_enum;
use super::validate::{at_least, in_half_open, invalid, non_empty};
use crate::Result;

choice_enum! {
    /// Where the examples of the tasks come from.
    pub enum DataSource {
        /// Generated tasks; needs no files.
        Synthetic = "synthetic",
        /// JSON lines of labelled texts.
        Jsonl = "jsonl",
        /// CSV of labelled texts.
        Csv = "csv",
        /// WordNet definitions grouped by lexicographer class; without a
        /// path, the system's WordNet installation.
        Wordnet = "wordnet",
        /// Omniglot character images (the original zip archives).
        Omniglot = "omniglot",
        /// Images in IDX files (MNIST, Fashion-MNIST).
        Idx = "idx",
        /// Numeric feature table (CSV) with a label column.
        Tabular = "tabular",
        /// JPEG/PNG images from folders: the miniImagenet layout (`images/` and
        /// `train.csv`/`val.csv`/`test.csv`), `train/`/`val/`/`test/` folders of
        /// class folders, or one folder per class (split by `split_file` or by seed).
        ImageFolder = "image_folder",
    }
    default = Synthetic;
}

choice_enum! {
    /// Which built-in synthetic task family `source: synthetic` generates.
    pub enum SyntheticTask {
        /// Text classification over the tiny models' vocabulary, new classes in every
        /// task.
        Text = "text",
        /// Text classification with the same classes in every task, each task a new
        /// domain: universal cues per class plus the domain's own words (see
        /// `data::SyntheticDomains`).
        Domains = "domains",
        /// Sinusoid regression (the classic MAML benchmark).
        Sinusoid = "sinusoid",
        /// 28×28 grey prototype images with jitter, for Conv4.
        Images = "images",
    }
    default = Text;
}

choice_enum! {
    /// Colour channels of `image_folder` images.
    pub enum ImageColor {
        /// Three channels, red, green, blue.
        Rgb = "rgb",
        /// One channel (ITU-R 601 luma).
        Grey = "grey",
    }
    default = Rgb;
}

choice_enum! {
    /// Channel-wise normalisation of `image_folder` images, after scaling to [0, 1].
    pub enum ImageNormalization {
        /// ImageNet's channel means and standard deviations (torchvision's and the
        /// FS-CT reference's); for grey images the means of the three channels'.
        Imagenet = "imagenet",
        /// None: pixel values in [0, 1].
        None = "none",
    }
    default = Imagenet;
}

choice_enum! {
    /// What happens to a class with fewer than `k_shot + n_query` examples.
    pub enum SmallClasses {
        /// Leave it out, with a warning.
        Skip = "skip",
        /// Stop with an error naming the class.
        Error = "error",
    }
    default = Skip;
}

impl DataSource {
    fn needs_path(self) -> bool {
        !matches!(self, DataSource::Synthetic | DataSource::Wordnet)
    }
}

/// The `data` section.
///
/// Each task (episode) has `n_way` classes, with `k_shot` support and
/// `n_query` query examples per class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// Where the examples come from.
    pub source: DataSource,
    /// File or directory of the data; required by every source but
    /// `synthetic` and `wordnet`.
    pub path: Option<PathBuf>,
    /// Classes per task (at least 2).
    pub n_way: usize,
    /// Support examples per class (at least 1).
    pub k_shot: usize,
    /// Query examples per class (at least 1).
    pub n_query: usize,
    /// Use synthetic tasks whatever the source, e.g. for a quick check.
    pub synthetic_only: bool,
    /// The synthetic task family of `source: synthetic` (and `synthetic_only`).
    pub synthetic_task: SyntheticTask,
    /// Field (JSON lines) or column (CSV) holding the text.
    pub text_column: String,
    /// Field or column holding the class label (also of `tabular`).
    pub label_column: String,
    /// Side of the square images: Omniglot and IDX images are resized to it (area
    /// averaging), synthetic images made at it, and the vision backbone built for it (at least 16 for
    /// conv4, conv6 and resnet12).
    pub image_size: usize,
    /// Add each Omniglot character rotated by 90°, 180° and 270° as new classes.
    pub rotations: bool,
    /// Seed of the split of a data set's classes into meta-train, meta-validation and
    /// meta-test classes; `None` (the default) uses the top-level `seed`. `melora full`
    /// fixes it for the whole experiment, so that runs of other seeds never train on
    /// the test classes.
    pub split_seed: Option<u64>,
    /// Fraction of the classes to meta-train on, in [0, 1).
    pub train_fraction: f64,
    /// Fraction of the classes to validate on, in [0, 1); the rest are test classes.
    /// 0 meta-trains without validation (the last iterate is the `best`
    /// checkpoint), for data sets too small to spare classes for it (Fashion-MNIST's
    /// 6/4 split); `melora full` and early stopping need validation classes.
    pub val_fraction: f64,
    /// What to do with a class with fewer than `k_shot + n_query` examples.
    pub small_classes: SmallClasses,
    /// `image_folder` with one folder per class: a CSV file of `class,split` rows
    /// (split `train`, `val` or `test`) fixing the split; without it the split is
    /// drawn by `split_seed` with the fractions above. The miniImagenet and
    /// split-folder layouts fix their own split.
    pub split_file: Option<PathBuf>,
    /// `image_folder`: read images as `rgb` (3 channels) or `grey` (1).
    pub color: ImageColor,
    /// `image_folder`: channel-wise normalisation, `imagenet` or `none`.
    pub normalization: ImageNormalization,
    /// `image_folder`: augment meta-training images (random resized crop, horizontal
    /// flip, colour jitter); evaluation and validation never augment.
    pub train_aug: bool,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            source: DataSource::Synthetic,
            path: None,
            n_way: 5,
            k_shot: 5,
            n_query: 5,
            synthetic_only: false,
            synthetic_task: SyntheticTask::Text,
            text_column: "text".into(),
            label_column: "label".into(),
            image_size: 28,
            rotations: false,
            split_seed: None,
            train_fraction: 0.6,
            val_fraction: 0.2,
            small_classes: SmallClasses::Skip,
            split_file: None,
            color: ImageColor::Rgb,
            normalization: ImageNormalization::Imagenet,
            train_aug: false,
        }
    }
}

impl DataConfig {
    /// Whether meta-training validates on classes of their own: synthetic
    /// families always do; a data set unless `val_fraction` is 0 (then `best` is
    /// the last checkpoint and nothing is validated).
    pub fn has_validation_classes(&self) -> bool {
        self.synthetic_only || self.source == DataSource::Synthetic || self.val_fraction > 0.0
    }

    pub(crate) fn validate(&self) -> Result<()> {
        at_least("data.n_way", self.n_way, 2)?;
        at_least("data.k_shot", self.k_shot, 1)?;
        at_least("data.n_query", self.n_query, 1)?;
        at_least("data.image_size", self.image_size, 1)?;
        non_empty("data.text_column", &self.text_column)?;
        non_empty("data.label_column", &self.label_column)?;
        in_half_open("data.train_fraction", self.train_fraction, 0.0, 1.0)?;
        in_half_open("data.val_fraction", self.val_fraction, 0.0, 1.0)?;
        if self.train_fraction + self.val_fraction >= 1.0 {
            return Err(invalid(
                "data.val_fraction",
                format!(
                    "train_fraction + val_fraction must leave classes for testing (< 1), got \
                     {} + {}",
                    self.train_fraction, self.val_fraction
                ),
            ));
        }
        if !self.synthetic_only && self.source.needs_path() && self.path.is_none() {
            return Err(invalid(
                "data.path",
                format!(
                    "required when data.source is `{}`; set it, or use data.source: synthetic",
                    self.source
                ),
            ));
        }
        // Sizes near usize::MAX would overflow (or allocate absurdly) in sampling,
        // batching and image decoding: bound them here, with checked arithmetic.
        let per_class = self
            .k_shot
            .checked_add(self.n_query)
            .filter(|&n| n <= MAX_EPISODE_EXAMPLES)
            .ok_or_else(|| {
                invalid(
                    "data.k_shot",
                    format!(
                        "k_shot + n_query = {} + {} is too large: an episode holds at most \
                         {MAX_EPISODE_EXAMPLES} examples",
                        self.k_shot, self.n_query
                    ),
                )
            })?;
        if self
            .n_way
            .checked_mul(per_class)
            .is_none_or(|n| n > MAX_EPISODE_EXAMPLES)
        {
            return Err(invalid(
                "data.n_way",
                format!(
                    "n_way × (k_shot + n_query) = {} × {per_class} is too large: an episode \
                     holds at most {MAX_EPISODE_EXAMPLES} examples; lower n_way, k_shot or \
                     n_query",
                    self.n_way
                ),
            ));
        }
        if self.source != DataSource::ImageFolder {
            let only_image_folder = |key: &str| {
                invalid(
                    key,
                    format!(
                        "applies to data.source: image_folder only (the source is `{}`)",
                        self.source
                    ),
                )
            };
            if self.split_file.is_some() {
                return Err(only_image_folder("data.split_file"));
            }
            if self.train_aug {
                return Err(only_image_folder("data.train_aug"));
            }
        }
        if self.image_size > MAX_IMAGE_SIZE {
            return Err(invalid(
                "data.image_size",
                format!(
                    "must be at most {MAX_IMAGE_SIZE} (pixels per side), got {}",
                    self.image_size
                ),
            ));
        }
        Ok(())
    }
}

/// The most examples (`n_way × (k_shot + n_query)`) one episode may hold: far beyond
/// any few-shot task, low enough that sizes cannot overflow in sampling and batching.
pub const MAX_EPISODE_EXAMPLES: usize = 1 << 20;

/// The largest side of the square images (`data.image_size`), in pixels.
pub const MAX_IMAGE_SIZE: usize = 4096;
