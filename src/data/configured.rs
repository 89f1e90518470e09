//! Episode sources as the `data` section of a configuration describes them: a
//! synthetic family, or a real data set read once, split by class and sampled.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Device;

use super::readers::{
    read_idx_dataset, read_image_folder, read_omniglot, read_tabular, read_text_csv,
    read_text_jsonl, read_wordnet, resize_area, OmniglotOptions, TextColumns, WORDNET_DIR,
};
use super::{
    ClassSplits, DatasetEpisodes, EncodeText, EncodedDataset, EpisodeSampler, EpisodeSource,
    PhotoTransform, SinusoidTasks, SmallClassPolicy, SyntheticDomains, SyntheticImages,
    SyntheticText,
};
use crate::config::{DataConfig, DataSource, SmallClasses, SyntheticTask};
use crate::{Error, Result};

/// Which class-disjoint part of a data set episodes come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// Meta-training classes.
    Train,
    /// Meta-validation classes.
    Val,
    /// Meta-test classes.
    Test,
}

impl Split {
    /// Added to the seed of episode sampling, so that the splits' episode streams (and
    /// synthetic tasks) differ.
    fn salt(self) -> u64 {
        match self {
            Split::Train => 0,
            Split::Val => 0x5EED_0001,
            Split::Test => 0x5EED_0002,
        }
    }
}

/// The splits meta-training reads: meta-train and meta-validation classes, or only
/// meta-train ones when the data set keeps none for validation
/// ([`DataConfig::has_validation_classes`]).
pub fn training_splits(config: &DataConfig) -> &'static [Split] {
    if config.has_validation_classes() {
        &[Split::Train, Split::Val]
    } else {
        &[Split::Train]
    }
}

/// The whole data set of a non-synthetic `data` section, decoded once (texts encoded
/// by `text_encoder`).
pub fn load_dataset(config: &DataConfig, text_encoder: &dyn EncodeText) -> Result<EncodedDataset> {
    Ok(load_dataset_and_split(config, text_encoder)?.0)
}

/// [`load_dataset`], with the class split the data set fixes itself (the
/// miniImagenet CSVs, split folders or `data.split_file`), if it does.
fn load_dataset_and_split(
    config: &DataConfig,
    text_encoder: &dyn EncodeText,
) -> Result<(EncodedDataset, Option<ClassSplits>)> {
    let path = || {
        config.path.clone().ok_or_else(|| Error::Config {
            key: "data.path".into(),
            message: format!("required when data.source is `{}`", config.source),
        })
    };
    let columns = TextColumns {
        text: config.text_column.clone(),
        label: config.label_column.clone(),
    };
    let data = match config.source {
        DataSource::Synthetic => Err(Error::InvalidArgument(
            "synthetic tasks have no data set to load".into(),
        )),
        DataSource::Jsonl => {
            EncodedDataset::from_texts(read_text_jsonl(&path()?, &columns)?, text_encoder)
        }
        DataSource::Csv => {
            EncodedDataset::from_texts(read_text_csv(&path()?, &columns)?, text_encoder)
        }
        DataSource::Wordnet => {
            let dir = config
                .path
                .clone()
                .unwrap_or_else(|| PathBuf::from(WORDNET_DIR));
            EncodedDataset::from_texts(read_wordnet(&dir)?, text_encoder)
        }
        DataSource::Omniglot => {
            let options = OmniglotOptions {
                image_size: config.image_size,
                rotations: config.rotations,
            };
            Ok(EncodedDataset::Images {
                dataset: read_omniglot(&path()?, &options)?,
                channels: 1,
                height: config.image_size,
                width: config.image_size,
            })
        }
        DataSource::Idx => {
            let (images, labels) = idx_files(&path()?)?;
            let (dataset, height, width) = read_idx_dataset(&images, &labels)?;
            // Resized (area averaging) to data.image_size, as Omniglot is.
            let size = config.image_size;
            let dataset = if (height, width) == (size, size) {
                dataset
            } else {
                dataset.map(|image| Ok(resize_area(&image, width, height, size)))?
            };
            Ok(EncodedDataset::Images {
                dataset,
                channels: 1,
                height: size,
                width: size,
            })
        }
        DataSource::Tabular => Ok(EncodedDataset::Rows {
            dataset: read_tabular(&path()?, &config.label_column)?.dataset,
            standardise: true,
        }),
        DataSource::ImageFolder => return load_image_folder(config, &path()?),
    }?;
    Ok((data, None))
}

/// An `image_folder` data set: every image decoded once into the cache, and the
/// split its layout fixes, if any.
fn load_image_folder(
    config: &DataConfig,
    path: &Path,
) -> Result<(EncodedDataset, Option<ClassSplits>)> {
    let transform = PhotoTransform::for_config(config);
    let folder = read_image_folder(
        path,
        config.split_file.as_deref(),
        &|bytes: &[u8], name: &str| transform.decode(bytes, name),
    )?;
    let (channels, side) = (transform.channels, transform.stored_side);
    let data = EncodedDataset::Photos {
        dataset: folder.dataset,
        transform,
        seed: 0,
    };
    // Said once per data set and process: a planner or budget search reads the
    // data set again for every configuration it measures.
    static REPORTED: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());
    let mut reported = REPORTED.lock().unwrap_or_else(|e| e.into_inner());
    if reported.iter().any(|p| p == path) {
        return Ok((data, folder.splits));
    }
    reported.push(path.to_path_buf());
    let images: usize = data.class_sizes().iter().sum();
    eprintln!(
        "image cache: {images} images of {} classes as {channels}×{side}×{side} u8, {:.1} MiB \
         in memory (decoded once; counted in the run's peak memory)",
        data.class_sizes().len(),
        data.held_bytes() as f64 / (1u64 << 20) as f64,
    );
    Ok((data, folder.splits))
}

/// The images and labels files of an IDX `path`: a folder holding
/// `train-images-idx3-ubyte[.gz]` and `train-labels-idx1-ubyte[.gz]`, or an images file
/// whose labels file has the same name with `images-idx3` replaced by `labels-idx1`.
pub fn idx_files(path: &Path) -> Result<(PathBuf, PathBuf)> {
    if path.is_dir() {
        for suffix in ["", ".gz"] {
            let images = path.join(format!("train-images-idx3-ubyte{suffix}"));
            if images.exists() {
                return Ok((
                    images,
                    path.join(format!("train-labels-idx1-ubyte{suffix}")),
                ));
            }
        }
        return Err(Error::Format {
            path: path.into(),
            message: "no train-images-idx3-ubyte[.gz] in this folder; give the images file \
                      as data.path"
                .into(),
        });
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if !name.contains("images-idx3") {
        return Err(Error::Format {
            path: path.into(),
            message: "an IDX images file name must contain `images-idx3` (its labels file \
                      has `labels-idx1` instead)"
                .into(),
        });
    }
    Ok((
        path.to_path_buf(),
        path.with_file_name(name.replace("images-idx3", "labels-idx1")),
    ))
}

/// Episodes of `split` as `config` describes them (see [`episode_sources`]).
pub fn episode_source(
    config: &DataConfig,
    seed: u64,
    split: Split,
    text_encoder: &dyn EncodeText,
    device: &Device,
) -> Result<Arc<dyn EpisodeSource>> {
    let mut sources = episode_sources(config, seed, &[split], text_encoder, device)?;
    Ok(sources.remove(0))
}

/// Amplitude and phase of sinusoid task `index` of `split`, whose episodes
/// [`episode_sources`] seeds from `seed`; `None` unless `config` makes sinusoid tasks.
pub(crate) fn sinusoid_parameters(
    config: &DataConfig,
    seed: u64,
    split: Split,
    index: u64,
) -> Option<(f64, f64)> {
    let synthetic = config.synthetic_only || config.source == DataSource::Synthetic;
    (synthetic && config.synthetic_task == SyntheticTask::Sinusoid).then(|| {
        SinusoidTasks {
            k_shot: config.k_shot,
            n_query: config.n_query,
            seed: seed.wrapping_add(split.salt()),
        }
        .parameters(index)
    })
}

/// Episodes of each of `splits` as `config` describes them, a real data set read
/// once for all. Synthetic families (also under `synthetic_only`) draw fresh tasks
/// from a seed that depends on the split; real data sets are loaded with
/// [`load_dataset`], split by class with the configured fractions (seeded by
/// `data.split_seed`, or `seed` when it is unset) and sampled N-way K-shot Q-query
/// with episode seeds from `seed`.
pub fn episode_sources(
    config: &DataConfig,
    seed: u64,
    splits: &[Split],
    text_encoder: &dyn EncodeText,
    device: &Device,
) -> Result<Vec<Arc<dyn EpisodeSource>>> {
    if config.synthetic_only || config.source == DataSource::Synthetic {
        return splits
            .iter()
            .map(|&split| {
                let source =
                    synthetic_source(config, seed, seed.wrapping_add(split.salt()), text_encoder)?;
                Ok(if device.is_cpu() {
                    source
                } else {
                    Arc::new(super::source::OnDevice {
                        inner: source,
                        device: device.clone(),
                    }) as Arc<dyn EpisodeSource>
                })
            })
            .collect();
    }
    let (data, fixed_split) = load_dataset_and_split(config, text_encoder)?;
    let splits_of_classes = match fixed_split {
        Some(split) => split,
        None => ClassSplits::by_fraction_of_groups(
            &data.class_groups(),
            config.train_fraction,
            config.val_fraction,
            config.split_seed.unwrap_or(seed),
        )?,
    };
    let policy = match config.small_classes {
        SmallClasses::Skip => SmallClassPolicy::Skip,
        SmallClasses::Error => SmallClassPolicy::Error,
    };
    splits
        .iter()
        .map(|&split| {
            let ids = match split {
                Split::Train => &splits_of_classes.train,
                Split::Val => &splits_of_classes.val,
                Split::Test => &splits_of_classes.test,
            };
            // Only meta-training episodes are augmented (`data.train_aug`).
            let augment = split == Split::Train && config.train_aug;
            let data = data
                .subset(ids)?
                .with_augmentation(augment, seed.wrapping_add(split.salt()));
            let sampler = EpisodeSampler::new(
                data.class_sizes(),
                &data.class_names(),
                config.n_way,
                config.k_shot,
                config.n_query,
                policy,
            )?;
            let source: Arc<dyn EpisodeSource> = Arc::new(DatasetEpisodes::new(
                Arc::new(data),
                sampler,
                seed.wrapping_add(split.salt()),
                device.clone(),
            )?);
            Ok(source)
        })
        .collect()
}

/// The synthetic family of `config` with episode seed `episode_seed`; what a family's
/// splits share (the classes of `domains`) is drawn from `data.split_seed`, or
/// `seed`.
fn synthetic_source(
    config: &DataConfig,
    seed: u64,
    episode_seed: u64,
    text_encoder: &dyn EncodeText,
) -> Result<Arc<dyn EpisodeSource>> {
    let (n_way, k_shot, n_query) = (config.n_way, config.k_shot, config.n_query);
    let world_seed = config.split_seed.unwrap_or(seed);
    Ok(match config.synthetic_task {
        SyntheticTask::Text => Arc::new(SyntheticText {
            n_way,
            k_shot,
            n_query,
            seed: episode_seed,
            ..SyntheticText::with_max_length(text_encoder.max_length())?
        }),
        SyntheticTask::Domains => Arc::new(SyntheticDomains {
            n_way,
            k_shot,
            n_query,
            world_seed,
            seed: episode_seed,
            ..SyntheticDomains::with_max_length(text_encoder.max_length())?
        }),
        SyntheticTask::Sinusoid => Arc::new(SinusoidTasks {
            k_shot,
            n_query,
            seed: episode_seed,
        }),
        SyntheticTask::Images => Arc::new(SyntheticImages {
            size: config.image_size,
            n_way,
            k_shot,
            n_query,
            seed: episode_seed,
            ..SyntheticImages::default()
        }),
    })
}
