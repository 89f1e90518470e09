//! Dynamic loss scaling for f16 activations (mixed precision).
//!
//! f16 keeps about 3 significant digits between 6e-5 and 65504; gradients of a mean
//! loss flowing back through a network are often far below that range and would
//! underflow. Every backward pass of a meta-step therefore runs on `S·loss` (see
//! [`crate::tensor::loss_scale`]); the f32 master gradients are divided by `S`.
//!
//! The policy (as PyTorch's `GradScaler`): when a meta-step meets a non-finite value
//! the step is skipped (parameters and optimiser state untouched) and `S` halves;
//! after `growth_interval` good steps in a row `S` doubles, up to [`MAX_LOSS_SCALE`].
//!
//! In meta-learning the scale covers every backward pass of the step: the inner
//! steps' support gradients (they too would underflow in f16, and an underflowed
//! inner step silently adapts less), the query gradient, and the second-order
//! passes, whose direction is normalised ([`crate::tensor::ParamSet::vjp`]) so that
//! its size does not depend on the inner learning rate. An overflow anywhere in the
//! meta-batch skips the whole outer step: the meta-gradient of the other tasks alone
//! would be a biased estimate.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

pub use crate::tensor::loss_scale::{MAX_LOSS_SCALE, MIN_LOSS_SCALE};

/// The state of dynamic loss scaling.
///
/// Deserialising (a checkpoint's `state.json`) validates like [`LossScaler::new`]: a
/// scale that is not a finite number of at least [`MIN_LOSS_SCALE`], a growth interval
/// of 0 or a run of good steps not below it is an error, never a scaler that would
/// later divide by zero or overflow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "SavedLossScaler")]
pub struct LossScaler {
    scale: f64,
    growth_interval: usize,
    good_steps: usize,
    skipped_steps: usize,
}

/// A [`LossScaler`] as written, before validation.
#[derive(Deserialize)]
struct SavedLossScaler {
    scale: f64,
    growth_interval: usize,
    good_steps: usize,
    skipped_steps: usize,
}

impl TryFrom<SavedLossScaler> for LossScaler {
    type Error = Error;

    fn try_from(saved: SavedLossScaler) -> Result<Self> {
        let mut scaler = Self::new(saved.scale, saved.growth_interval).map_err(|_| {
            Error::InvalidArgument(format!(
                "loss scaler: scale {} with growth interval {}: the scale must be a finite \
                 number of at least {MIN_LOSS_SCALE} and the interval at least 1",
                saved.scale, saved.growth_interval
            ))
        })?;
        if saved.good_steps >= saved.growth_interval {
            return Err(Error::InvalidArgument(format!(
                "loss scaler: {} good steps in a row, but the scale doubles after {}: at most \
                 {} are recorded",
                saved.good_steps,
                saved.growth_interval,
                saved.growth_interval - 1
            )));
        }
        scaler.good_steps = saved.good_steps;
        scaler.skipped_steps = saved.skipped_steps;
        Ok(scaler)
    }
}

impl LossScaler {
    /// A scaler starting at `initial_scale` (finite, at least [`MIN_LOSS_SCALE`]) that
    /// doubles after `growth_interval` (≥ 1) good steps.
    pub fn new(initial_scale: f64, growth_interval: usize) -> Result<Self> {
        if !(initial_scale.is_finite() && initial_scale >= MIN_LOSS_SCALE) {
            return Err(Error::InvalidArgument(format!(
                "the initial loss scale must be a finite number of at least {MIN_LOSS_SCALE}, \
                 got {initial_scale} (memory_optimization.loss_scaling.initial_scale)"
            )));
        }
        if growth_interval == 0 {
            return Err(Error::InvalidArgument(
                "the loss scale's growth interval must be at least 1 \
                 (memory_optimization.loss_scaling.growth_interval)"
                    .into(),
            ));
        }
        Ok(Self {
            scale: initial_scale,
            growth_interval,
            good_steps: 0,
            skipped_steps: 0,
        })
    }

    /// The scale of the next step's backward passes.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// Steps skipped for an overflow so far.
    pub fn skipped_steps(&self) -> usize {
        self.skipped_steps
    }

    /// Records a good step: after `growth_interval` in a row the scale doubles.
    pub fn record_good_step(&mut self) {
        self.good_steps += 1;
        if self.good_steps >= self.growth_interval {
            self.scale = (self.scale * 2.0).min(MAX_LOSS_SCALE);
            self.good_steps = 0;
        }
    }

    /// Records a skipped step whose backward met `what` (a non-finite value): the scale
    /// halves. An error when it would fall below [`MIN_LOSS_SCALE`]: then the
    /// non-finite values do not come from scaling.
    pub fn record_overflow(&mut self, what: &str) -> Result<()> {
        self.good_steps = 0;
        self.skipped_steps = self.skipped_steps.saturating_add(1);
        let next = self.scale / 2.0;
        if next < MIN_LOSS_SCALE {
            return Err(Error::NonFinite(format!(
                "{what}, even with the loss scale down to {}: the f16 forward pass itself \
                 overflows or the data holds non-finite values; use \
                 memory_optimization.precision: bf16 (f32's range) or lower the learning rates",
                self.scale
            )));
        }
        self.scale = next;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn halves_on_overflow_doubles_after_good_runs() {
        let mut s = LossScaler::new(1024.0, 3).unwrap();
        s.record_good_step();
        s.record_good_step();
        s.record_overflow("x").unwrap();
        assert_eq!((s.scale(), s.skipped_steps()), (512.0, 1));
        // The run of good steps restarted at the overflow.
        s.record_good_step();
        s.record_good_step();
        assert_eq!(s.scale(), 512.0);
        s.record_good_step();
        assert_eq!(s.scale(), 1024.0);
        let mut top = LossScaler::new(MAX_LOSS_SCALE, 1).unwrap();
        top.record_good_step();
        assert_eq!(top.scale(), MAX_LOSS_SCALE);
    }

    #[test]
    fn gives_up_below_the_minimum_and_rejects_bad_settings() {
        let mut s = LossScaler::new(2.0, 1).unwrap();
        s.record_overflow("the gradient").unwrap();
        assert_eq!(s.scale(), 1.0);
        let err = s.record_overflow("the gradient").unwrap_err().to_string();
        assert!(
            err.contains("bf16") && err.contains("the gradient"),
            "{err}"
        );
        assert!(LossScaler::new(0.5, 1).is_err());
        assert!(LossScaler::new(f64::INFINITY, 1).is_err());
        assert!(LossScaler::new(8.0, 0)
            .unwrap_err()
            .to_string()
            .contains("growth_interval"));
    }

    fn saved(scale: &str, growth_interval: usize, good: usize, skipped: usize) -> String {
        format!(
            "{{\"scale\": {scale}, \"growth_interval\": {growth_interval}, \
             \"good_steps\": {good}, \"skipped_steps\": {skipped}}}"
        )
    }

    /// A scaler read from a checkpoint is validated like a new one: a scale ≤ 0 used
    /// to reach `tensor::loss_scale::scoped` (a debug assertion) and divide gradients
    /// by zero.
    #[test]
    fn deserialising_validates_the_scale_and_the_counts() {
        let ok: LossScaler = serde_json::from_str(&saved("1024.0", 4, 3, 7)).unwrap();
        assert_eq!((ok.scale(), ok.skipped_steps()), (1024.0, 7));
        let json = serde_json::to_string(&ok).unwrap();
        assert_eq!(serde_json::from_str::<LossScaler>(&json).unwrap(), ok);
        for (scale, interval, good) in [
            ("0.0", 4, 0),
            ("-2.0", 4, 0),
            ("0.5", 4, 0),
            ("1024.0", 0, 0),
            ("1024.0", 4, 4),
            ("1024.0", 4, usize::MAX),
        ] {
            let err = serde_json::from_str::<LossScaler>(&saved(scale, interval, good, 0))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("loss scaler"),
                "{scale} {interval} {good}: {err}"
            );
        }
        // JSON has no NaN or infinity; a number out of f64's range is an error too.
        assert!(serde_json::from_str::<LossScaler>(&saved("1e999", 4, 0, 0)).is_err());
        assert!(serde_json::from_str::<LossScaler>(&saved("null", 4, 0, 0)).is_err());
    }

    /// Counts restored at their limit saturate instead of overflowing.
    #[test]
    fn restored_counts_at_their_limit_do_not_overflow() {
        let mut s: LossScaler = serde_json::from_str(&saved("4.0", 1, 0, usize::MAX)).unwrap();
        s.record_overflow("x").unwrap();
        assert_eq!(s.skipped_steps(), usize::MAX);
        let mut s: LossScaler =
            serde_json::from_str(&saved("4.0", usize::MAX, usize::MAX - 1, 0)).unwrap();
        s.record_good_step();
        assert_eq!(s.scale(), 8.0);
    }
}
