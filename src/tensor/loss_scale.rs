//! The loss scale of this thread's backward passes.
//!
//! With f16 activations, gradients smaller than f16's normal range (about 6e-5)
//! lose their digits or vanish. Loss scaling multiplies the loss by a scale S
//! before the backward pass, so every gradient flowing through the f16 part of the
//! graph is S times larger, and divides the parameters' gradients (f32) by S after.
//! [`ParamSet::gradients`](super::ParamSet::gradients) does both whenever a scale is
//! set here, so every learner's backward passes (inner steps, query gradients,
//! Hessian-vector products) are scaled without knowing it. The dynamic policy that
//! picks S (skip a step on overflow and halve it, double it after a run of good
//! steps) is the optimiser layer's `LossScaler`, within the bounds set here.

use std::cell::Cell;

/// The largest scale the dynamic policy grows to (2²⁴).
pub const MAX_LOSS_SCALE: f64 = 16_777_216.0;
/// Below this scale an overflow is not the scale's doing (the f16 forward pass
/// itself overflows, or the data holds NaN): the scaler stops with an error.
pub const MIN_LOSS_SCALE: f64 = 1.0;

thread_local! {
    static SCALE: Cell<f64> = const { Cell::new(1.0) };
}

/// The scale this thread's backward passes multiply their loss by (1: none).
pub fn current() -> f64 {
    SCALE.with(Cell::get)
}

/// Keeps a loss scale set on this thread until dropped, then restores the previous
/// one (scopes nest).
#[derive(Debug)]
#[must_use = "the scale is set only while the scope is alive"]
pub struct LossScaleScope {
    previous: f64,
}

/// Sets this thread's loss scale to `scale` (finite, > 0) for the returned scope.
pub fn scoped(scale: f64) -> LossScaleScope {
    debug_assert!(scale.is_finite() && scale > 0.0, "loss scale {scale}");
    LossScaleScope {
        previous: SCALE.with(|s| s.replace(scale)),
    }
}

impl Drop for LossScaleScope {
    fn drop(&mut self) {
        SCALE.with(|s| s.set(self.previous));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_nest_and_restore() {
        assert_eq!(current(), 1.0);
        {
            let _outer = scoped(1024.0);
            assert_eq!(current(), 1024.0);
            {
                let _inner = scoped(2.0);
                assert_eq!(current(), 2.0);
            }
            assert_eq!(current(), 1024.0);
        }
        assert_eq!(current(), 1.0);
    }
}
