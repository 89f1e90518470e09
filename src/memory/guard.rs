//! Holding a run to a memory budget while it runs: [`BudgetGuard`] arms the
//! counting allocator (host heap) or watches a GPU's memory pool, and a meta-step
//! whose live memory goes above the budget is abandoned before it changes any
//! state ([`check_budget`] fails with [`Error::OverBudget`]); the training loop
//! then redoes it with half the micro-batch, which gives the same gradient.
//! Choosing a configuration that fits is the planner's (`crate::plan`).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use candle_core::Device;

use crate::{Error, Result};

use super::allocator::COUNTERS;
use super::device::{device_memory, reset_device_peak};

/// Holds the process to a memory budget while alive. On the heap, the counting
/// allocator raises a flag when the live heap goes above it; on a GPU, the device
/// pool's peak is compared with it. [`check_budget`] turns either into an
/// [`Error::OverBudget`]. One guard at a time (the allocator is process-wide).
#[derive(Debug)]
pub struct BudgetGuard {
    budget: u64,
    /// The GPU watched, for a device budget.
    device: Option<Device>,
}

/// Heap bytes the armed budget is counted above (see [`BudgetGuard::arm_above`]).
static BUDGET_BASE: AtomicUsize = AtomicUsize::new(0);

/// An armed device budget.
#[derive(Debug)]
struct DeviceLimit {
    device: Device,
    /// The budget in bytes.
    budget: u64,
    /// The pool's live bytes it ends at (the run's start plus the budget).
    end: u64,
}

static DEVICE_LIMIT: Mutex<Option<DeviceLimit>> = Mutex::new(None);
/// Whether [`DEVICE_LIMIT`] is set, read without the lock on every check.
static DEVICE_ARMED: AtomicBool = AtomicBool::new(false);

impl BudgetGuard {
    /// Arms the allocator with `budget` bytes of the whole process's heap. Fails
    /// without the counting allocator (nothing would be measured).
    pub fn arm(budget: u64) -> Result<Self> {
        Self::arm_above(budget, 0)
    }

    /// Arms the allocator with `budget` bytes above `base` bytes of heap: a run's
    /// budget counted from where the planner's prediction starts (building the model
    /// on), not including the process's runtime set up before it (thread pools,
    /// kernel workspaces), which `plan` does not predict either.
    pub fn arm_above(budget: u64, base: usize) -> Result<Self> {
        if !super::is_installed() {
            return Err(Error::MemoryBudget(
                "enforcing a budget needs the counting allocator, which this program does not \
                 install (the melora binary does)"
                    .into(),
            ));
        }
        BUDGET_BASE.store(base, Ordering::Relaxed);
        let budget_bytes = usize::try_from(budget).unwrap_or(usize::MAX);
        COUNTERS.set_limit(budget_bytes.saturating_add(base));
        Ok(BudgetGuard {
            budget,
            device: None,
        })
    }

    /// Holds the memory where `device` keeps its tensors to `budget` bytes: on the
    /// CPU the heap above `heap_base` ([`Self::arm_above`]); on a GPU its memory
    /// pool above `device_base` live bytes (read when the run started). A GPU's
    /// peak is read from its pool at each check (between micro-batches and after
    /// each task), so it catches any excess since the step began; after an excess
    /// [`Self::clear`] restarts the device's peak, which from then on covers the
    /// redone step.
    pub fn arm_on(
        device: &Device,
        budget: u64,
        heap_base: usize,
        device_base: u64,
    ) -> Result<Self> {
        if device_memory(device)?.is_none() {
            return Self::arm_above(budget, heap_base);
        }
        let mut limit = DEVICE_LIMIT.lock().unwrap_or_else(|e| e.into_inner());
        *limit = Some(DeviceLimit {
            device: device.clone(),
            budget,
            end: device_base.saturating_add(budget),
        });
        DEVICE_ARMED.store(true, Ordering::Release);
        Ok(BudgetGuard {
            budget,
            device: Some(device.clone()),
        })
    }

    /// The budget in bytes.
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// Forgets an earlier excess, before a step is redone.
    pub fn clear(&self) -> Result<()> {
        COUNTERS.clear_over_limit();
        // The pool's peak only falls when reset: reset it after an excess, and only
        // then, so that it stays the run's peak otherwise.
        if let Some(device) = &self.device {
            if device_over_limit()?.is_some() {
                reset_device_peak(device)?;
            }
        }
        Ok(())
    }
}

impl Drop for BudgetGuard {
    fn drop(&mut self) {
        if self.device.is_some() {
            DEVICE_ARMED.store(false, Ordering::Release);
            *DEVICE_LIMIT.lock().unwrap_or_else(|e| e.into_inner()) = None;
        } else {
            COUNTERS.set_limit(usize::MAX);
        }
    }
}

/// The armed device budget, if the device's peak went above it.
fn device_over_limit() -> Result<Option<u64>> {
    if !DEVICE_ARMED.load(Ordering::Acquire) {
        return Ok(None);
    }
    let limit = DEVICE_LIMIT.lock().unwrap_or_else(|e| e.into_inner());
    let Some(limit) = limit.as_ref() else {
        return Ok(None);
    };
    let peak = device_memory(&limit.device)?.map_or(0, |reading| reading.peak_bytes);
    Ok((peak > limit.end).then_some(limit.budget))
}

/// [`Error::OverBudget`] if an armed [`BudgetGuard`]'s budget was exceeded since it
/// was armed or cleared; `Ok` otherwise (always, when no guard is armed).
pub fn check_budget() -> Result<()> {
    if let Some(budget) = device_over_limit()? {
        return Err(Error::OverBudget { budget });
    }
    if COUNTERS.over_limit() {
        let base = BUDGET_BASE.load(Ordering::Relaxed);
        return Err(Error::OverBudget {
            budget: COUNTERS.limit().saturating_sub(base) as u64,
        });
    }
    Ok(())
}
