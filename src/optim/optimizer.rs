//! Outer optimisers: SGD and AdamW (decoupled weight decay), on ParamSets.

use crate::tensor::ParamSet;
use crate::{Error, Result};

/// Which optimiser, with its hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OptimizerKind {
    /// `θ ← θ − lr·(g + wd·θ)`.
    Sgd {
        /// L2 weight decay.
        weight_decay: f64,
    },
    /// AdamW (Loshchilov & Hutter): Adam moments with bias correction, and decoupled
    /// decay `θ ← θ − lr·wd·θ`.
    AdamW {
        /// First-moment decay (0.9).
        beta1: f64,
        /// Second-moment decay (0.999).
        beta2: f64,
        /// Denominator guard (1e-8).
        eps: f64,
        /// Decoupled weight decay.
        weight_decay: f64,
    },
}

impl OptimizerKind {
    /// AdamW with the usual betas and epsilon.
    pub fn adamw(weight_decay: f64) -> Self {
        Self::AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
        }
    }
}

/// An optimiser with its state (moments and step count), saved with checkpoints.
#[derive(Debug, Clone)]
pub struct Optimizer {
    kind: OptimizerKind,
    step: u64,
    first_moment: Option<ParamSet>,
    second_moment: Option<ParamSet>,
}

impl Optimizer {
    /// A fresh optimiser.
    pub fn new(kind: OptimizerKind) -> Self {
        Self {
            kind,
            step: 0,
            first_moment: None,
            second_moment: None,
        }
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// The state as ParamSets (`m`, `v`) for checkpoints; `None` before the first
    /// AdamW step or for SGD.
    pub fn moments(&self) -> Option<(&ParamSet, &ParamSet)> {
        self.first_moment.as_ref().zip(self.second_moment.as_ref())
    }

    /// Restores the state written by [`Optimizer::moments`] and [`Optimizer::steps`].
    pub fn restore(&mut self, step: u64, moments: Option<(ParamSet, ParamSet)>) {
        self.step = step;
        (self.first_moment, self.second_moment) = match moments {
            Some((m, v)) => (Some(m), Some(v)),
            None => (None, None),
        };
    }

    /// One step of `params` along `grads` with learning rate `lr`; returns the new
    /// parameters (detached).
    pub fn step(&mut self, params: &ParamSet, grads: &ParamSet, lr: f64) -> Result<ParamSet> {
        if !(lr.is_finite() && lr >= 0.0) {
            return Err(Error::InvalidArgument(format!(
                "learning rate must be ≥ 0, got {lr}"
            )));
        }
        let direction = self.direction(params, grads)?;
        let params = params.detach();
        let start = match self.kind {
            OptimizerKind::AdamW { weight_decay, .. } if weight_decay > 0.0 => {
                params.scale(1.0 - lr * weight_decay)?
            }
            _ => params,
        };
        start.axpy(-lr, &direction)
    }

    /// The direction `d` of the next step, `θ ← θ − lr·d` (before AdamW's decoupled
    /// decay), advancing the state: `g + wd·θ` for SGD, the bias-corrected
    /// `m̂ / (√v̂ + ε)` for AdamW. The inner loop of the first-order learners steps
    /// along it with its own step rule (every parameter, or only the head).
    pub fn direction(&mut self, params: &ParamSet, grads: &ParamSet) -> Result<ParamSet> {
        params.check_compatible(grads)?;
        let (params, grads) = (params.detach(), grads.detach());
        self.step = self.step.saturating_add(1);
        match self.kind {
            OptimizerKind::Sgd { weight_decay } => {
                if weight_decay > 0.0 {
                    grads.axpy(weight_decay, &params)
                } else {
                    Ok(grads)
                }
            }
            OptimizerKind::AdamW {
                beta1, beta2, eps, ..
            } => {
                let m = match &self.first_moment {
                    Some(m) => m.scale(beta1)?.axpy(1.0 - beta1, &grads)?,
                    None => grads.scale(1.0 - beta1)?,
                };
                let squared = grads.mul(&grads)?;
                let v = match &self.second_moment {
                    Some(v) => v.scale(beta2)?.axpy(1.0 - beta2, &squared)?,
                    None => squared.scale(1.0 - beta2)?,
                };
                // β^t is 0 in f64 long before t leaves i32: clamp rather than wrap.
                let t = i32::try_from(self.step).unwrap_or(i32::MAX);
                let (c1, c2) = (1.0 - beta1.powi(t), 1.0 - beta2.powi(t));
                let update = m.map(|name, m_i| {
                    let v_i = v.get(name).expect("same names");
                    (m_i / c1)? / ((v_i / c2)?.sqrt()? + eps)?
                })?;
                self.first_moment = Some(m);
                self.second_moment = Some(v);
                Ok(update)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn one(value: f64) -> ParamSet {
        ParamSet::from_pairs([("w", Tensor::new(&[value], &Device::Cpu).unwrap())]).unwrap()
    }

    fn value(p: &ParamSet) -> f64 {
        p.get("w").unwrap().to_vec1::<f64>().unwrap()[0]
    }

    #[test]
    fn sgd_with_weight_decay() {
        let mut opt = Optimizer::new(OptimizerKind::Sgd { weight_decay: 0.1 });
        let next = opt.step(&one(2.0), &one(0.5), 0.1).unwrap();
        assert!((value(&next) - (2.0 - 0.1 * (0.5 + 0.1 * 2.0))).abs() < 1e-15);
    }

    /// A step count restored near u64::MAX (a crafted checkpoint) used to overflow
    /// `step += 1` and wrap `step as i32` into a negative exponent.
    #[test]
    fn a_huge_restored_step_count_neither_overflows_nor_wraps() {
        for step in [u64::MAX, u64::from(u32::MAX) + 7] {
            let mut opt = Optimizer::new(OptimizerKind::adamw(0.0));
            opt.restore(step, None);
            let next = opt.step(&one(1.0), &one(0.5), 0.1).unwrap();
            // Bias corrections are 1 this late: m = 0.1·g, v = 0.001·g².
            let (m, v) = (0.1 * 0.5, 0.001 * 0.25f64);
            let expected = 1.0 - 0.1 * m / (v.sqrt() + 1e-8);
            assert!((value(&next) - expected).abs() < 1e-12, "{}", value(&next));
            assert!(opt.steps() >= step);
        }
    }

    /// Two AdamW steps against the formulas written out by hand.
    #[test]
    fn adamw_matches_hand_computation() {
        let mut opt = Optimizer::new(OptimizerKind::adamw(0.01));
        let (lr, g1, g2) = (0.1, 0.5, -0.2);
        let p1 = opt.step(&one(1.0), &one(g1), lr).unwrap();
        let (m1, v1) = (0.1 * g1, 0.001 * g1 * g1);
        let expect1 = 1.0 * (1.0 - lr * 0.01) - lr * (m1 / 0.1) / ((v1 / 0.001f64).sqrt() + 1e-8);
        assert!((value(&p1) - expect1).abs() < 1e-12);
        let p2 = opt.step(&p1, &one(g2), lr).unwrap();
        let (m2, v2) = (0.9 * m1 + 0.1 * g2, 0.999 * v1 + 0.001 * g2 * g2);
        let (c1, c2) = (1.0 - 0.9f64.powi(2), 1.0 - 0.999f64.powi(2));
        let expect2 = expect1 * (1.0 - lr * 0.01) - lr * (m2 / c1) / ((v2 / c2).sqrt() + 1e-8);
        assert!((value(&p2) - expect2).abs() < 1e-12);
        assert_eq!(opt.steps(), 2);
    }

    #[test]
    fn rejects_bad_rates_and_mismatched_sets() {
        let mut opt = Optimizer::new(OptimizerKind::adamw(0.0));
        assert!(opt.step(&one(1.0), &one(1.0), f64::NAN).is_err());
        let other =
            ParamSet::from_pairs([("v", Tensor::new(&[1.0f64], &Device::Cpu).unwrap())]).unwrap();
        assert!(opt.step(&one(1.0), &other, 0.1).is_err());
    }
}
