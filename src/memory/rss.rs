//! Resident memory of the whole process, as the kernel reports it.

use std::io::Read;

use serde::Serialize;

use crate::{Error, Result};

/// Where Linux reports a process's memory.
const STATUS_PATH: &str = "/proc/self/status";

/// Resident set size of the process now and at its highest, from
/// `/proc/self/status` (`VmRSS`, `VmHWM`).
///
/// Unlike the counting allocator's figures these include code, stacks, memory
/// the allocator keeps cached and pages touched by other libraries, and they
/// vary between runs; they are reported beside the exact heap figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ProcessMemory {
    /// Resident set size now (`VmRSS`), in bytes.
    pub rss_bytes: u64,
    /// Highest resident set size of the process so far (`VmHWM`), in bytes.
    pub peak_rss_bytes: u64,
}

impl ProcessMemory {
    /// Reads the figures of the current process.
    ///
    /// Fails with [`Error::Io`] where `/proc/self/status` cannot be read (not
    /// Linux, or /proc not mounted) and with [`Error::Format`] when it lacks the
    /// `VmRSS`/`VmHWM` lines or they are malformed. Does not allocate when it
    /// succeeds, so it leaves heap figures undisturbed.
    pub fn read() -> Result<Self> {
        // The file is about 1.5 KiB; the fields needed come in its first half.
        // A stack buffer keeps this free of heap allocations.
        let mut buf = [0u8; 8192];
        let mut file = std::fs::File::open(STATUS_PATH).map_err(|e| Error::io(STATUS_PATH, e))?;
        let mut len = 0;
        while len < buf.len() {
            match file.read(&mut buf[len..]) {
                Ok(0) => break,
                Ok(n) => len += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io(STATUS_PATH, e)),
            }
        }
        let mut text = &buf[..len];
        if len == buf.len() {
            // Truncated: drop the last, possibly partial, line.
            let end = text.iter().rposition(|&b| b == b'\n').unwrap_or(0);
            text = &text[..end];
        }
        parse_status(&String::from_utf8_lossy(text))
    }
}

/// Parses the text of a `/proc/<pid>/status` file.
pub(crate) fn parse_status(text: &str) -> Result<ProcessMemory> {
    let mut rss = None;
    let mut hwm = None;
    for line in text.lines() {
        if let Some(value) = line.strip_prefix("VmRSS:") {
            rss = Some(parse_kib("VmRSS", value)?);
        } else if let Some(value) = line.strip_prefix("VmHWM:") {
            hwm = Some(parse_kib("VmHWM", value)?);
        }
    }
    match (rss, hwm) {
        (Some(rss_bytes), Some(peak_rss_bytes)) => Ok(ProcessMemory {
            rss_bytes,
            peak_rss_bytes,
        }),
        (None, _) => Err(missing("VmRSS")),
        (_, None) => Err(missing("VmHWM")),
    }
}

fn missing(key: &str) -> Error {
    Error::Format {
        path: STATUS_PATH.into(),
        message: format!("no `{key}:` line; process memory figures need Linux's /proc"),
    }
}

/// Parses a value such as `"\t  12345 kB"` (the kernel's "kB" means KiB).
fn parse_kib(key: &str, value: &str) -> Result<u64> {
    let bad = || Error::Format {
        path: STATUS_PATH.into(),
        message: format!("`{key}:{value}`: expected a number of kB, e.g. `{key}:  1234 kB`"),
    };
    let number = value.trim().strip_suffix("kB").ok_or_else(bad)?.trim_end();
    number
        .parse::<u64>()
        .ok()
        .and_then(|kib| kib.checked_mul(1024))
        .ok_or_else(bad)
}

/// The machine's physical memory (`MemTotal` of `/proc/meminfo`), where known.
pub fn physical_memory_bytes() -> Option<u64> {
    meminfo_bytes("MemTotal:")
}

/// The memory new work can use without swapping (`MemAvailable` of
/// `/proc/meminfo`), where known.
pub(crate) fn available_memory_bytes() -> Option<u64> {
    meminfo_bytes("MemAvailable:")
}

/// The `/proc/meminfo` line starting with `key`, in bytes.
fn meminfo_bytes(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    let kib: u64 = line
        .trim_start_matches(key)
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    kib.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "Name:\tmelora\nUmask:\t0022\nState:\tR (running)\n\
        VmPeak:\t  123456 kB\nVmSize:\t  120000 kB\nVmLck:\t       0 kB\n\
        VmHWM:\t    8192 kB\nVmRSS:\t    4096 kB\nRssAnon:\t    1000 kB\nThreads:\t1\n";

    #[test]
    fn parses_sample_status() {
        let m = parse_status(SAMPLE).expect("sample parses");
        assert_eq!(
            m,
            ProcessMemory {
                rss_bytes: 4096 * 1024,
                peak_rss_bytes: 8192 * 1024,
            }
        );
    }

    #[test]
    fn missing_line_is_a_format_error() {
        let text = SAMPLE.replace("VmHWM", "VmXXX");
        match parse_status(&text) {
            Err(Error::Format { message, .. }) => assert!(message.contains("VmHWM"), "{message}"),
            other => panic!("expected a format error, got {other:?}"),
        }
    }

    #[test]
    fn malformed_values_are_format_errors() {
        for bad in [
            "abc kB",
            "4096",
            "4096 MB",
            "-1 kB",
            "99999999999999999999 kB",
        ] {
            let text = SAMPLE.replace("   4096 kB", bad);
            match parse_status(&text) {
                Err(Error::Format { message, .. }) => {
                    assert!(
                        message.contains("VmRSS") && message.contains(bad),
                        "{message}"
                    )
                }
                other => panic!("`{bad}`: expected a format error, got {other:?}"),
            }
        }
    }

    #[test]
    fn reads_own_process_on_linux() {
        if !cfg!(target_os = "linux") {
            return;
        }
        let m = ProcessMemory::read().expect("/proc/self/status is readable on Linux");
        assert!(m.rss_bytes > 0);
        assert!(m.peak_rss_bytes >= m.rss_bytes);
    }
}
