//! Range checks shared by the sections. Each returns an
//! [`Error::Config`](crate::Error::Config) naming the key, the value and what
//! is allowed, so a user can fix the file from the message alone.

use std::fmt::Display;

use crate::{Error, Result};

pub(crate) fn invalid(key: impl Into<String>, message: impl Into<String>) -> Error {
    Error::Config {
        key: key.into(),
        message: message.into(),
    }
}

/// The largest value of a count that sizes an allocation or a loop over stored
/// values (LoRA rank, inner steps, tasks per meta-batch, probes, evaluation
/// episodes): far above any real setting, low enough that nothing derived from it
/// overflows or asks for an impossible allocation.
pub(crate) const MAX_COUNT: usize = 1 << 20;

/// `value <= MAX_COUNT`.
pub(crate) fn at_most_count(key: &str, value: usize) -> Result<()> {
    if value <= MAX_COUNT {
        Ok(())
    } else {
        Err(invalid(
            key,
            format!("must be at most {MAX_COUNT}, got {value}"),
        ))
    }
}

pub(crate) fn at_least<T: PartialOrd + Display>(key: &str, value: T, min: T) -> Result<()> {
    if value >= min {
        Ok(())
    } else {
        Err(invalid(key, format!("must be at least {min}, got {value}")))
    }
}

/// Finite and > 0. NaN fails every comparison, so it is caught here too.
pub(crate) fn positive(key: &str, value: f64) -> Result<()> {
    if value.is_finite() && value > 0.0 {
        Ok(())
    } else {
        Err(invalid(
            key,
            format!("must be a finite number greater than 0, got {value}"),
        ))
    }
}

pub(crate) fn non_negative(key: &str, value: f64) -> Result<()> {
    if value.is_finite() && value >= 0.0 {
        Ok(())
    } else {
        Err(invalid(
            key,
            format!("must be a finite number at least 0, got {value}"),
        ))
    }
}

/// `lo <= value < hi`.
pub(crate) fn in_half_open(key: &str, value: f64, lo: f64, hi: f64) -> Result<()> {
    if value >= lo && value < hi {
        Ok(())
    } else {
        Err(invalid(
            key,
            format!("must be in [{lo}, {hi}), got {value}"),
        ))
    }
}

/// `lo < value < hi`.
pub(crate) fn in_open(key: &str, value: f64, lo: f64, hi: f64) -> Result<()> {
    if value > lo && value < hi {
        Ok(())
    } else {
        Err(invalid(
            key,
            format!("must be in ({lo}, {hi}), got {value}"),
        ))
    }
}

pub(crate) fn non_empty(key: &str, value: &str) -> Result<()> {
    if value.trim().is_empty() {
        Err(invalid(key, format!("must not be empty, got `{value}`")))
    } else {
        Ok(())
    }
}
