//! Which task the planner measures text instances on. melora computes only a batch's
//! real tokens (packing), so a run on text peaks on the task with the most tokens it
//! meets, not at `model.max_length`. For token sequences the planner therefore reads
//! the episodes the run itself will read — same data, tokenizer, seed and order — and
//! measures on the one with the most real tokens; with
//! [`PlannedTasks::Longest`] (or when the data cannot be read) it assumes every
//! sequence at `max_length`, an upper bound on any data.

use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::config::Config;
use crate::data::{Batch, Episode, EpisodeSource, Split};
use crate::Result;

/// The tasks a plan covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PlannedTasks {
    /// Every task of the configured run: `meta_learning.num_iterations` meta-batches
    /// of training episodes (for a baseline, `evaluation.episodes` test episodes).
    Run,
    /// The first `n` meta-batches of training episodes (for a baseline, the first `n`
    /// test episodes): what `melora profile --iterations n` runs.
    FirstIterations(usize),
    /// No data read: every sequence at `model.max_length`, the longest a batch can
    /// hold; an upper bound on any data set.
    Longest,
}

/// The task a text plan was measured on, the heaviest of those the run reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HeaviestTask {
    /// The split its episodes come from (`train`, or `test` for a baseline).
    pub split: String,
    /// Episodes read (the run's, in its order).
    pub tasks_read: u64,
    /// The episode planned on (its index in that order).
    pub episode: u64,
    /// Real tokens of its support set.
    pub support_tokens: u64,
    /// Real tokens of its query set.
    pub query_tokens: u64,
    /// Its longest sequence, in tokens.
    pub longest_sequence: u64,
}

/// The task instances run on: the heaviest episode the run reads, copied for each
/// instance (its own tensors, so that each instance's data is counted). Only the
/// episode is kept, not the data set it came from.
#[derive(Debug, Clone)]
pub(crate) struct ObservedTask {
    task: Episode,
    pub(crate) heaviest: HeaviestTask,
}

/// What the planner read of the run's data.
#[derive(Debug, Clone)]
pub(crate) struct Observed {
    /// For text, the heaviest task the run reads.
    pub(crate) task: Option<ObservedTask>,
    /// Live bytes of the episode sources the run holds (the data set as read,
    /// decoded or tokenized, and the tokenizer), measured as the planner built them.
    pub(crate) dataset_bytes: u64,
}

impl ObservedTask {
    /// A fresh copy of the planned episode.
    pub(crate) fn episode(&self) -> Result<Episode> {
        Ok(Episode {
            support: copy_batch(&self.task.support)?,
            query: copy_batch(&self.task.query)?,
            ..self.task.clone()
        })
    }
}

/// `batch` in new storage (a clone shares it).
fn copy_batch(batch: &Batch) -> Result<Batch> {
    use crate::data::{Inputs, TokenInputs};
    let inputs = match &batch.inputs {
        Inputs::Tokens(t) => Inputs::Tokens(TokenInputs {
            input_ids: t.input_ids.copy()?,
            attention_mask: t.attention_mask.copy()?,
            token_type_ids: t.token_type_ids.as_ref().map(|x| x.copy()).transpose()?,
        }),
        Inputs::Dense(x) => Inputs::Dense(x.copy()?),
    };
    Ok(Batch {
        inputs,
        labels: batch.labels.copy()?,
        targets: batch.targets.as_ref().map(|x| x.copy()).transpose()?,
    })
}

/// Real tokens of each sequence of a text batch; `None` for other inputs.
fn sequence_lengths(batch: &Batch) -> Result<Option<Vec<u64>>> {
    let crate::data::Inputs::Tokens(tokens) = &batch.inputs else {
        return Ok(None);
    };
    let rows = tokens
        .attention_mask
        .ne(0u32)?
        .to_dtype(candle_core::DType::U32)?;
    let lengths = rows.sum(1)?.to_vec1::<u32>()?;
    Ok(Some(lengths.into_iter().map(u64::from).collect()))
}

/// What `config`'s run holds of its data, and for text (`text`) the heaviest of the
/// episodes it reads under `tasks` (most real tokens in support and query together,
/// the first of equals); `Ok(None)` with [`PlannedTasks::Longest`], which reads
/// nothing.
///
/// Reading the data set costs what the run's own start does (reading, decoding or
/// tokenizing it); the result is kept for the process, so that a budget search,
/// which plans one configuration many times, reads it once.
pub(crate) fn observe(
    config: &Config,
    tasks: PlannedTasks,
    text: bool,
) -> Result<Option<Observed>> {
    let meta_trains = crate::config::LearnerSpec::of(config).meta_trains();
    let per_batch = if meta_trains {
        config.meta_learning.meta_batch_size
    } else {
        1
    };
    let batches = match tasks {
        PlannedTasks::Longest => return Ok(None),
        PlannedTasks::FirstIterations(n) => n,
        PlannedTasks::Run if meta_trains => config.meta_learning.num_iterations,
        PlannedTasks::Run => config.evaluation.episodes,
    };
    // Fixed-size inputs need no scan: every task has the configured shape.
    let count = if text {
        (batches.max(1) as u64).saturating_mul(per_batch as u64)
    } else {
        0
    };
    // The sources the run holds: training's and validation's, or for a baseline the
    // test episodes evaluation adapts to; the first is the one planned on.
    let splits: &[Split] = if meta_trains {
        crate::data::training_splits(&config.data)
    } else {
        &[Split::Test]
    };
    let split = splits[0];
    // Everything the episodes depend on, and nothing the budget search changes.
    let key = serde_json::to_string(&(
        &config.data,
        &config.model.name,
        &config.model.path,
        config.model.max_length,
        config.seed,
        format!("{split:?}"),
        count,
    ))
    .map_err(|e| crate::Error::InvalidArgument(format!("planner cache key: {e}")))?;
    static READ: Mutex<Vec<(String, Observed)>> = Mutex::new(Vec::new());
    if let Some((_, observed)) = READ
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .find(|(k, _)| *k == key)
    {
        return Ok(Some(observed.clone()));
    }
    let meter = crate::memory::MemoryMeter::start();
    let mut sources = crate::run::build::build_sources(config, splits)?;
    let dataset_bytes = meter.current_above_baseline().max(0) as u64;
    drop(meter);
    let task = if count > 0 {
        scan(sources.swap_remove(0), count, split)?
    } else {
        None
    };
    drop(sources);
    let observed = Observed {
        task,
        dataset_bytes,
    };
    READ.lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((key, observed.clone()));
    Ok(Some(observed))
}

/// Reads episodes `0..count` of `source` and keeps the one with the most real tokens.
fn scan(source: Arc<dyn EpisodeSource>, count: u64, split: Split) -> Result<Option<ObservedTask>> {
    use rayon::prelude::*;
    let name = format!("{split:?}").to_lowercase();
    let candidates: Vec<Option<HeaviestTask>> = (0..count)
        .into_par_iter()
        .map(|episode| {
            let task = source.episode(episode)?;
            let (Some(support), Some(query)) = (
                sequence_lengths(&task.support)?,
                sequence_lengths(&task.query)?,
            ) else {
                return Ok(None);
            };
            Ok(Some(HeaviestTask {
                split: name.clone(),
                tasks_read: count,
                episode,
                support_tokens: support.iter().sum(),
                query_tokens: query.iter().sum(),
                longest_sequence: support.iter().chain(&query).copied().max().unwrap_or(0),
            }))
        })
        .collect::<Result<_>>()?;
    // The first of the heaviest: larger token counts first, then earlier episodes.
    let heaviest = candidates.into_iter().flatten().min_by_key(|t| {
        (
            std::cmp::Reverse(t.support_tokens + t.query_tokens),
            t.episode,
        )
    });
    heaviest
        .map(|heaviest| {
            Ok(ObservedTask {
                task: source.episode(heaviest.episode)?,
                heaviest,
            })
        })
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(batch: &Batch) -> u64 {
        sequence_lengths(batch).unwrap().unwrap().iter().sum()
    }

    /// The planned task is the first of those with the most real tokens among the
    /// episodes the run reads, in its order; a copy of it has its own storage and
    /// the same tokens.
    #[test]
    fn the_planned_task_is_the_heaviest_the_run_reads() {
        let mut config = Config::default();
        config.meta_learning.meta_batch_size = 3;
        config.meta_learning.num_iterations = 4;
        let source = crate::run::build::build_sources(&config, &[Split::Train])
            .unwrap()
            .remove(0);
        let totals: Vec<u64> = (0..12)
            .map(|i| {
                let task = source.episode(i).unwrap();
                tokens(&task.support) + tokens(&task.query)
            })
            .collect();
        let most = *totals.iter().max().unwrap();
        let first = totals.iter().position(|&t| t == most).unwrap() as u64;
        // Synthetic texts of 8 to 32 tokens differ from task to task.
        assert!(totals.iter().any(|&t| t != most), "{totals:?}");

        let observed = observe(&config, PlannedTasks::Run, true).unwrap().unwrap();
        assert!(observed.dataset_bytes > 0);
        let task = observed.task.unwrap();
        let h = &task.heaviest;
        assert_eq!((h.tasks_read, h.episode), (12, first), "{totals:?}");
        assert_eq!(h.support_tokens + h.query_tokens, most);
        assert_eq!(h.split, "train");
        let copy = task.episode().unwrap();
        let original = source.episode(first).unwrap();
        let ids = |e: &Episode| {
            e.support
                .tokens()
                .unwrap()
                .input_ids
                .to_vec2::<u32>()
                .unwrap()
        };
        assert_eq!(ids(&copy), ids(&original));

        // The first two meta-batches only.
        let early = observe(&config, PlannedTasks::FirstIterations(2), true)
            .unwrap()
            .unwrap()
            .task
            .unwrap();
        let most_early = *totals[..6].iter().max().unwrap();
        assert_eq!(early.heaviest.tasks_read, 6);
        assert_eq!(
            early.heaviest.support_tokens + early.heaviest.query_tokens,
            most_early
        );
        assert!(observe(&config, PlannedTasks::Longest, true)
            .unwrap()
            .is_none());
    }

    /// Tasks that are not text have no token counts to plan on; their data set is
    /// still measured.
    #[test]
    fn tasks_of_other_inputs_are_not_observed() {
        let config = Config::from_yaml_str(
            "model:\n  name: mlp\ndata:\n  synthetic_task: sinusoid\nmeta_learning:\n  \
             num_iterations: 2\n",
        )
        .unwrap();
        let observed = observe(&config, PlannedTasks::Run, false).unwrap().unwrap();
        assert!(observed.task.is_none());
    }
}
