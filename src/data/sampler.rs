//! Seeded N-way K-shot Q-query episode sampling over a data set's classes.
//!
//! Episode `i` of a seed is drawn from its own ChaCha8 stream (`seed`, stream `i`),
//! so it does not depend on which other episodes were drawn, on how many threads
//! draw them, or on the platform: ChaCha8 and `rand` 0.9's integer ranges are
//! portable. The classes of an episode are drawn in random order and the `j`-th gets
//! label `j`, so every episode has a fresh random label permutation.

use rand::seq::{index, SliceRandom};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::{Error, Result};

/// What to do with a class that has fewer than K + Q examples.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SmallClassPolicy {
    /// Leave it out of every episode, with a warning on standard error.
    #[default]
    Skip,
    /// Refuse the data set with an error naming the class.
    Error,
}

/// Which examples make one episode: indices into a data set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpisodeSpec {
    /// The data set's class behind each label: label `j` is class `classes[j]`.
    pub classes: Vec<usize>,
    /// Per label, the indices (within its class) of the support examples.
    pub support: Vec<Vec<usize>>,
    /// Per label, the indices (within its class) of the query examples, disjoint from
    /// the support ones.
    pub query: Vec<Vec<usize>>,
}

/// The ChaCha8 generator of episode `index` under `seed`.
pub fn episode_rng(seed: u64, index: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(index);
    rng
}

/// Draws N-way K-shot Q-query episodes from classes of known sizes.
#[derive(Debug, Clone)]
pub struct EpisodeSampler {
    class_sizes: Vec<usize>,
    eligible: Vec<usize>,
    skipped: Vec<usize>,
    n_way: usize,
    k_shot: usize,
    n_query: usize,
}

impl EpisodeSampler {
    /// A sampler over classes with `class_sizes[c]` examples each. Classes with fewer
    /// than `k_shot + n_query` examples are handled by `policy`; `class_names` (if not
    /// empty) name them in messages. Fails if fewer than `n_way` classes remain.
    pub fn new(
        class_sizes: Vec<usize>,
        class_names: &[String],
        n_way: usize,
        k_shot: usize,
        n_query: usize,
        policy: SmallClassPolicy,
    ) -> Result<Self> {
        if n_way == 0 || k_shot == 0 || n_query == 0 {
            return Err(Error::InvalidArgument(format!(
                "episodes need n_way, k_shot and n_query of at least 1; got {n_way}, {k_shot}, \
                 {n_query}"
            )));
        }
        super::episode::episode_examples("episode sampler", n_way, k_shot, n_query)?;
        // Cannot overflow: n_way × (k_shot + n_query) was checked above.
        let need = k_shot + n_query;
        let name = |c: usize| {
            class_names
                .get(c)
                .map_or_else(|| format!("class {c}"), |n| format!("class `{n}`"))
        };
        let (eligible, skipped): (Vec<usize>, Vec<usize>) =
            (0..class_sizes.len()).partition(|&c| class_sizes[c] >= need);
        if let Some(&c) = skipped.first() {
            match policy {
                SmallClassPolicy::Error => {
                    return Err(Error::InvalidArgument(format!(
                        "{} has {} examples, fewer than k_shot + n_query = {need}{}; remove it \
                         or set data.small_classes: skip",
                        name(c),
                        class_sizes[c],
                        if skipped.len() > 1 {
                            format!(" ({} such classes in all)", skipped.len())
                        } else {
                            String::new()
                        }
                    )))
                }
                SmallClassPolicy::Skip => eprintln!(
                    "warning: skipping {} of {} classes with fewer than k_shot + n_query = \
                     {need} examples (first: {} with {})",
                    skipped.len(),
                    class_sizes.len(),
                    name(c),
                    class_sizes[c]
                ),
            }
        }
        if eligible.len() < n_way {
            return Err(Error::InvalidArgument(format!(
                "{n_way}-way episodes need {n_way} classes with at least {need} examples; only \
                 {} of {} classes have that many",
                eligible.len(),
                class_sizes.len()
            )));
        }
        Ok(Self {
            class_sizes,
            eligible,
            skipped,
            n_way,
            k_shot,
            n_query,
        })
    }

    /// Classes left out for having fewer than K + Q examples.
    pub fn skipped(&self) -> &[usize] {
        &self.skipped
    }

    /// Classes episodes are drawn from.
    pub fn eligible(&self) -> &[usize] {
        &self.eligible
    }

    /// Classes per episode.
    pub fn n_way(&self) -> usize {
        self.n_way
    }

    /// Support examples per class.
    pub fn k_shot(&self) -> usize {
        self.k_shot
    }

    /// Query examples per class.
    pub fn n_query(&self) -> usize {
        self.n_query
    }

    /// Draws one episode with `rng`.
    pub fn sample(&self, rng: &mut ChaCha8Rng) -> EpisodeSpec {
        let classes: Vec<usize> = index::sample(rng, self.eligible.len(), self.n_way)
            .into_iter()
            .map(|i| self.eligible[i])
            .collect();
        let mut support = Vec::with_capacity(self.n_way);
        let mut query = Vec::with_capacity(self.n_way);
        for &c in &classes {
            let mut picked =
                index::sample(rng, self.class_sizes[c], self.k_shot + self.n_query).into_vec();
            // index::sample's order is random already; shuffle anyway so that the split
            // between support and query does not depend on its algorithm choice.
            picked.shuffle(rng);
            query.push(picked.split_off(self.k_shot));
            support.push(picked);
        }
        EpisodeSpec {
            classes,
            support,
            query,
        }
    }

    /// Episode `index` of `seed` (its own stream; see the module documentation).
    pub fn episode(&self, seed: u64, index: u64) -> EpisodeSpec {
        self.sample(&mut episode_rng(seed, index))
    }

    /// A fixed set of `count` evaluation episodes: the same for every method given
    /// the same seed, so that methods are compared on paired episodes.
    pub fn fixed_episodes(&self, seed: u64, count: usize) -> Vec<EpisodeSpec> {
        (0..count as u64).map(|i| self.episode(seed, i)).collect()
    }
}
