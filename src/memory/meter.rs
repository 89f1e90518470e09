//! Scoped peak measurement on top of the counting allocator.

use std::fmt;

use serde::Serialize;

use super::allocator::{Counters, COUNTERS};
use super::bytes::format_bytes;
use super::rss::ProcessMemory;

/// Measures the heap peak of a scope: the highest number of bytes allocated
/// through [`CountingAllocator`](super::CountingAllocator) between
/// [`start`](Self::start) (or [`reset`](Self::reset)) and now.
///
/// ```
/// use melora::memory::MemoryMeter;
///
/// let meter = MemoryMeter::start();
/// let buffer = vec![0u8; 1 << 20];
/// drop(buffer);
/// // With the counting allocator installed this is at least 1 MiB; without it, 0.
/// let _peak = meter.peak_above_baseline();
/// ```
///
/// # Rules
///
/// - **Figures are process-wide.** The counters see every thread's allocations,
///   so a meter measures the scope plus whatever other threads allocate and free
///   meanwhile.
/// - **Meters nest strictly (last started, first dropped).** Starting a meter
///   lowers the global peak to the bytes allocated now and remembers the peak it
///   replaced; dropping it restores the global peak to the larger of the two. So
///   an inner meter reports its own scope, and once it is dropped an outer meter
///   sees both its own earlier peak and the inner scope's peak. While an inner
///   meter is alive an outer meter's peak reads only cover the inner scope; meters
///   dropped out of order, or overlapping on different threads, give figures that
///   mix their scopes.
/// - **Without the allocator installed** every figure is zero and
///   [`report`](Self::report) leaves the heap part out (`None`), so output can say
///   "not measured"; check with [`is_installed`](super::is_installed).
#[derive(Debug)]
pub struct MemoryMeter {
    counters: &'static Counters,
    baseline: usize,
    start_allocations: u64,
    /// Highest global peak replaced by this meter (at start and at each reset),
    /// restored on drop so that enclosing scopes keep it.
    outer_peak: usize,
}

impl MemoryMeter {
    /// Starts measuring: takes the bytes allocated now as the baseline and
    /// lowers the global peak to that value (restored on drop).
    ///
    /// First it gives the calling thread and rayon's worker threads the matrix
    /// kernels' per-thread scratch buffers (one L2 cache each), so that these stay
    /// out of every scope's figure instead of appearing in it at random.
    #[must_use = "a meter measures until it is dropped; bind it to a variable"]
    pub fn start() -> Self {
        crate::tensor::kernel_workspace::reserve_on_kernel_threads();
        Self::start_on(&COUNTERS)
    }

    pub(crate) fn start_on(counters: &'static Counters) -> Self {
        let baseline = counters.current();
        let outer_peak = counters.replace_peak(baseline);
        Self {
            counters,
            baseline,
            start_allocations: counters.allocations(),
            outer_peak,
        }
    }

    /// Starts a new measurement from now (new baseline, peak lowered to the
    /// bytes allocated now), still restoring the earlier peaks on drop.
    pub fn reset(&mut self) {
        let now = self.counters.current();
        let seen = self.counters.replace_peak(now);
        self.outer_peak = self.outer_peak.max(seen);
        self.baseline = now;
        self.start_allocations = self.counters.allocations();
    }

    /// Bytes allocated when the meter started or was last reset.
    pub fn baseline_bytes(&self) -> usize {
        self.baseline
    }

    /// The highest number of bytes allocated (in total, not above the baseline)
    /// since the meter started or was last reset.
    pub fn peak_bytes(&self) -> usize {
        self.counters.peak()
    }

    /// How far the peak rose above the baseline: the extra memory the scope
    /// needed at its worst. Zero if it never rose.
    pub fn peak_above_baseline(&self) -> usize {
        self.peak_bytes().saturating_sub(self.baseline)
    }

    /// Bytes allocated now minus the baseline; negative when the scope freed
    /// more than it allocated (signed so that freeing is visible, not clamped).
    pub fn current_above_baseline(&self) -> i64 {
        signed_difference(self.counters.current(), self.baseline)
    }

    /// Number of allocation calls (including reallocations) since the meter
    /// started or was last reset.
    pub fn allocations(&self) -> u64 {
        self.counters
            .allocations()
            .saturating_sub(self.start_allocations)
    }

    /// A snapshot of the heap figures and the process's resident memory.
    ///
    /// The heap part is `None` when the counting allocator is not installed, the
    /// process part is `None` where `/proc/self/status` cannot be read.
    pub fn report(&self) -> MemoryReport {
        let heap = self.counters.is_used().then(|| {
            let peak = self.peak_bytes();
            HeapReport {
                baseline_bytes: to_u64(self.baseline),
                peak_bytes: to_u64(peak),
                peak_above_baseline_bytes: to_u64(peak.saturating_sub(self.baseline)),
                current_bytes: to_u64(self.counters.current()),
                current_above_baseline_bytes: self.current_above_baseline(),
                allocations: self.allocations(),
            }
        });
        // Read after the heap figures: reading /proc does not allocate, but keep
        // the heap snapshot free of it regardless.
        MemoryReport {
            heap,
            process: ProcessMemory::read().ok(),
        }
    }
}

impl Drop for MemoryMeter {
    fn drop(&mut self) {
        self.counters.raise_peak(self.outer_peak);
    }
}

/// A snapshot of a [`MemoryMeter`]'s figures, for benchmarks to print (as JSON
/// with serde, or as text with `Display`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MemoryReport {
    /// Exact heap figures from the counting allocator; `None` when it is not installed.
    pub heap: Option<HeapReport>,
    /// Resident memory of the process; `None` where `/proc/self/status` is unavailable.
    pub process: Option<ProcessMemory>,
}

/// Exact heap figures of a [`MemoryMeter`] scope, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct HeapReport {
    /// Bytes allocated when the meter started.
    pub baseline_bytes: u64,
    /// Highest bytes allocated during the scope.
    pub peak_bytes: u64,
    /// `peak_bytes - baseline_bytes`: the scope's extra memory at its worst.
    pub peak_above_baseline_bytes: u64,
    /// Bytes allocated at the snapshot.
    pub current_bytes: u64,
    /// `current_bytes - baseline_bytes`, negative if the scope freed memory.
    pub current_above_baseline_bytes: i64,
    /// Allocation calls (including reallocations) during the scope.
    pub allocations: u64,
}

impl fmt::Display for MemoryReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.heap {
            Some(h) => {
                let sign = if h.current_above_baseline_bytes < 0 {
                    "-"
                } else {
                    "+"
                };
                write!(
                    f,
                    "heap peak {} above baseline {} (now {sign}{}, {} allocations)",
                    format_bytes(h.peak_above_baseline_bytes),
                    format_bytes(h.baseline_bytes),
                    format_bytes(h.current_above_baseline_bytes.unsigned_abs()),
                    h.allocations,
                )?;
            }
            None => f.write_str("heap not measured (counting allocator not installed)")?,
        }
        match &self.process {
            Some(p) => write!(
                f,
                "; RSS {}, peak RSS {}",
                format_bytes(p.rss_bytes),
                format_bytes(p.peak_rss_bytes)
            ),
            None => f.write_str("; RSS unavailable"),
        }
    }
}

fn to_u64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

fn signed_difference(a: usize, b: usize) -> i64 {
    if a >= b {
        i64::try_from(a - b).unwrap_or(i64::MAX)
    } else {
        i64::try_from(b - a).map_or(i64::MIN, |d| -d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Private counters, driven by hand: exact figures, no other thread involved.
    fn counters() -> &'static Counters {
        Box::leak(Box::new(Counters::new()))
    }

    #[test]
    fn meter_measures_its_scope() {
        let c = counters();
        c.record_alloc(5000);
        c.record_dealloc(4900); // prior peak 5000, 100 live
        let m = MemoryMeter::start_on(c);
        assert_eq!((m.baseline_bytes(), m.peak_bytes()), (100, 100));
        c.record_alloc(1000);
        c.record_dealloc(1000);
        c.record_alloc(300);
        assert_eq!(m.peak_bytes(), 1100);
        assert_eq!(m.peak_above_baseline(), 1000);
        assert_eq!(m.current_above_baseline(), 300);
        assert_eq!(m.allocations(), 2);
        drop(m);
        assert_eq!(c.peak(), 5000, "prior peak restored");
    }

    #[test]
    fn current_below_baseline_is_negative() {
        let c = counters();
        c.record_alloc(1000);
        let m = MemoryMeter::start_on(c);
        c.record_dealloc(1000);
        assert_eq!(m.current_above_baseline(), -1000);
        assert_eq!(m.peak_above_baseline(), 0);
    }

    #[test]
    fn nested_meters_report_own_scope_and_outer_keeps_both() {
        let c = counters();
        c.record_alloc(9000);
        c.record_dealloc(9000);
        let outer = MemoryMeter::start_on(c);
        c.record_alloc(800);
        c.record_dealloc(800);
        {
            let inner = MemoryMeter::start_on(c);
            c.record_alloc(300);
            assert_eq!(inner.peak_above_baseline(), 300);
            c.record_dealloc(300);
        }
        assert_eq!(
            outer.peak_above_baseline(),
            800,
            "outer's earlier peak kept"
        );
        {
            let inner = MemoryMeter::start_on(c);
            c.record_alloc(2000);
            c.record_dealloc(2000);
            assert_eq!(inner.peak_above_baseline(), 2000);
        }
        assert_eq!(
            outer.peak_above_baseline(),
            2000,
            "inner peak visible to outer"
        );
        assert_eq!(outer.allocations(), 3);
        drop(outer);
        assert_eq!(c.peak(), 9000);
    }

    #[test]
    fn reset_starts_over_but_keeps_peaks_for_enclosing_scopes() {
        let c = counters();
        let outer = MemoryMeter::start_on(c);
        let mut m = MemoryMeter::start_on(c);
        c.record_alloc(1000);
        c.record_dealloc(600);
        m.reset();
        assert_eq!((m.baseline_bytes(), m.peak_above_baseline()), (400, 0));
        c.record_alloc(10);
        assert_eq!(m.peak_above_baseline(), 10);
        assert_eq!(m.allocations(), 1);
        drop(m);
        assert_eq!(outer.peak_bytes(), 1000);
    }

    #[test]
    fn report_without_allocator_says_not_measured() {
        let m = MemoryMeter::start_on(counters());
        let r = m.report();
        assert_eq!(r.heap, None);
        assert!(r.to_string().starts_with("heap not measured"), "{r}");
    }

    #[test]
    fn report_figures_and_json() {
        let c = counters();
        c.record_alloc(1 << 20);
        let m = MemoryMeter::start_on(c);
        c.record_alloc(3 << 20);
        c.record_dealloc(3 << 20);
        c.record_dealloc(1 << 20);
        let r = m.report();
        assert_eq!(
            r.heap,
            Some(HeapReport {
                baseline_bytes: 1 << 20,
                peak_bytes: 4 << 20,
                peak_above_baseline_bytes: 3 << 20,
                current_bytes: 0,
                current_above_baseline_bytes: -(1 << 20),
                allocations: 1,
            })
        );
        let text = r.to_string();
        assert!(
            text.starts_with(
                "heap peak 3.00 MiB above baseline 1.00 MiB (now -1.00 MiB, 1 allocations)"
            ),
            "{text}"
        );
        let json = serde_json::to_value(r).expect("a report serializes");
        assert_eq!(json["heap"]["peak_above_baseline_bytes"], 3 << 20);
        assert_eq!(json["heap"]["current_above_baseline_bytes"], -(1 << 20));
        if cfg!(target_os = "linux") {
            assert!(json["process"]["rss_bytes"].as_u64() > Some(0), "{json}");
        }
    }

    #[test]
    fn signed_difference_extremes() {
        assert_eq!(signed_difference(5, 3), 2);
        assert_eq!(signed_difference(3, 5), -2);
        assert_eq!(signed_difference(usize::MAX, 0), i64::MAX);
        assert_eq!(signed_difference(0, usize::MAX), i64::MIN);
    }
}
