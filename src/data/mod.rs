//! Data: batches and episodes, class-grouped data sets and their episode sampler,
//! synthetic task families, readers of real data sets, and a prefetcher.
//!
//! The pipeline: a reader (or a synthetic family) gives a [`Dataset`] of examples
//! grouped by class; it is decoded once into an [`EncodedDataset`] (texts tokenised,
//! images decoded and resized); an [`EpisodeSampler`] draws N-way K-shot Q-query
//! [`EpisodeSpec`]s by seed; [`DatasetEpisodes`] turns specs into [`Episode`]s of
//! tensors; a [`Prefetcher`] builds the next meta-batches on a background thread.

mod batch;
mod configured;
mod dataset;
mod episode;
mod photos;
mod prefetch;
pub mod readers;
mod sampler;
mod source;
mod synthetic;
mod tokenize;

#[cfg(test)]
mod tests;

pub use batch::{regression_loss, Batch, Inputs, TokenInputs};
pub(crate) use configured::sinusoid_parameters;
pub use configured::{
    episode_source, episode_sources, idx_files, load_dataset, training_splits, Split,
};
pub use dataset::{Class, ClassSplits, Dataset};
pub use episode::Episode;
pub use photos::PhotoTransform;
pub use prefetch::Prefetcher;
pub use sampler::{episode_rng, EpisodeSampler, EpisodeSpec, SmallClassPolicy};
pub use source::{DatasetEpisodes, EncodedDataset, EpisodeSource, PretrainBatch};
pub use synthetic::{SinusoidTasks, SyntheticDomains, SyntheticImages, SyntheticText, TextTask};
pub use tokenize::{EncodeText, TextTokenizer, WordHashTokenizer};
