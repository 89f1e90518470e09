//! Exact memory measurement.

mod allocator;
mod bytes;
mod rss;

pub use allocator::{allocation_count, current_bytes, is_installed, peak_bytes, CountingAllocator};
pub use bytes::{format_bytes, parse_bytes};
pub use rss::ProcessMemory;
