//! Learning-rate schedules over the outer steps.

use crate::{Error, Result};

/// How the outer learning rate evolves over `total` steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Schedule {
    /// The base rate throughout.
    Constant,
    /// Cosine decay from the base rate to 0 at the last step.
    Cosine,
    /// Linear warm-up from 0 over `warmup` steps, then cosine decay to 0.
    WarmupCosine {
        /// Steps of linear warm-up.
        warmup: usize,
    },
}

impl Schedule {
    /// The learning rate at `step` (0-based) of `total` steps for base rate `base`.
    pub fn rate(&self, base: f64, step: usize, total: usize) -> Result<f64> {
        if total == 0 || step >= total {
            return Err(Error::InvalidArgument(format!(
                "step {step} is outside a schedule of {total} steps"
            )));
        }
        let cosine = |from: usize| {
            let span = (total - from).max(1) as f64;
            let progress = (step - from) as f64 / span;
            0.5 * base * (1.0 + (std::f64::consts::PI * progress).cos())
        };
        Ok(match *self {
            Schedule::Constant => base,
            Schedule::Cosine => cosine(0),
            Schedule::WarmupCosine { warmup } if step < warmup => {
                base * (step + 1) as f64 / warmup as f64
            }
            Schedule::WarmupCosine { warmup } => cosine(warmup),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_of_the_schedules() {
        assert_eq!(Schedule::Constant.rate(0.1, 7, 10).unwrap(), 0.1);
        assert_eq!(Schedule::Cosine.rate(0.1, 0, 10).unwrap(), 0.1);
        assert!((Schedule::Cosine.rate(0.1, 5, 10).unwrap() - 0.05).abs() < 1e-15);
        assert!(Schedule::Cosine.rate(0.1, 9, 10).unwrap() < 0.003);
        let w = Schedule::WarmupCosine { warmup: 4 };
        assert!((w.rate(0.1, 0, 20).unwrap() - 0.025).abs() < 1e-15);
        assert!((w.rate(0.1, 3, 20).unwrap() - 0.1).abs() < 1e-15);
        assert!((w.rate(0.1, 4, 20).unwrap() - 0.1).abs() < 1e-15);
        assert!(w.rate(0.1, 19, 20).unwrap() < 0.01);
        assert!(Schedule::Constant.rate(0.1, 10, 10).is_err());
    }
}
