//! Scores against the number of adaptation steps (`evaluation.curve_steps`): each
//! method with an inner loop is adapted again to the same test tasks with 0, 1, …
//! steps, as Finn et al. (2017, § 5.1, Figure 3) draw MAML against a pre-trained
//! model; on sinusoid tasks also the fitted curves of one test task (their Figure 2).

use serde::{Deserialize, Serialize};

use candle_core::Tensor;

use crate::config::Config;
use crate::data::{sinusoid_parameters, Batch, Inputs, SinusoidTasks, Split};
use crate::eval::IntervalRecord;
use crate::{Error, Result};

use super::evaluate::{evaluate, predict_after_adaptation, EvaluateOptions};

/// A method's score after a number of adaptation steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CurvePoint {
    /// Adaptation steps (0: the starting parameters as they are).
    pub steps: usize,
    /// Mean headline metric (accuracy, or MSE) over the test episodes, with its
    /// interval; `None` when adaptation diverged (a non-finite loss) on a test task.
    pub headline: Option<IntervalRecord>,
}

/// One sinusoid test task fitted after several numbers of adaptation steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SinusoidFit {
    /// Index of the test task.
    pub task: u64,
    /// Its amplitude.
    pub amplitude: f64,
    /// Its phase.
    pub phase: f64,
    /// The support points `(x, y)` adaptation saw.
    pub support: Vec<(f64, f64)>,
    /// The inputs of the predictions, evenly spaced over the tasks' input range.
    pub grid: Vec<f64>,
    /// Predictions at `grid` after each number of steps.
    pub predictions: Vec<FitPrediction>,
}

/// Predictions after a number of adaptation steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FitPrediction {
    /// Adaptation steps.
    pub steps: usize,
    /// The prediction at each grid input.
    pub values: Vec<f64>,
}

/// Points of the grid a fit is drawn at.
const FIT_GRID_POINTS: usize = 201;

/// `config` and `options` adapting with `steps` gradient steps (0: none).
fn with_steps(
    config: &Config,
    options: &EvaluateOptions,
    steps: usize,
) -> (Config, EvaluateOptions) {
    let mut config = config.clone();
    let mut options = options.clone();
    if steps == 0 {
        options.no_adaptation = true;
    } else {
        config.meta_learning.inner.steps = steps;
    }
    (config, options)
}

/// The score on the test episodes of `options` after each of `steps` adaptation
/// steps of `config`'s inner loop.
pub(crate) fn adaptation_curve(
    config: &Config,
    options: &EvaluateOptions,
    steps: &[usize],
) -> Result<Vec<CurvePoint>> {
    steps
        .iter()
        .map(|&s| {
            let (config, options) = with_steps(config, options, s);
            let headline = match evaluate(&config, &options, &mut |_| {}) {
                Ok(evaluation) => Some(evaluation.headline_interval()),
                Err(Error::NonFinite(_)) => None,
                Err(e) => return Err(e),
            };
            Ok(CurvePoint { steps: s, headline })
        })
        .collect()
}

/// The first test task of sinusoid tasks fitted after the smallest, one (if listed)
/// and the largest of `steps` adaptation steps; `None` for other tasks.
pub(crate) fn sinusoid_fit(
    config: &Config,
    options: &EvaluateOptions,
    steps: &[usize],
) -> Result<Option<SinusoidFit>> {
    const TASK: u64 = 0;
    let seed = options.episode_seed.unwrap_or(config.seed);
    let split = options.split.unwrap_or(Split::Test);
    let Some((amplitude, phase)) = sinusoid_parameters(&config.data, seed, split, TASK) else {
        return Ok(None);
    };
    let (lo, hi) = SinusoidTasks::X;
    let grid: Vec<f64> = (0..FIT_GRID_POINTS)
        .map(|i| lo + (hi - lo) * i as f64 / (FIT_GRID_POINTS - 1) as f64)
        .collect();
    let truth: Vec<f32> = grid
        .iter()
        .map(|&x| (amplitude * (x - phase).sin()) as f32)
        .collect();
    let x: Vec<f32> = grid.iter().map(|&x| x as f32).collect();
    let device = crate::run::build::device(config)?;
    let inputs = Batch::regression(
        Tensor::from_vec(x, (FIT_GRID_POINTS, 1), &device)?,
        Tensor::from_vec(truth, (FIT_GRID_POINTS, 1), &device)?,
    )?;
    let mut drawn: Vec<usize> = steps.to_vec();
    drawn.sort_unstable();
    drawn.dedup();
    let drawn: Vec<usize> = match (drawn.first(), drawn.last()) {
        (Some(&first), Some(&last)) => {
            let mut d = vec![first];
            if drawn.contains(&1) {
                d.push(1);
            }
            d.push(last);
            d.dedup();
            d
        }
        _ => return Ok(None),
    };
    let mut support = Vec::new();
    let mut predictions = Vec::with_capacity(drawn.len());
    for s in drawn {
        let (config, options) = with_steps(config, options, s);
        let (support_set, predicted) =
            match predict_after_adaptation(&config, &options, TASK, &inputs) {
                Ok(outcome) => outcome,
                // Diverged on this task: nothing to draw at this step count.
                Err(Error::NonFinite(_)) => continue,
                Err(e) => return Err(e),
            };
        if support.is_empty() {
            support = points_of(&support_set)?;
        }
        predictions.push(FitPrediction {
            steps: s,
            values: predicted
                .flatten_all()?
                .to_dtype(candle_core::DType::F64)?
                .to_vec1::<f64>()?,
        });
    }
    Ok(Some(SinusoidFit {
        task: TASK,
        amplitude,
        phase,
        support,
        grid,
        predictions,
    }))
}

/// The `(x, y)` points of a regression batch of one input and one target.
fn points_of(batch: &Batch) -> Result<Vec<(f64, f64)>> {
    let Inputs::Dense(x) = &batch.inputs else {
        return Ok(Vec::new());
    };
    let as_f64 = |t: &Tensor| -> Result<Vec<f64>> {
        Ok(t.flatten_all()?
            .to_dtype(candle_core::DType::F64)?
            .to_vec1::<f64>()?)
    };
    let xs = as_f64(x)?;
    let ys = as_f64(batch.regression_targets()?)?;
    Ok(xs.into_iter().zip(ys).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A step count at which SGD diverges on a test task is recorded as diverged
    /// (and left out of the fit) rather than failing the comparison.
    #[test]
    fn a_diverging_step_count_is_recorded_not_fatal() {
        let yaml = "seed: 2\nmodel:\n  name: mlp\nmeta_learning:\n  method: fomaml\n  \
                    inner:\n    lr: 1.0e6\n\
                    data:\n  synthetic_task: sinusoid\n  k_shot: 5\n  n_query: 5\n\
                    evaluation:\n  episodes: 3\n";
        let config = Config::from_yaml_str(yaml).unwrap();
        let options = EvaluateOptions::default();
        let curve = adaptation_curve(&config, &options, &[0, 8]).unwrap();
        assert!(curve[0].headline.is_some_and(|h| h.mean.is_finite()));
        assert_eq!(curve[1].headline, None);
        let fit = sinusoid_fit(&config, &options, &[0, 8]).unwrap().unwrap();
        let drawn: Vec<usize> = fit.predictions.iter().map(|p| p.steps).collect();
        assert_eq!(drawn, [0]);
    }
}
