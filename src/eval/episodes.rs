//! Scoring a model on a fixed set of test episodes: adapt on each support set, score
//! the query set, and summarise with confidence intervals.
//!
//! The episodes are a deterministic function of their index (see
//! [`crate::data::EpisodeSource`]), so every method evaluated on the same source and
//! count sees the same tasks, and per-episode scores can be paired across methods.

use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::data::EpisodeSource;
use crate::engine::GradEngine;
use crate::memory::MemoryMeter;
use crate::meta::Adapter;
use crate::nn::Mode;
use crate::optim::MIN_LOSS_SCALE;
use crate::tensor::ParamSet;
use crate::{Error, Result};

use super::stats::{macro_f1, mean_ci, Interval};

/// One test episode's outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpisodeScore {
    /// Fraction of query examples classified correctly (`None` for regression).
    pub accuracy: Option<f64>,
    /// Macro-averaged F1 over the episode's classes (`None` for regression).
    pub macro_f1: Option<f64>,
    /// Query loss after adaptation: cross-entropy, or mean squared error.
    pub loss: f64,
    /// Seconds spent adapting to the support set.
    pub adapt_seconds: f64,
}

/// Scores over a fixed set of test episodes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// Whether the tasks are regression (scored by MSE) rather than classification.
    pub regression: bool,
    /// Level of the confidence intervals.
    pub confidence: f64,
    /// Each episode's scores, in episode order.
    pub episodes: Vec<EpisodeScore>,
    /// Mean query accuracy with its confidence interval (classification).
    pub accuracy: Option<IntervalRecord>,
    /// Mean macro-F1 with its confidence interval (classification).
    pub macro_f1: Option<IntervalRecord>,
    /// Mean query loss (cross-entropy or MSE) with its confidence interval.
    pub loss: IntervalRecord,
    /// Mean seconds of adaptation per task.
    pub adapt_seconds: f64,
    /// Peak heap bytes above the level at the start of the evaluation (adaptation
    /// graphs, episode data); `None` when the counting allocator is not installed.
    pub peak_bytes: Option<u64>,
    /// The classes the test episodes were drawn from (`None` for synthetic tasks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classes: Option<Vec<String>>,
}

/// A confidence interval in a serialisable form (see [`Interval`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct IntervalRecord {
    /// Sample mean.
    pub mean: f64,
    /// Half the interval's width.
    pub half_width: f64,
    /// Number of values.
    pub n: usize,
}

impl From<Interval> for IntervalRecord {
    fn from(i: Interval) -> Self {
        Self {
            mean: i.mean,
            half_width: i.half_width,
            n: i.n,
        }
    }
}

impl Evaluation {
    /// The score where higher is better: mean accuracy, or minus the mean MSE.
    pub fn score(&self) -> f64 {
        match &self.accuracy {
            Some(a) => a.mean,
            None => -self.loss.mean,
        }
    }

    /// Per-episode values of the headline metric (accuracy, or MSE for regression),
    /// for paired comparisons.
    pub fn headline_values(&self) -> Vec<f64> {
        self.episodes
            .iter()
            .map(|e| e.accuracy.unwrap_or(e.loss))
            .collect()
    }

    /// The headline metric's mean and interval: accuracy, or the MSE for regression.
    pub fn headline_interval(&self) -> IntervalRecord {
        self.accuracy.unwrap_or(self.loss)
    }

    /// `0.734 ± 0.012` (accuracy) or `0.52 ± 0.04 MSE`.
    pub fn headline(&self) -> String {
        match &self.accuracy {
            Some(a) => format!("{:.3} ± {:.3}", a.mean, a.half_width),
            None => format!("{:.4} ± {:.4} MSE", self.loss.mean, self.loss.half_width),
        }
    }
}

/// Adapts `params` on each of the first `count` episodes of `source` and scores the
/// query sets; `progress(i)` is called after episode `i` (0-based).
///
/// With a `loss_scale` (f16 activations) adaptation's backward passes run under it;
/// an overflow halves it and adapts the episode again.
#[allow(clippy::too_many_arguments)]
pub fn evaluate_episodes(
    adapter: &dyn Adapter,
    engine: &dyn GradEngine,
    params: &ParamSet,
    source: &dyn EpisodeSource,
    count: usize,
    confidence: f64,
    mut loss_scale: Option<f64>,
    progress: &mut dyn FnMut(usize),
) -> Result<Evaluation> {
    if count == 0 {
        return Err(Error::InvalidArgument(
            "evaluation needs at least 1 episode (evaluation.episodes)".into(),
        ));
    }
    let meter = MemoryMeter::start();
    // Not `with_capacity(count)`: a count near usize::MAX (`--episodes`) is a capacity
    // overflow before the first episode.
    let mut episodes = Vec::with_capacity(count.min(4096));
    let mut regression = false;
    for index in 0..count {
        let task = source.episode(index as u64)?;
        regression = task.query.targets.is_some();
        let started = Instant::now();
        let adapted = loop {
            let _scope = loss_scale.map(crate::tensor::loss_scale::scoped);
            match (
                adapter.adapt(engine, params, &task.support, Mode::Eval),
                loss_scale,
            ) {
                (Err(Error::NonFinite(_)), Some(s)) if s / 2.0 >= MIN_LOSS_SCALE => {
                    loss_scale = Some(s / 2.0);
                }
                (result, _) => break result?,
            }
        };
        let adapt_seconds = started.elapsed().as_secs_f64();
        let outputs = adapter
            .predict(engine, &adapted, &task.query, Mode::Eval)?
            .detach();
        let loss = crate::meta::loss_value(&outputs, &task.query)
            .map_err(|e| e.context(format!("test episode {index}")))?;
        let (accuracy, f1) = if regression {
            (None, None)
        } else {
            let predicted = outputs.argmax(1)?.to_vec1::<u32>()?;
            let labels = task.query.labels.to_vec1::<u32>()?;
            let correct = predicted
                .iter()
                .zip(&labels)
                .filter(|(p, l)| p == l)
                .count();
            let classes = outputs.dim(1)?;
            (
                Some(correct as f64 / labels.len() as f64),
                Some(macro_f1(&predicted, &labels, classes)?),
            )
        };
        episodes.push(EpisodeScore {
            accuracy,
            macro_f1: f1,
            loss,
            adapt_seconds,
        });
        progress(index);
    }
    let peak_bytes = crate::memory::is_installed().then(|| meter.peak_above_baseline() as u64);
    let mut evaluation = summarise(episodes, regression, confidence, peak_bytes)?;
    evaluation.classes = source.class_names();
    Ok(evaluation)
}

/// Intervals and means of per-episode scores.
pub(crate) fn summarise(
    episodes: Vec<EpisodeScore>,
    regression: bool,
    confidence: f64,
    peak_bytes: Option<u64>,
) -> Result<Evaluation> {
    // One episode has no spread: report a zero-width interval rather than fail.
    let interval = |values: Vec<f64>| -> Result<IntervalRecord> {
        if values.len() < 2 {
            let mean = values.first().copied().unwrap_or(f64::NAN);
            return Ok(IntervalRecord {
                mean,
                half_width: 0.0,
                n: values.len(),
            });
        }
        Ok(mean_ci(&values, confidence)?.into())
    };
    let collect = |f: fn(&EpisodeScore) -> Option<f64>| -> Option<Vec<f64>> {
        episodes.iter().map(f).collect()
    };
    let accuracy = collect(|e| e.accuracy).map(interval).transpose()?;
    let macro_f1 = collect(|e| e.macro_f1).map(interval).transpose()?;
    let loss = interval(episodes.iter().map(|e| e.loss).collect())?;
    let adapt_seconds =
        episodes.iter().map(|e| e.adapt_seconds).sum::<f64>() / episodes.len().max(1) as f64;
    Ok(Evaluation {
        regression,
        confidence,
        episodes,
        accuracy,
        macro_f1,
        loss,
        adapt_seconds,
        peak_bytes,
        classes: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn score(accuracy: f64) -> EpisodeScore {
        EpisodeScore {
            accuracy: Some(accuracy),
            macro_f1: Some(accuracy),
            loss: 1.0 - accuracy,
            adapt_seconds: 0.5,
        }
    }

    #[test]
    fn summary_has_t_intervals_and_means() {
        let episodes = vec![score(0.2), score(0.4), score(0.6), score(0.8)];
        let e = summarise(episodes, false, 0.95, None).unwrap();
        let a = e.accuracy.unwrap();
        assert!((a.mean - 0.5).abs() < 1e-12);
        // s = 0.2582, t_{0.975,3} = 3.182446: half width = t·s/√4.
        let expected = 3.182_446_305_284_263 * (0.2f64 / 3.0).sqrt() / 2.0;
        assert!((a.half_width - expected).abs() < 1e-9, "{}", a.half_width);
        assert!((e.adapt_seconds - 0.5).abs() < 1e-12);
        assert_eq!(e.headline_values(), vec![0.2, 0.4, 0.6, 0.8]);
        assert!((e.score() - 0.5).abs() < 1e-12);
    }

    #[test]
    fn regression_scores_by_mse() {
        let episodes = vec![
            EpisodeScore {
                accuracy: None,
                macro_f1: None,
                loss: 0.3,
                adapt_seconds: 0.1,
            },
            EpisodeScore {
                accuracy: None,
                macro_f1: None,
                loss: 0.5,
                adapt_seconds: 0.1,
            },
        ];
        let e = summarise(episodes, true, 0.95, None).unwrap();
        assert!(e.accuracy.is_none());
        assert!((e.score() + 0.4).abs() < 1e-12);
        assert!(e.headline().ends_with("MSE"));
    }
}
