//! Exact memory measurement.
//!
//! melora's claims are about memory, so memory is measured, not guessed. The
//! figures come from a counting global allocator, [`CountingAllocator`]: it wraps
//! the system allocator and counts the bytes allocated now, their peak and the
//! number of allocations. These figures are exact: they count, to the byte, what
//! Rust code (including candle's tensor storage) asks for, so the same
//! single-threaded computation gives the same figures on every run. The process's resident
//! set size ([`ProcessMemory`]) is reported beside them, but it is coarse (pages),
//! includes code, stacks and memory the allocator keeps cached, and varies from
//! run to run, so it cannot show a saving of a few megabytes reliably.
//!
//! - [`CountingAllocator`] must be installed by the binary (`#[global_allocator]`);
//!   without it [`is_installed`] is `false` and every heap figure is zero.
//! - [`MemoryMeter`] measures the peak of a scope; meters nest.
//! - [`MemoryReport`] is a serializable snapshot for benchmarks.
//! - [`format_bytes`] writes sizes for people.
//! - [`device_memory`] reads a CUDA device's live bytes and their peak from the
//!   memory pool candle allocates from (the heap figures see the host only);
//!   [`TensorMeter`] measures a scope where a device keeps its tensors (heap or
//!   pool), [`free_memory_bytes`] what a run could use there.
//! - [`BudgetGuard`] holds a run to a budget of heap or device memory
//!   ([`check_budget`] fails once it is exceeded).
//!
//! This layer measures and knows nothing of the layers above it: predicting and
//! fitting budgets is `crate::plan`'s.

mod allocator;
mod bytes;
mod device;
mod guard;
mod meter;
mod rss;

pub use allocator::{allocation_count, current_bytes, is_installed, peak_bytes, CountingAllocator};
pub use bytes::format_bytes;
pub use device::{
    device_memory, free_memory_bytes, reset_device_peak, DeviceMemoryReading, TensorMeter,
};
pub use guard::{check_budget, BudgetGuard};
pub use meter::{HeapReport, MemoryMeter, MemoryReport};
pub use rss::{physical_memory_bytes, ProcessMemory};
