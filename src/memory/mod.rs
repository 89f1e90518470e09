//! Exact memory measurement.

mod bytes;
mod rss;

pub use bytes::{format_bytes, parse_bytes};
pub use rss::ProcessMemory;
