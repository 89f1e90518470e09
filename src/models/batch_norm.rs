//! Which statistics the vision backbones' BatchNorm layers normalise with.
//!
//! By default a layer uses the statistics of the batch being forwarded, in training
//! and evaluation alike (transductive, as MAML does). For evaluation,
//! [`BatchNormStatistics::estimate`] switches a model to running statistics: each
//! layer's per-channel population mean and variance, estimated by forwarding training
//! batches ("precise BatchNorm", Wu & Johnson 2021: the average of the batches'
//! means and unbiased variances, which PyTorch's exponential moving average during
//! training approximates), used until the returned guard drops.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use candle_core::{DType, Tensor};

use crate::tensor::ops::norm::{batch_norm, batch_norm_with_statistics};
use crate::{Error, Result};

/// The statistics a backbone's BatchNorm layers use, shared by the model's clones.
#[derive(Debug, Clone, Default)]
pub struct BatchNormStatistics {
    state: Arc<Mutex<State>>,
}

#[derive(Debug, Default)]
enum State {
    /// Each batch's own statistics.
    #[default]
    Batch,
    /// Each batch's own, with every layer's per-channel moments summed.
    Recording(BTreeMap<String, Moments>),
    /// Fixed per-channel `(mean, variance)` of each layer, in f64.
    Population(Arc<BTreeMap<String, (Tensor, Tensor)>>),
}

/// A layer's per-channel batch means and unbiased variances, summed over batches.
#[derive(Debug)]
struct Moments {
    batches: usize,
    mean: Vec<f64>,
    var: Vec<f64>,
}

/// What one layer does with the current state.
enum Normalisation {
    Batch,
    Record,
    Population(Tensor, Tensor),
}

impl BatchNormStatistics {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// BatchNorm layer `name` on `x` `[n, c, ...]` with scale `gamma` and shift
    /// `beta` `[c]`, under the current statistics.
    pub(crate) fn normalise(
        &self,
        name: &str,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        eps: f64,
    ) -> Result<Tensor> {
        // The lock is held only to read the state: layers of parallel tasks run at once.
        let how = match &*self.lock() {
            State::Batch => Normalisation::Batch,
            State::Recording(_) => Normalisation::Record,
            State::Population(layers) => {
                let (mean, var) = layers.get(name).ok_or_else(|| {
                    Error::Model(format!(
                        "BatchNorm layer `{name}` has no running statistics (they were \
                         estimated on another network)"
                    ))
                })?;
                Normalisation::Population(mean.clone(), var.clone())
            }
        };
        match how {
            Normalisation::Batch => Ok(batch_norm(x, gamma, beta, eps)?),
            Normalisation::Record => {
                let (mean, var) = channel_moments(x)?;
                if let State::Recording(layers) = &mut *self.lock() {
                    let moments = layers.entry(name.to_owned()).or_insert_with(|| Moments {
                        batches: 0,
                        mean: vec![0.0; mean.len()],
                        var: vec![0.0; var.len()],
                    });
                    moments.batches += 1;
                    for (sum, v) in moments.mean.iter_mut().zip(&mean) {
                        *sum += v;
                    }
                    for (sum, v) in moments.var.iter_mut().zip(&var) {
                        *sum += v;
                    }
                }
                Ok(batch_norm(x, gamma, beta, eps)?)
            }
            Normalisation::Population(mean, var) => Ok(batch_norm_with_statistics(
                x, &mean, &var, gamma, beta, eps,
            )?),
        }
    }

    /// Records every layer's batch statistics while `forward` runs the backbone on
    /// training batches (normalising as in training), then normalises with their
    /// averages until the returned guard drops. An error if `forward` fails or no
    /// BatchNorm layer ran.
    pub fn estimate(&self, forward: impl FnOnce() -> Result<()>) -> Result<RunningStatistics<'_>> {
        *self.lock() = State::Recording(BTreeMap::new());
        let outcome = forward();
        let recorded = std::mem::take(&mut *self.lock());
        outcome?;
        let State::Recording(layers) = recorded else {
            return Err(Error::Model(
                "BatchNorm statistics changed while they were being estimated".into(),
            ));
        };
        if layers.is_empty() {
            return Err(Error::Model(
                "no BatchNorm layer ran while estimating running statistics".into(),
            ));
        }
        let mut population = BTreeMap::new();
        for (name, moments) in layers {
            let average = |sums: &[f64]| -> Result<Tensor> {
                let values: Vec<f64> = sums.iter().map(|s| s / moments.batches as f64).collect();
                Ok(Tensor::from_vec(
                    values,
                    sums.len(),
                    &candle_core::Device::Cpu,
                )?)
            };
            population.insert(name, (average(&moments.mean)?, average(&moments.var)?));
        }
        *self.lock() = State::Population(Arc::new(population));
        Ok(RunningStatistics { statistics: self })
    }

    /// Whether the layers currently use running statistics.
    pub fn running(&self) -> bool {
        matches!(&*self.lock(), State::Population(_))
    }
}

/// Running statistics in use; dropping it returns the model to batch statistics.
#[derive(Debug)]
#[must_use = "the running statistics are in use only while this guard lives"]
pub struct RunningStatistics<'a> {
    statistics: &'a BatchNormStatistics,
}

impl Drop for RunningStatistics<'_> {
    fn drop(&mut self) {
        *self.statistics.lock() = State::Batch;
    }
}

/// Per-channel mean and unbiased variance of `x` `[n, c, ...]` in f64 (the biased
/// variance where a channel has one value).
fn channel_moments(x: &Tensor) -> Result<(Vec<f64>, Vec<f64>)> {
    let rows = x
        .detach()
        .transpose(0, 1)?
        .flatten_from(1)?
        .to_dtype(DType::F64)?
        .to_vec2::<f64>()?;
    let mut means = Vec::with_capacity(rows.len());
    let mut vars = Vec::with_capacity(rows.len());
    for row in rows {
        let m = row.len() as f64;
        let mean = row.iter().sum::<f64>() / m;
        let squares = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>();
        means.push(mean);
        vars.push(squares / (m - 1.0).max(1.0));
    }
    Ok((means, vars))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::gradcheck::random_tensor;
    use crate::tensor::test_support::max_abs_diff;
    use candle_core::Device;

    /// Recording normalises as in training; the running statistics are the batches'
    /// averages, and with one batch of many values running normalisation is close to
    /// the batch's own; the guard returns the layer to batch statistics.
    #[test]
    fn running_statistics_average_the_recorded_batches() {
        let dev = Device::Cpu;
        let statistics = BatchNormStatistics::default();
        let gamma = Tensor::new(&[1.5f64, 0.5], &dev).unwrap();
        let beta = Tensor::new(&[0.1f64, -0.2], &dev).unwrap();
        let a = random_tensor(&[4, 2, 3, 3], 1, &dev).unwrap();
        let b = random_tensor(&[4, 2, 3, 3], 2, &dev)
            .unwrap()
            .affine(3.0, 1.0)
            .unwrap();
        let plain = batch_norm(&a, &gamma, &beta, 1e-5).unwrap();
        let guard = statistics
            .estimate(|| {
                let recorded = statistics.normalise("bn", &a, &gamma, &beta, 1e-5)?;
                assert_eq!(max_abs_diff(&recorded, &plain), 0.0);
                statistics.normalise("bn", &b, &gamma, &beta, 1e-5)?;
                Ok(())
            })
            .unwrap();
        assert!(statistics.running());
        let (ma, va) = channel_moments(&a).unwrap();
        let (mb, vb) = channel_moments(&b).unwrap();
        let y = statistics.normalise("bn", &a, &gamma, &beta, 1e-5).unwrap();
        // Channel 0 of a, normalised with the averaged statistics.
        let mean = (ma[0] + mb[0]) / 2.0;
        let var = (va[0] + vb[0]) / 2.0;
        let x0 = a.flatten_all().unwrap().to_vec1::<f64>().unwrap()[0];
        let y0 = y.flatten_all().unwrap().to_vec1::<f64>().unwrap()[0];
        let expected = (x0 - mean) / (var + 1e-5).sqrt() * 1.5 + 0.1;
        assert!((y0 - expected).abs() < 1e-12, "{y0} {expected}");
        let err = statistics
            .normalise("other", &a, &gamma, &beta, 1e-5)
            .unwrap_err()
            .to_string();
        assert!(err.contains("`other`"), "{err}");
        drop(guard);
        assert!(!statistics.running());
        let back = statistics.normalise("bn", &a, &gamma, &beta, 1e-5).unwrap();
        assert_eq!(max_abs_diff(&back, &plain), 0.0);
        // Nothing recorded is an error, and the layers stay on batch statistics.
        assert!(statistics.estimate(|| Ok(())).is_err());
        assert!(!statistics.running());
    }
}
