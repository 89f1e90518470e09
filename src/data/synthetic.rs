//! Built-in synthetic task families; they need no files and are deterministic by
//! seed (episode `i` is drawn from its own ChaCha8 stream, see [`episode_rng`]).
//!
//! # Text classification ([`SyntheticText`])
//!
//! Every episode is a new task over a vocabulary of `vocab` ids. Id 0 is padding; with
//! `cls_token` on, every sequence starts with id 1 (a `[CLS]`-like token) and content
//! ids are in `[2, vocab)`, else in `[1, vocab)`. The generative process of a task:
//!
//! 1. a background distribution: a Zipf law (weight 1/rank) over the content ids in a
//!    random order, standing for words common to every class;
//! 2. one topic per class, `topic_size` content ids: a fraction `similarity` of them is
//!    drawn from a pool shared by all classes of the task, the rest is the class's own
//!    (0 = disjoint topics, 1 = identical topics, i.e. unlearnable);
//! 3. a sequence of a class: length uniform in `[min_len, max_len]`; each token is,
//!    with probability `noise`, a uniform content id (difficulty); otherwise, with
//!    probability `separability`, a uniform id of the class topic, else a background
//!    id.
//!
//! So the class token distributions are `noise·U + (1−noise)·(sep·topic_c +
//! (1−sep)·background)`; they differ on the topic ids, by `(1−noise)·sep/topic_size`
//! per own topic id.
//!
//! # Domains ([`SyntheticDomains`])
//!
//! Text classification with the same `n_way` classes (intents) in every task, each
//! task a new *domain*: think of one classifier of support-ticket intents adapted to
//! each new customer from a few labelled tickets. The generative process:
//!
//! 1. once for the whole family (the *world*, seeded by `world_seed`): each class gets
//!    `universal_size` content ids that signal it in every domain, and the background
//!    is a Zipf law over the ids left after every class's universal ids;
//! 2. per task (domain): each class gets `domain_size` ids of its own, drawn afresh
//!    from the background ids (a domain's own words for the class);
//! 3. a text of class `c`: `[CLS]`, then `len − 1` ids, each with probability
//!    `universal` one of the class's universal ids, else with probability `domain`
//!    one of its domain ids, else a background id; `len` uniform in
//!    `[min_len, max_len]`.
//!
//! Class `c` is label `c` in every task (no per-task permutation): that is the
//! structure the tasks share. What meta-learning can learn from meta-training domains
//! is an initialisation that already reads the universal cues of each class — it
//! starts every new domain knowing something, and its support set adds the domain's
//! own words. A learner that starts afresh on each task (nearest prototype of frozen
//! features, an adapter trained from scratch) has only its few support texts, in
//! which the universal cues are as rare as anything else.
//!
//! # Sinusoid regression ([`SinusoidTasks`])
//!
//! The classic MAML benchmark: `y = A·sin(x − φ)` with amplitude `A` uniform in
//! [0.1, 5], phase `φ` uniform in [0, π] and `x` uniform in [−5, 5]. Episodes have
//! `n_way` 1; support and query are [`Batch::regression`] batches with inputs `[n, 1]`
//! and targets `[n, 1]` (read with [`Batch::regression_targets`]).
//!
//! # Images ([`SyntheticImages`])
//!
//! Every class of an episode is a random prototype: a few thick line strokes on a
//! `size × size` grey canvas (strokes 1, background 0, like inverted Omniglot). An
//! example is its prototype under a random affine jitter (shift of up to `max_shift`
//! pixels, rotation of up to `max_rotation` radians; bilinear resampling) plus Gaussian
//! pixel noise of standard deviation `noise`. Batches are `[n, 1, size, size]`, as
//! Conv4 reads.

use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

use super::{
    episode_rng, Batch, Class, Dataset, EncodedDataset, Episode, EpisodeSource, PretrainBatch,
};
use crate::{Error, Result};

/// Synthetic text-classification tasks (see the module documentation).
#[derive(Debug, Clone, PartialEq)]
pub struct SyntheticText {
    /// Vocabulary size; ids are below it (1000 for the built-in tiny models).
    pub vocab: usize,
    /// Shortest sequence, special token included.
    pub min_len: usize,
    /// Longest sequence, special token included (at most the model's positions).
    pub max_len: usize,
    /// Content ids per class topic.
    pub topic_size: usize,
    /// Fraction of a topic shared by all classes of a task, in [0, 1].
    pub similarity: f64,
    /// Probability that a non-noise token comes from the class topic, in [0, 1].
    pub separability: f64,
    /// Probability that a token is uniform noise, in [0, 1].
    pub noise: f64,
    /// Start every sequence with id 1.
    pub cls_token: bool,
    /// Classes per task.
    pub n_way: usize,
    /// Support sequences per class.
    pub k_shot: usize,
    /// Query sequences per class.
    pub n_query: usize,
    /// Seed of the task family.
    pub seed: u64,
}

impl Default for SyntheticText {
    fn default() -> Self {
        Self {
            vocab: 1000,
            min_len: 8,
            max_len: 32,
            topic_size: 20,
            similarity: 0.25,
            separability: 0.5,
            noise: 0.1,
            cls_token: true,
            n_way: 5,
            k_shot: 5,
            n_query: 5,
            seed: 0,
        }
    }
}

/// A task of [`SyntheticText`]: the token distribution of each class.
#[derive(Debug, Clone)]
pub struct TextTask {
    /// Per class, the probability of each id (`vocab` entries; padding and the
    /// special token have probability 0).
    pub distributions: Vec<Vec<f64>>,
}

impl SyntheticText {
    /// The default family with sequences of at most `max_length` tokens (the model's
    /// `model.max_length`): lengths uniform in `[min(8, max_length), min(32,
    /// max_length)]`. At least 3 tokens (the leading id and two content ids).
    pub fn with_max_length(max_length: usize) -> Result<Self> {
        let default = Self::default();
        if max_length < 3 {
            return Err(Error::Config {
                key: "model.max_length".into(),
                message: format!(
                    "synthetic text sequences need at least 3 tokens, got {max_length}"
                ),
            });
        }
        let max_len = default.max_len.min(max_length);
        Ok(Self {
            min_len: default.min_len.min(max_len),
            max_len,
            ..default
        })
    }

    fn check(&self) -> Result<()> {
        let first = self.first_content_id();
        let unit = |name: &str, v: f64| {
            if (0.0..=1.0).contains(&v) {
                Ok(())
            } else {
                Err(Error::InvalidArgument(format!(
                    "synthetic text: {name} must be in [0, 1], got {v}"
                )))
            }
        };
        unit("similarity", self.similarity)?;
        unit("separability", self.separability)?;
        unit("noise", self.noise)?;
        let needed_vocab = self
            .topic_size
            .max(1)
            .checked_mul(2)
            .and_then(|ids| ids.checked_add(first));
        if needed_vocab.is_none_or(|needed| self.vocab < needed)
            || self.min_len <= first
            || self.min_len > self.max_len
            || self.topic_size == 0
            || self.n_way == 0
            || self.k_shot == 0
            || self.n_query == 0
        {
            return Err(Error::InvalidArgument(format!(
                "synthetic text: inconsistent settings {self:?}"
            )));
        }
        Ok(())
    }

    fn first_content_id(&self) -> usize {
        if self.cls_token {
            2
        } else {
            1
        }
    }

    fn draw_task(&self, rng: &mut ChaCha8Rng) -> (Vec<usize>, Vec<f64>, Vec<Vec<usize>>) {
        let first = self.first_content_id();
        let mut background: Vec<usize> = (first..self.vocab).collect();
        background.shuffle(rng);
        // Cumulative Zipf weights over `background`'s order.
        let mut cumulative = Vec::with_capacity(background.len());
        let mut total = 0.0;
        for rank in 0..background.len() {
            total += 1.0 / (rank + 1) as f64;
            cumulative.push(total);
        }
        let shared_count = (self.similarity * self.topic_size as f64).round() as usize;
        let mut ids: Vec<usize> = (first..self.vocab).collect();
        ids.shuffle(rng);
        let shared: Vec<usize> = ids.iter().copied().take(self.topic_size).collect();
        let mut own = ids.into_iter().skip(self.topic_size).cycle();
        let topics = (0..self.n_way)
            .map(|_| {
                let mut topic: Vec<usize> = shared.iter().copied().take(shared_count).collect();
                topic.extend(own.by_ref().take(self.topic_size - shared_count));
                topic
            })
            .collect();
        (background, cumulative, topics)
    }

    /// The token distribution of each class of task `index` (to check that classes
    /// differ; episodes sample from exactly these).
    pub fn task(&self, index: u64) -> Result<TextTask> {
        self.check()?;
        let (background, cumulative, topics) = self.draw_task(&mut episode_rng(self.seed, index));
        let first = self.first_content_id();
        let content = (self.vocab - first) as f64;
        let total = *cumulative.last().unwrap_or(&1.0);
        let distributions = topics
            .iter()
            .map(|topic: &Vec<usize>| {
                let mut p = vec![0.0; self.vocab];
                let keep = 1.0 - self.noise;
                for (id, pi) in p.iter_mut().enumerate().skip(first) {
                    let _ = id;
                    *pi = self.noise / content;
                }
                for (rank, &id) in background.iter().enumerate() {
                    p[id] += keep * (1.0 - self.separability) / ((rank + 1) as f64 * total);
                }
                for &id in topic {
                    p[id] += keep * self.separability / topic.len() as f64;
                }
                p
            })
            .collect();
        Ok(TextTask { distributions })
    }

    fn sequence(
        &self,
        rng: &mut ChaCha8Rng,
        background: &[usize],
        cumulative: &[f64],
        topic: &[usize],
    ) -> Vec<u32> {
        let first = self.first_content_id();
        let len = rng.random_range(self.min_len..=self.max_len);
        let mut seq = Vec::with_capacity(len);
        if self.cls_token {
            seq.push(1);
        }
        let total = *cumulative.last().unwrap_or(&1.0);
        while seq.len() < len {
            let id = if rng.random::<f64>() < self.noise {
                rng.random_range(first..self.vocab)
            } else if rng.random::<f64>() < self.separability {
                topic[rng.random_range(0..topic.len())]
            } else {
                let u = rng.random::<f64>() * total;
                background[cumulative
                    .partition_point(|&c| c < u)
                    .min(background.len() - 1)]
            };
            seq.push(id as u32);
        }
        seq
    }
}

impl EpisodeSource for SyntheticText {
    fn episode(&self, index: u64) -> Result<Episode> {
        self.check()?;
        let mut rng = episode_rng(self.seed, index);
        let (background, cumulative, topics) = self.draw_task(&mut rng);
        super::episode::episode_examples("synthetic text", self.n_way, self.k_shot, self.n_query)?;
        let per_class = self.k_shot + self.n_query;
        let classes = topics
            .iter()
            .enumerate()
            .map(|(c, topic)| Class {
                name: format!("topic {c}"),
                examples: (0..per_class)
                    .map(|_| self.sequence(&mut rng, &background, &cumulative, topic))
                    .collect(),
            })
            .collect();
        whole_episode(
            EncodedDataset::Tokens {
                dataset: Dataset::new(classes),
                pad_id: 0,
            },
            self.k_shot,
            self.n_query,
        )
    }
}

/// The episode of a freshly generated task: class `c` is label `c`, its first
/// `k_shot` examples are the support, the rest the query.
fn whole_episode(data: EncodedDataset, k_shot: usize, n_query: usize) -> Result<Episode> {
    let n_way = data.class_sizes().len();
    let spec = super::EpisodeSpec {
        classes: (0..n_way).collect(),
        support: (0..n_way).map(|_| (0..k_shot).collect()).collect(),
        query: (0..n_way)
            .map(|_| (k_shot..k_shot + n_query).collect())
            .collect(),
    };
    let (support, query) = data.batches(&spec, &Device::Cpu)?;
    Episode::with_classes(support, query, n_way, k_shot, n_query, Vec::new())
}

/// The domains family (see the module documentation).
#[derive(Debug, Clone, PartialEq)]
pub struct SyntheticDomains {
    /// Vocabulary size; ids are below it (1000 for the built-in tiny models).
    pub vocab: usize,
    /// Shortest text, `[CLS]` included.
    pub min_len: usize,
    /// Longest text, `[CLS]` included (at most the model's `max_length`).
    pub max_len: usize,
    /// Universal ids per class (the same in every domain).
    pub universal_size: usize,
    /// Domain ids per class (new in every task).
    pub domain_size: usize,
    /// Probability that a token is one of its class's universal ids, in [0, 1].
    pub universal: f64,
    /// Probability that a token is one of its class's domain ids, in [0, 1].
    pub domain: f64,
    /// Classes (intents) of every task.
    pub n_way: usize,
    /// Support texts per class.
    pub k_shot: usize,
    /// Query texts per class.
    pub n_query: usize,
    /// Seed of the world: the classes' universal ids and the background, shared by
    /// the meta-training, meta-validation and meta-test tasks.
    pub world_seed: u64,
    /// Seed of the tasks.
    pub seed: u64,
}

impl Default for SyntheticDomains {
    fn default() -> Self {
        Self {
            vocab: 1000,
            min_len: 8,
            max_len: 16,
            universal_size: 3,
            domain_size: 6,
            universal: 0.1,
            domain: 0.3,
            n_way: 5,
            k_shot: 2,
            n_query: 3,
            world_seed: 0,
            seed: 0,
        }
    }
}

impl SyntheticDomains {
    /// The default family with texts of at most `max_length` tokens (see
    /// [`SyntheticText::with_max_length`]).
    pub fn with_max_length(max_length: usize) -> Result<Self> {
        let text = SyntheticText::with_max_length(max_length)?;
        let default = Self::default();
        let max_len = default.max_len.min(text.max_len);
        Ok(Self {
            min_len: default.min_len.min(max_len),
            max_len,
            ..default
        })
    }

    fn check(&self) -> Result<()> {
        let unit = |v: f64| (0.0..=1.0).contains(&v);
        let universal_ids = self.n_way.checked_mul(self.universal_size);
        let enough = universal_ids
            .and_then(|u| u.checked_add(self.n_way.checked_mul(self.domain_size)?))
            .is_some_and(|needed| needed < self.vocab.saturating_sub(2));
        if !unit(self.universal)
            || !unit(self.domain)
            || self.universal + self.domain > 1.0
            || !enough
            || self.universal_size == 0
            || self.domain_size == 0
            || self.min_len < 2
            || self.min_len > self.max_len
            || self.n_way == 0
            || self.k_shot == 0
            || self.n_query == 0
        {
            return Err(Error::InvalidArgument(format!(
                "synthetic domains: inconsistent settings {self:?}"
            )));
        }
        Ok(())
    }

    /// Universal ids of each class, and the background ids (in Zipf rank order).
    fn world(&self) -> (Vec<Vec<u32>>, Vec<u32>) {
        let mut rng = episode_rng(self.world_seed, u64::MAX);
        let mut ids: Vec<u32> = (2..self.vocab as u32).collect();
        ids.shuffle(&mut rng);
        let background = ids.split_off(self.n_way * self.universal_size);
        let universal = ids
            .chunks(self.universal_size)
            .map(<[u32]>::to_vec)
            .collect();
        (universal, background)
    }
}

impl EpisodeSource for SyntheticDomains {
    /// Whole tasks' texts: the classes are the same in every task.
    fn pretraining_batch(&self, index: u64, size: usize) -> Result<Option<PretrainBatch>> {
        let per_task = self.n_way * (self.k_shot + self.n_query);
        whole_tasks(self, index, size, per_task, self.n_way).map(Some)
    }

    fn episode(&self, index: u64) -> Result<Episode> {
        self.check()?;
        let (universal, background) = self.world();
        let mut cumulative = Vec::with_capacity(background.len());
        let mut total = 0.0;
        for rank in 0..background.len() {
            total += 1.0 / (rank + 1) as f64;
            cumulative.push(total);
        }
        let mut rng = episode_rng(self.seed, index);
        // The domain's own words: distinct background ids, a set per class.
        let mut pool = background.clone();
        pool.shuffle(&mut rng);
        let domains: Vec<&[u32]> = pool.chunks(self.domain_size).take(self.n_way).collect();
        let per_class = super::episode::episode_examples(
            "synthetic domains",
            self.n_way,
            self.k_shot,
            self.n_query,
        )? / self.n_way;
        let classes = (0..self.n_way)
            .map(|c| Class {
                name: format!("intent {c}"),
                examples: (0..per_class)
                    .map(|_| {
                        let len = rng.random_range(self.min_len..=self.max_len);
                        let mut text = Vec::with_capacity(len);
                        text.push(1);
                        while text.len() < len {
                            let u: f64 = rng.random();
                            let id = if u < self.universal {
                                universal[c][rng.random_range(0..universal[c].len())]
                            } else if u < self.universal + self.domain {
                                domains[c][rng.random_range(0..domains[c].len())]
                            } else {
                                let x = rng.random::<f64>() * total;
                                background[cumulative
                                    .partition_point(|&v| v < x)
                                    .min(background.len() - 1)]
                            };
                            text.push(id);
                        }
                        text
                    })
                    .collect(),
            })
            .collect();
        whole_episode(
            EncodedDataset::Tokens {
                dataset: Dataset::new(classes),
                pad_id: 0,
            },
            self.k_shot,
            self.n_query,
        )
    }
}

/// Pre-training batch `index` of a family whose tasks all have the same classes: whole
/// tasks (support and query) until the batch holds at least `size` examples, batch `i`
/// taking the next tasks after batch `i − 1`'s.
fn whole_tasks(
    source: &dyn EpisodeSource,
    index: u64,
    size: usize,
    per_task: usize,
    classes: usize,
) -> Result<PretrainBatch> {
    let tasks = size.div_ceil(per_task.max(1)).max(1) as u64;
    let first = index.checked_mul(tasks).ok_or_else(|| {
        Error::InvalidArgument(format!(
            "pre-training batch {index} overflows the task index"
        ))
    })?;
    let mut parts = Vec::with_capacity(2 * tasks as usize);
    for i in 0..tasks {
        let task = source.episode(first.saturating_add(i))?;
        parts.push(task.support);
        parts.push(task.query);
    }
    Ok(PretrainBatch {
        batch: Batch::concat(&parts)?,
        classes,
    })
}

/// Sinusoid regression tasks (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SinusoidTasks {
    /// Support points per task.
    pub k_shot: usize,
    /// Query points per task.
    pub n_query: usize,
    /// Seed of the task family.
    pub seed: u64,
}

impl SinusoidTasks {
    /// Smallest and largest amplitude.
    pub const AMPLITUDE: (f64, f64) = (0.1, 5.0);
    /// Smallest and largest phase.
    pub const PHASE: (f64, f64) = (0.0, std::f64::consts::PI);
    /// Range of the inputs.
    pub const X: (f64, f64) = (-5.0, 5.0);

    /// Amplitude and phase of task `index`.
    pub fn parameters(&self, index: u64) -> (f64, f64) {
        draw_sinusoid(&mut episode_rng(self.seed, index))
    }
}

fn draw_sinusoid(rng: &mut ChaCha8Rng) -> (f64, f64) {
    let amplitude = rng.random_range(SinusoidTasks::AMPLITUDE.0..=SinusoidTasks::AMPLITUDE.1);
    let phase = rng.random_range(SinusoidTasks::PHASE.0..=SinusoidTasks::PHASE.1);
    (amplitude, phase)
}

impl EpisodeSource for SinusoidTasks {
    /// Whole tasks' points: pre-training regresses on points of many tasks (the
    /// "pretrained" baseline of Finn et al., 2017).
    fn pretraining_batch(&self, index: u64, size: usize) -> Result<Option<PretrainBatch>> {
        whole_tasks(self, index, size, self.k_shot + self.n_query, 1).map(Some)
    }

    fn episode(&self, index: u64) -> Result<Episode> {
        if self.k_shot == 0 || self.n_query == 0 {
            return Err(Error::InvalidArgument(
                "sinusoid tasks need k_shot and n_query of at least 1".into(),
            ));
        }
        super::episode::episode_examples("sinusoid tasks", 1, self.k_shot, self.n_query)?;
        let mut rng = episode_rng(self.seed, index);
        let (amplitude, phase) = draw_sinusoid(&mut rng);
        let mut points = |n: usize| -> Result<Batch> {
            let x: Vec<f32> = (0..n)
                .map(|_| rng.random_range(SinusoidTasks::X.0..=SinusoidTasks::X.1) as f32)
                .collect();
            let y: Vec<f32> = x
                .iter()
                .map(|&x| (amplitude * (f64::from(x) - phase).sin()) as f32)
                .collect();
            Batch::regression(
                Tensor::from_vec(x, (n, 1), &Device::Cpu)?,
                Tensor::from_vec(y, (n, 1), &Device::Cpu)?,
            )
        };
        let support = points(self.k_shot)?;
        let query = points(self.n_query)?;
        Episode::with_classes(support, query, 1, self.k_shot, self.n_query, Vec::new())
    }
}

/// Synthetic image-classification tasks (see the module documentation).
#[derive(Debug, Clone, PartialEq)]
pub struct SyntheticImages {
    /// Side of the square images.
    pub size: usize,
    /// Strokes per prototype.
    pub strokes: usize,
    /// Largest shift, in pixels.
    pub max_shift: f64,
    /// Largest rotation, in radians.
    pub max_rotation: f64,
    /// Standard deviation of the pixel noise.
    pub noise: f64,
    /// Classes per task.
    pub n_way: usize,
    /// Support images per class.
    pub k_shot: usize,
    /// Query images per class.
    pub n_query: usize,
    /// Seed of the task family.
    pub seed: u64,
}

impl Default for SyntheticImages {
    fn default() -> Self {
        Self {
            size: 28,
            strokes: 3,
            max_shift: 2.0,
            max_rotation: 0.2,
            noise: 0.1,
            n_way: 5,
            k_shot: 1,
            n_query: 5,
            seed: 0,
        }
    }
}

impl SyntheticImages {
    fn prototype(&self, rng: &mut ChaCha8Rng) -> Vec<f32> {
        let s = self.size as f64;
        let segments: Vec<[f64; 4]> = (0..self.strokes)
            .map(|_| {
                let mut p = || rng.random_range(0.2 * s..0.8 * s);
                [p(), p(), p(), p()]
            })
            .collect();
        let mut image = vec![0.0f32; self.size * self.size];
        for (i, px) in image.iter_mut().enumerate() {
            let (x, y) = ((i % self.size) as f64 + 0.5, (i / self.size) as f64 + 0.5);
            let near = segments.iter().any(|&[x0, y0, x1, y1]| {
                let (dx, dy) = (x1 - x0, y1 - y0);
                let t = (((x - x0) * dx + (y - y0) * dy) / (dx * dx + dy * dy).max(1e-9))
                    .clamp(0.0, 1.0);
                let (ex, ey) = (x - x0 - t * dx, y - y0 - t * dy);
                ex * ex + ey * ey <= 1.1 * 1.1
            });
            *px = if near { 1.0 } else { 0.0 };
        }
        image
    }

    fn jitter(&self, rng: &mut ChaCha8Rng, prototype: &[f32]) -> Vec<f32> {
        let n = self.size;
        let angle = rng.random_range(-self.max_rotation..=self.max_rotation);
        let (sx, sy) = (
            rng.random_range(-self.max_shift..=self.max_shift),
            rng.random_range(-self.max_shift..=self.max_shift),
        );
        let (sin, cos) = angle.sin_cos();
        let centre = n as f64 / 2.0;
        let at = |x: isize, y: isize| -> f64 {
            if x < 0 || y < 0 || x >= n as isize || y >= n as isize {
                0.0
            } else {
                f64::from(prototype[y as usize * n + x as usize])
            }
        };
        (0..n * n)
            .map(|i| {
                // Inverse map: where in the prototype this output pixel comes from.
                let (x, y) = (
                    (i % n) as f64 + 0.5 - centre - sx,
                    (i / n) as f64 + 0.5 - centre - sy,
                );
                let (u, v) = (
                    cos * x + sin * y + centre - 0.5,
                    -sin * x + cos * y + centre - 0.5,
                );
                let (u0, v0) = (u.floor(), v.floor());
                let (fu, fv) = (u - u0, v - v0);
                let (u0, v0) = (u0 as isize, v0 as isize);
                let value = at(u0, v0) * (1.0 - fu) * (1.0 - fv)
                    + at(u0 + 1, v0) * fu * (1.0 - fv)
                    + at(u0, v0 + 1) * (1.0 - fu) * fv
                    + at(u0 + 1, v0 + 1) * fu * fv;
                let noise: f64 = rng.sample(StandardNormal);
                (value + self.noise * noise) as f32
            })
            .collect()
    }
}

impl EpisodeSource for SyntheticImages {
    fn episode(&self, index: u64) -> Result<Episode> {
        if self.size == 0 || self.n_way == 0 || self.k_shot == 0 || self.n_query == 0 {
            return Err(Error::InvalidArgument(format!(
                "synthetic images: inconsistent settings {self:?}"
            )));
        }
        super::episode::episode_examples(
            "synthetic images",
            self.n_way,
            self.k_shot,
            self.n_query,
        )?;
        if self.size > crate::config::MAX_IMAGE_SIZE {
            return Err(Error::InvalidArgument(format!(
                "synthetic images: size {} is too large: at most {} pixels per side \
                 (data.image_size)",
                self.size,
                crate::config::MAX_IMAGE_SIZE
            )));
        }
        let mut rng = episode_rng(self.seed, index);
        let classes = (0..self.n_way)
            .map(|c| {
                let prototype = self.prototype(&mut rng);
                Class {
                    name: format!("prototype {c}"),
                    examples: (0..self.k_shot + self.n_query)
                        .map(|_| self.jitter(&mut rng, &prototype))
                        .collect(),
                }
            })
            .collect();
        whole_episode(
            EncodedDataset::Images {
                dataset: Dataset::new(classes),
                channels: 1,
                height: self.size,
                width: self.size,
            },
            self.k_shot,
            self.n_query,
        )
    }
}
