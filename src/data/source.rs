//! Episodes from a decoded data set: an [`EpisodeSource`] turns an episode index
//! into tensors, decoding nothing (the data set was decoded and tokenised once).

use std::sync::Arc;

use candle_core::{Device, Tensor};

use super::photos::{picks_rng, PhotoTransform};
use super::{Batch, Dataset, Episode, EpisodeSampler, EpisodeSpec};
use crate::{Error, Result};

/// Anything that makes episode `index` deterministically (same source and index, same
/// episode): sampled data sets and synthetic task families. `Send + Sync` so that a
/// [`super::Prefetcher`] can draw episodes on a background thread.
pub trait EpisodeSource: Send + Sync {
    /// Episode `index`.
    fn episode(&self, index: u64) -> Result<Episode>;
    /// The names of the classes episodes are drawn from (one split of a data set, the
    /// classes with enough examples), for the record of what a run trained and was
    /// tested on; `None` for synthetic families, which make new classes for every task.
    fn class_names(&self) -> Option<Vec<String>> {
        None
    }
    /// Batch `index` of `size` examples for supervised pre-training, labelled by their
    /// class among all of this source's classes (or regression targets), with the
    /// number of classes; `None` for families that make new classes for every task
    /// (there is no fixed set of classes to train a head over).
    fn pretraining_batch(&self, _index: u64, _size: usize) -> Result<Option<PretrainBatch>> {
        Ok(None)
    }
}

/// The episodes and pre-training batches of a source that makes them on the host
/// (the synthetic families), moved to `device`.
pub(crate) struct OnDevice {
    pub(crate) inner: Arc<dyn EpisodeSource>,
    pub(crate) device: Device,
}

impl EpisodeSource for OnDevice {
    fn episode(&self, index: u64) -> Result<Episode> {
        self.inner.episode(index)?.to_device(&self.device)
    }

    fn class_names(&self) -> Option<Vec<String>> {
        self.inner.class_names()
    }

    fn pretraining_batch(&self, index: u64, size: usize) -> Result<Option<PretrainBatch>> {
        self.inner
            .pretraining_batch(index, size)?
            .map(|b| {
                Ok(PretrainBatch {
                    batch: b.batch.to_device(&self.device)?,
                    classes: b.classes,
                })
            })
            .transpose()
    }
}

/// A supervised batch for pre-training ([`EpisodeSource::pretraining_batch`]).
#[derive(Debug, Clone)]
pub struct PretrainBatch {
    /// The examples, labelled by class (or with regression targets).
    pub batch: Batch,
    /// Classes of the source (outputs of a head over all of them; 1 for regression).
    pub classes: usize,
}

/// A data set decoded into model inputs, ready to batch.
#[derive(Debug, Clone)]
pub enum EncodedDataset {
    /// Token ids per text (already truncated, special tokens included); batches are
    /// padded with `pad_id` to the longest sequence.
    Tokens {
        /// The token ids, grouped by class.
        dataset: Dataset<Vec<u32>>,
        /// Padding token id.
        pad_id: u32,
    },
    /// Images as `channels × height × width` floats, row-major.
    Images {
        /// The pixels, grouped by class.
        dataset: Dataset<Vec<f32>>,
        /// Channels per image.
        channels: usize,
        /// Rows per image.
        height: usize,
        /// Columns per image.
        width: usize,
    },
    /// Photographs (`data.source: image_folder`) cached as `u8` images of
    /// `transform.stored_side`, made into model inputs per batch by `transform`
    /// (centre crop or augmentation, normalisation).
    Photos {
        /// The cached images, `channels × stored_side × stored_side`, by class.
        dataset: Dataset<Vec<u8>>,
        /// How a cached image becomes an input.
        transform: PhotoTransform,
        /// Seed of the augmentation (with the batch's picks).
        seed: u64,
    },
    /// Feature rows of one width; `NaN` marks a missing value.
    Rows {
        /// The rows, grouped by class.
        dataset: Dataset<Vec<f32>>,
        /// Standardise each column with the support set's mean and standard deviation
        /// (fitted on the support only, applied to both sets; missing values become the
        /// support mean, i.e. 0 after standardisation).
        standardise: bool,
    },
}

impl EncodedDataset {
    /// Texts tokenised once by `encoder`.
    pub fn from_texts(dataset: Dataset<String>, encoder: &dyn super::EncodeText) -> Result<Self> {
        Ok(Self::Tokens {
            dataset: dataset.map(|text| encoder.encode(&text))?,
            pad_id: encoder.pad_id(),
        })
    }

    /// The data set restricted to classes `ids`, in that order (a split).
    pub fn subset(&self, ids: &[usize]) -> Result<Self> {
        Ok(match self {
            Self::Tokens { dataset, pad_id } => Self::Tokens {
                dataset: dataset.subset(ids)?,
                pad_id: *pad_id,
            },
            Self::Images {
                dataset,
                channels,
                height,
                width,
            } => Self::Images {
                dataset: dataset.subset(ids)?,
                channels: *channels,
                height: *height,
                width: *width,
            },
            Self::Photos {
                dataset,
                transform,
                seed,
            } => Self::Photos {
                dataset: dataset.subset(ids)?,
                transform: transform.clone(),
                seed: *seed,
            },
            Self::Rows {
                dataset,
                standardise,
            } => Self::Rows {
                dataset: dataset.subset(ids)?,
                standardise: *standardise,
            },
        })
    }

    /// The data set with training augmentation `on` (photographs only; other data
    /// sets are returned as they are), its generator seeded by `seed`.
    pub fn with_augmentation(self, on: bool, seed: u64) -> Self {
        match self {
            Self::Photos {
                dataset, transform, ..
            } => Self::Photos {
                dataset,
                transform: PhotoTransform {
                    augment: on,
                    ..transform
                },
                seed,
            },
            other => other,
        }
    }

    /// Bytes of the decoded examples held in memory (the image cache, token ids,
    /// rows), for reporting.
    pub fn held_bytes(&self) -> usize {
        fn bytes<T>(dataset: &Dataset<Vec<T>>) -> usize {
            dataset
                .classes()
                .iter()
                .flat_map(|c| &c.examples)
                .map(|e| e.len() * std::mem::size_of::<T>())
                .sum()
        }
        match self {
            Self::Tokens { dataset, .. } => bytes(dataset),
            Self::Images { dataset, .. } | Self::Rows { dataset, .. } => bytes(dataset),
            Self::Photos { dataset, .. } => bytes(dataset),
        }
    }

    /// Examples per class.
    pub fn class_sizes(&self) -> Vec<usize> {
        match self {
            Self::Tokens { dataset, .. } => dataset.class_sizes(),
            Self::Images { dataset, .. } | Self::Rows { dataset, .. } => dataset.class_sizes(),
            Self::Photos { dataset, .. } => dataset.class_sizes(),
        }
    }

    /// Per class, its group (the source class of derived classes such as
    /// rotations; see [`Dataset::with_groups`](super::Dataset::with_groups)).
    pub fn class_groups(&self) -> Vec<usize> {
        match self {
            Self::Tokens { dataset, .. } => dataset.class_groups(),
            Self::Images { dataset, .. } | Self::Rows { dataset, .. } => dataset.class_groups(),
            Self::Photos { dataset, .. } => dataset.class_groups(),
        }
    }

    /// Class names, in class order.
    pub fn class_names(&self) -> Vec<String> {
        fn names<T>(classes: &[super::Class<T>]) -> Vec<String> {
            classes.iter().map(|c| c.name.clone()).collect()
        }
        match self {
            Self::Tokens { dataset, .. } => names(dataset.classes()),
            Self::Images { dataset, .. } | Self::Rows { dataset, .. } => names(dataset.classes()),
            Self::Photos { dataset, .. } => names(dataset.classes()),
        }
    }

    /// The examples `picks` (class, example index) with `labels`, in one batch on
    /// `device`; feature rows are standardised with the batch's own statistics.
    pub fn batch_of(
        &self,
        picks: &[(usize, usize)],
        labels: Vec<u32>,
        device: &Device,
    ) -> Result<Batch> {
        let labels = Tensor::from_vec(labels.clone(), labels.len(), device)?;
        match self {
            Self::Tokens { dataset, pad_id } => {
                token_batch(dataset, picks, labels, *pad_id, device)
            }
            Self::Images {
                dataset,
                channels,
                height,
                width,
            } => {
                let shape = (picks.len(), *channels, *height, *width);
                Batch::from_dense(
                    Tensor::from_vec(gather(dataset, picks), shape, device)?,
                    labels,
                )
            }
            Self::Photos {
                dataset,
                transform,
                seed,
            } => Batch::from_dense(
                photo_tensor(dataset, transform, *seed, picks, device)?,
                labels,
            ),
            Self::Rows {
                dataset,
                standardise,
            } => {
                let width = row_width(dataset);
                let mut rows = gather(dataset, picks);
                if *standardise {
                    standardise_on_support(&mut rows, &mut [], width);
                } else {
                    rows.iter_mut()
                        .filter(|v| v.is_nan())
                        .for_each(|v| *v = 0.0);
                }
                Batch::from_dense(
                    Tensor::from_vec(rows, (picks.len(), width), device)?,
                    labels,
                )
            }
        }
    }

    /// The support and query batches of `spec` on `device`.
    pub fn batches(&self, spec: &EpisodeSpec, device: &Device) -> Result<(Batch, Batch)> {
        let labelled = |sets: &[Vec<usize>]| -> (Vec<(usize, usize)>, Vec<u32>) {
            let mut picks = Vec::new();
            let mut labels = Vec::new();
            for (label, indices) in sets.iter().enumerate() {
                for &i in indices {
                    picks.push((spec.classes[label], i));
                    labels.push(label as u32);
                }
            }
            (picks, labels)
        };
        let (support, support_labels) = labelled(&spec.support);
        let (query, query_labels) = labelled(&spec.query);
        let labels = |l: Vec<u32>| Tensor::from_vec(l.clone(), l.len(), device);
        match self {
            Self::Tokens { dataset, pad_id } => Ok((
                token_batch(dataset, &support, labels(support_labels)?, *pad_id, device)?,
                token_batch(dataset, &query, labels(query_labels)?, *pad_id, device)?,
            )),
            Self::Images {
                dataset,
                channels,
                height,
                width,
            } => {
                let image = |picks: &[(usize, usize)], l: Vec<u32>| -> Result<Batch> {
                    let data = gather(dataset, picks);
                    let shape = (picks.len(), *channels, *height, *width);
                    Batch::from_dense(Tensor::from_vec(data, shape, device)?, labels(l)?)
                };
                Ok((
                    image(&support, support_labels)?,
                    image(&query, query_labels)?,
                ))
            }
            Self::Photos {
                dataset,
                transform,
                seed,
            } => {
                // One generator for the episode, from all its picks: support and
                // query are augmented independently of each other.
                let all: Vec<(usize, usize)> = support.iter().chain(&query).copied().collect();
                let mut rng = picks_rng(*seed, &all);
                let mut photos = |picks: &[(usize, usize)], l: Vec<u32>| -> Result<Batch> {
                    let data = photo_pixels(dataset, transform, &mut rng, picks);
                    let side = transform.side;
                    let shape = (picks.len(), transform.channels, side, side);
                    Batch::from_dense(Tensor::from_vec(data, shape, device)?, labels(l)?)
                };
                let support_batch = photos(&support, support_labels)?;
                Ok((support_batch, photos(&query, query_labels)?))
            }
            Self::Rows {
                dataset,
                standardise,
            } => {
                let mut s = gather(dataset, &support);
                let mut q = gather(dataset, &query);
                let width = row_width(dataset);
                if *standardise {
                    standardise_on_support(&mut s, &mut q, width);
                } else {
                    for v in s.iter_mut().chain(q.iter_mut()) {
                        if v.is_nan() {
                            *v = 0.0;
                        }
                    }
                }
                let rows = |data: Vec<f32>, l: Vec<u32>| -> Result<Batch> {
                    let n = l.len();
                    Batch::from_dense(Tensor::from_vec(data, (n, width), device)?, labels(l)?)
                };
                Ok((rows(s, support_labels)?, rows(q, query_labels)?))
            }
        }
    }
}

/// Features per row of a table (0 when it is empty).
fn row_width(dataset: &Dataset<Vec<f32>>) -> usize {
    dataset
        .classes()
        .iter()
        .find_map(|c| c.examples.first())
        .map_or(0, Vec::len)
}

/// The picked photographs as model inputs, row-major `[n, channels, side, side]`.
fn photo_pixels(
    dataset: &Dataset<Vec<u8>>,
    transform: &PhotoTransform,
    rng: &mut rand_chacha::ChaCha8Rng,
    picks: &[(usize, usize)],
) -> Vec<f32> {
    picks
        .iter()
        .flat_map(|&(c, i)| transform.view(&dataset.classes()[c].examples[i], rng))
        .collect()
}

/// [`photo_pixels`] as a tensor, augmented (if at all) from `seed` and the picks.
fn photo_tensor(
    dataset: &Dataset<Vec<u8>>,
    transform: &PhotoTransform,
    seed: u64,
    picks: &[(usize, usize)],
    device: &Device,
) -> Result<Tensor> {
    let data = photo_pixels(dataset, transform, &mut picks_rng(seed, picks), picks);
    let side = transform.side;
    Ok(Tensor::from_vec(
        data,
        (picks.len(), transform.channels, side, side),
        device,
    )?)
}

fn gather(dataset: &Dataset<Vec<f32>>, picks: &[(usize, usize)]) -> Vec<f32> {
    picks
        .iter()
        .flat_map(|&(c, i)| dataset.classes()[c].examples[i].iter().copied())
        .collect()
}

/// Right-pads the picked sequences with `pad_id` to the longest; mask 1 on tokens.
fn token_batch(
    dataset: &Dataset<Vec<u32>>,
    picks: &[(usize, usize)],
    labels: Tensor,
    pad_id: u32,
    device: &Device,
) -> Result<Batch> {
    let seqs: Vec<&[u32]> = picks
        .iter()
        .map(|&(c, i)| dataset.classes()[c].examples[i].as_slice())
        .collect();
    let length = seqs.iter().map(|s| s.len()).max().unwrap_or(0).max(1);
    let mut ids = Vec::with_capacity(seqs.len() * length);
    let mut mask = Vec::with_capacity(seqs.len() * length);
    for s in &seqs {
        ids.extend_from_slice(s);
        ids.extend(std::iter::repeat_n(pad_id, length - s.len()));
        mask.extend(std::iter::repeat_n(1u32, s.len()));
        mask.extend(std::iter::repeat_n(0u32, length - s.len()));
    }
    let shape = (seqs.len(), length);
    Batch::from_tokens(
        Tensor::from_vec(ids, shape, device)?,
        Tensor::from_vec(mask, shape, device)?,
        None,
        labels,
    )
}

/// Standardises the columns of row-major `support` and `query` (`width` columns) with
/// the support's statistics only, so nothing about the query leaks into the inputs;
/// missing (`NaN`) values become 0, the support mean. A constant column is only
/// centred.
pub(crate) fn standardise_on_support(support: &mut [f32], query: &mut [f32], width: usize) {
    if width == 0 {
        return;
    }
    for col in 0..width {
        let values: Vec<f64> = support
            .iter()
            .skip(col)
            .step_by(width)
            .filter(|v| !v.is_nan())
            .map(|&v| f64::from(v))
            .collect();
        let n = values.len().max(1) as f64;
        let mean = values.iter().sum::<f64>() / n;
        let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
        let std = if var > 1e-12 { var.sqrt() } else { 1.0 };
        for data in [&mut *support, &mut *query] {
            for v in data.iter_mut().skip(col).step_by(width) {
                *v = if v.is_nan() {
                    0.0
                } else {
                    ((f64::from(*v) - mean) / std) as f32
                };
            }
        }
    }
}

/// Episodes sampled from an [`EncodedDataset`]: episode `i` is the sampler's episode
/// `i` under `seed`, batched on `device`.
#[derive(Debug, Clone)]
pub struct DatasetEpisodes {
    data: Arc<EncodedDataset>,
    sampler: EpisodeSampler,
    seed: u64,
    device: Device,
}

impl DatasetEpisodes {
    /// Episodes of `data` as `sampler` draws them under `seed`. The sampler must have
    /// been built over this data set's class sizes.
    pub fn new(
        data: Arc<EncodedDataset>,
        sampler: EpisodeSampler,
        seed: u64,
        device: Device,
    ) -> Result<Self> {
        let sizes = data.class_sizes();
        if sampler.eligible().iter().any(|&c| c >= sizes.len()) {
            return Err(Error::InvalidArgument(
                "the sampler was built for a data set with more classes".into(),
            ));
        }
        Ok(Self {
            data,
            sampler,
            seed,
            device,
        })
    }

    /// The sampler.
    pub fn sampler(&self) -> &EpisodeSampler {
        &self.sampler
    }

    /// The episode of an explicit spec (e.g. one of a fixed evaluation set).
    pub fn episode_of(&self, spec: &EpisodeSpec) -> Result<Episode> {
        let (support, query) = self.data.batches(spec, &self.device)?;
        Episode::with_classes(
            support,
            query,
            spec.classes.len(),
            self.sampler.k_shot(),
            self.sampler.n_query(),
            spec.classes.clone(),
        )
    }
}

impl EpisodeSource for DatasetEpisodes {
    fn episode(&self, index: u64) -> Result<Episode> {
        self.episode_of(&self.sampler.episode(self.seed, index))
    }

    /// `size` examples drawn uniformly (with replacement) from every example of the
    /// eligible classes, labelled by their position among those classes.
    fn pretraining_batch(&self, index: u64, size: usize) -> Result<Option<PretrainBatch>> {
        use rand::Rng;
        let classes = self.sampler.eligible();
        let sizes = self.data.class_sizes();
        let total: usize = classes.iter().map(|&c| sizes[c]).sum();
        if total == 0 {
            return Ok(None);
        }
        let mut rng = super::episode_rng(self.seed ^ 0x7072_6574_7261_696e, index);
        let mut picks = Vec::with_capacity(size);
        let mut labels = Vec::with_capacity(size);
        for _ in 0..size {
            let mut at = rng.random_range(0..total);
            for (label, &c) in classes.iter().enumerate() {
                if at < sizes[c] {
                    picks.push((c, at));
                    labels.push(label as u32);
                    break;
                }
                at -= sizes[c];
            }
        }
        Ok(Some(PretrainBatch {
            batch: self.data.batch_of(&picks, labels, &self.device)?,
            classes: classes.len(),
        }))
    }

    fn class_names(&self) -> Option<Vec<String>> {
        let names = self.data.class_names();
        Some(
            self.sampler
                .eligible()
                .iter()
                .map(|&c| names[c].clone())
                .collect(),
        )
    }
}
