//! A global allocator that counts the bytes it hands out.
//!
//! [`CountingAllocator`] forwards every request to [`System`] and keeps three
//! process-wide counters: bytes allocated now, the peak of that figure, and the
//! number of allocation calls. The counters are lock-free atomics updated with
//! `Relaxed` ordering: each is a single atomic whose own modification order is
//! total, and no other memory is published through them, so no stronger ordering
//! is needed. The allocator itself never allocates and never locks.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};

/// A global allocator that wraps [`System`] and counts live bytes, their peak and
/// the number of allocations, for exact and repeatable memory figures.
///
/// It only measures once a binary (or test crate) installs it:
///
/// ```
/// #[global_allocator]
/// static ALLOC: melora::memory::CountingAllocator = melora::memory::CountingAllocator;
///
/// fn main() {
///     let buffer = vec![0u8; 1 << 20];
///     assert!(melora::memory::is_installed());
///     assert!(melora::memory::current_bytes() >= buffer.len());
/// }
/// ```
///
/// Without that line the counters stay at zero and [`is_installed`] returns
/// `false`. Sizes counted are the sizes requested in each [`Layout`], not the
/// (slightly larger) blocks the system allocator may reserve.
#[derive(Debug, Clone, Copy, Default)]
pub struct CountingAllocator;

/// Allocation counters; the allocator updates the single static [`COUNTERS`].
///
/// A separate type so that the scope logic of `MemoryMeter` can be unit-tested on
/// private counters with exact figures, free of other test threads.
#[derive(Debug)]
pub(crate) struct Counters {
    current: AtomicUsize,
    peak: AtomicUsize,
    allocations: AtomicU64,
    /// Bytes above which `over_limit` is raised (`usize::MAX`: no limit).
    limit: AtomicUsize,
    /// Whether `current` went above `limit` since it was last cleared.
    over_limit: AtomicBool,
}

/// The counters fed by [`CountingAllocator`].
pub(crate) static COUNTERS: Counters = Counters::new();

impl Counters {
    pub(crate) const fn new() -> Self {
        Self {
            current: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            allocations: AtomicU64::new(0),
            limit: AtomicUsize::new(usize::MAX),
            over_limit: AtomicBool::new(false),
        }
    }

    /// A block of `size` bytes was handed out.
    #[inline]
    pub(crate) fn record_alloc(&self, size: usize) {
        self.allocations.fetch_add(1, Relaxed);
        let now = self.current.fetch_add(size, Relaxed).wrapping_add(size);
        self.peak.fetch_max(now, Relaxed);
        self.check_limit(now);
    }

    /// Raises the over-limit flag when `now` bytes exceed the limit.
    #[inline]
    fn check_limit(&self, now: usize) {
        if now > self.limit.load(Relaxed) {
            self.over_limit.store(true, Relaxed);
        }
    }

    /// Sets the limit (`usize::MAX`: none) and clears the over-limit flag.
    pub(crate) fn set_limit(&self, limit: usize) {
        self.limit.store(limit, Relaxed);
        self.over_limit.store(false, Relaxed);
    }

    /// The limit (`usize::MAX`: none).
    pub(crate) fn limit(&self) -> usize {
        self.limit.load(Relaxed)
    }

    /// Whether the live bytes went above the limit since it was set or cleared.
    pub(crate) fn over_limit(&self) -> bool {
        self.over_limit.load(Relaxed)
    }

    /// Clears the over-limit flag (and raises it again at once if the live bytes are
    /// still above the limit).
    pub(crate) fn clear_over_limit(&self) {
        self.over_limit.store(false, Relaxed);
        self.check_limit(self.current());
    }

    /// A block of `size` bytes was returned.
    #[inline]
    pub(crate) fn record_dealloc(&self, size: usize) {
        // A block is always counted in before it is counted out (the pointer has
        // to reach the freeing thread somehow, which orders the two updates), so
        // this never goes below zero.
        self.current.fetch_sub(size, Relaxed);
    }

    /// A block grew or shrank from `old_size` to `new_size` bytes.
    #[inline]
    pub(crate) fn record_realloc(&self, old_size: usize, new_size: usize) {
        self.allocations.fetch_add(1, Relaxed);
        if new_size >= old_size {
            let grow = new_size - old_size;
            let now = self.current.fetch_add(grow, Relaxed).wrapping_add(grow);
            self.peak.fetch_max(now, Relaxed);
            self.check_limit(now);
        } else {
            self.current.fetch_sub(old_size - new_size, Relaxed);
        }
    }

    pub(crate) fn current(&self) -> usize {
        self.current.load(Relaxed)
    }

    pub(crate) fn peak(&self) -> usize {
        self.peak.load(Relaxed)
    }

    pub(crate) fn allocations(&self) -> u64 {
        self.allocations.load(Relaxed)
    }

    /// Sets the peak to `value` and returns the peak it replaces.
    pub(crate) fn replace_peak(&self, value: usize) -> usize {
        self.peak.swap(value, Relaxed)
    }

    /// Raises the peak to at least `value`.
    pub(crate) fn raise_peak(&self, value: usize) {
        self.peak.fetch_max(value, Relaxed);
    }

    /// True once at least one allocation has been counted.
    pub(crate) fn is_used(&self) -> bool {
        self.allocations() > 0
    }
}

// SAFETY: every method forwards to `System` with the caller's arguments
// unchanged, so `System`'s guarantees carry over; the bookkeeping only touches
// atomics and never allocates.
unsafe impl GlobalAlloc for CountingAllocator {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract for `layout`.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            COUNTERS.record_alloc(layout.size());
        }
        ptr
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            COUNTERS.record_alloc(layout.size());
        }
        ptr
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by this allocator, i.e. by `System`, with `layout`.
        unsafe { System.dealloc(ptr, layout) };
        COUNTERS.record_dealloc(layout.size());
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` was allocated by `System` with `layout`; the caller upholds
        // the rest of `GlobalAlloc::realloc`'s contract.
        let new_ptr = unsafe { System.realloc(ptr, layout, new_size) };
        // On failure the old block is untouched and still counted.
        if !new_ptr.is_null() {
            COUNTERS.record_realloc(layout.size(), new_size);
        }
        new_ptr
    }
}

/// Bytes currently allocated through [`CountingAllocator`], by all threads.
///
/// Zero when the allocator is not installed (see [`is_installed`]).
pub fn current_bytes() -> usize {
    COUNTERS.current()
}

/// The highest value [`current_bytes`] has reached since the process started or
/// since the innermost live `MemoryMeter` started.
///
/// Zero when the allocator is not installed (see [`is_installed`]).
pub fn peak_bytes() -> usize {
    COUNTERS.peak()
}

/// Number of successful allocation calls (`alloc`, `alloc_zeroed` and `realloc`)
/// served by [`CountingAllocator`] since the process started, by all threads.
pub fn allocation_count() -> u64 {
    COUNTERS.allocations()
}

/// Whether [`CountingAllocator`] is the global allocator, i.e. has served at
/// least one allocation.
///
/// When `false`, every figure of this module is zero and means "not measured";
/// reports should say so rather than print zeros.
pub fn is_installed() -> bool {
    COUNTERS.is_used()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_flag_rises_above_the_limit_and_clears() {
        let c = Counters::new();
        c.set_limit(100);
        c.record_alloc(80);
        assert!(!c.over_limit());
        c.record_alloc(30);
        assert!(c.over_limit(), "110 > 100");
        c.record_dealloc(30);
        assert!(c.over_limit(), "the flag stays until cleared");
        c.clear_over_limit();
        assert!(!c.over_limit());
        c.record_realloc(80, 120);
        assert!(c.over_limit(), "a growing realloc counts");
        c.record_dealloc(120);
        c.clear_over_limit();
        c.set_limit(usize::MAX);
        c.record_alloc(1 << 40);
        assert!(!c.over_limit());
    }

    #[test]
    fn counters_track_alloc_dealloc_and_peak() {
        let c = Counters::new();
        assert!(!c.is_used());
        c.record_alloc(100);
        c.record_alloc(50);
        assert_eq!((c.current(), c.peak(), c.allocations()), (150, 150, 2));
        c.record_dealloc(100);
        assert_eq!((c.current(), c.peak()), (50, 150));
        c.record_alloc(20);
        assert_eq!((c.current(), c.peak(), c.allocations()), (70, 150, 3));
        assert!(c.is_used());
    }

    #[test]
    fn counters_realloc_adjusts_by_difference() {
        let c = Counters::new();
        c.record_alloc(10);
        c.record_realloc(10, 1000);
        assert_eq!((c.current(), c.peak(), c.allocations()), (1000, 1000, 2));
        c.record_realloc(1000, 400);
        assert_eq!((c.current(), c.peak(), c.allocations()), (400, 1000, 3));
        c.record_dealloc(400);
        assert_eq!(c.current(), 0);
    }

    #[test]
    fn replace_and_raise_peak() {
        let c = Counters::new();
        c.record_alloc(500);
        c.record_dealloc(300);
        assert_eq!(c.replace_peak(c.current()), 500);
        assert_eq!(c.peak(), 200);
        c.raise_peak(100);
        assert_eq!(c.peak(), 200);
        c.raise_peak(700);
        assert_eq!(c.peak(), 700);
    }

    /// The library's unit tests run under the counting allocator (see lib.rs).
    #[test]
    fn installed_in_unit_tests() {
        assert!(is_installed());
        let before = allocation_count();
        let v = std::hint::black_box(vec![7u8; 4096]);
        assert!(allocation_count() > before);
        // Other test threads cannot free `v`, so this holds under concurrency.
        assert!(current_bytes() >= v.len());
        drop(v);
    }
}
