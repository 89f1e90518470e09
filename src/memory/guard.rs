//! Holding a run to a heap budget while it runs: [`BudgetGuard`] arms the counting
//! allocator, and a meta-step whose live heap goes above the budget is abandoned
//! before it changes any state ([`check_budget`] fails with [`Error::OverBudget`]);
//! the training loop then redoes it with half the micro-batch, which gives the same
//! gradient. Choosing a configuration that fits is the planner's (`crate::plan`).

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::{Error, Result};

use super::allocator::COUNTERS;

/// Holds the process to a heap budget while alive: the counting allocator raises a
/// flag when the live heap goes above it, which [`check_budget`] turns into an
/// [`Error::OverBudget`]. One guard at a time (the allocator is process-wide).
#[derive(Debug)]
pub struct BudgetGuard {
    budget: u64,
}

/// Heap bytes the armed budget is counted above (see [`BudgetGuard::arm_above`]).
static BUDGET_BASE: AtomicUsize = AtomicUsize::new(0);

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
        Ok(BudgetGuard { budget })
    }

    /// The budget in bytes.
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// Forgets an earlier excess, before a step is redone.
    pub fn clear(&self) {
        COUNTERS.clear_over_limit();
    }
}

impl Drop for BudgetGuard {
    fn drop(&mut self) {
        COUNTERS.set_limit(usize::MAX);
    }
}

/// [`Error::OverBudget`] if an armed [`BudgetGuard`]'s budget was exceeded since it
/// was armed or cleared; `Ok` otherwise (always, when no guard is armed).
pub fn check_budget() -> Result<()> {
    if COUNTERS.over_limit() {
        let base = BUDGET_BASE.load(Ordering::Relaxed);
        return Err(Error::OverBudget {
            budget: COUNTERS.limit().saturating_sub(base) as u64,
        });
    }
    Ok(())
}
