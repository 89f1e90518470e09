//! Exact memory measurement.

mod bytes;

pub use bytes::{format_bytes, parse_bytes};
