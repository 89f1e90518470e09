//! Keeping freed tensor buffers in the process for the next tensor of their size.
//!
//! Every candle op returns a fresh buffer, and a meta-iteration allocates and frees
//! thousands of them, most between a few hundred KiB and a few MiB. glibc's malloc
//! serves such a size with `mmap` once its (dynamic) threshold is below it and gives
//! freed memory at the top of the heap back to the kernel beyond a trim threshold;
//! either way the next buffer of that size comes back as fresh pages, and the kernel
//! faults them in and clears them one page at a time. Measured on the default
//! benchmark workload (all-MiniLM-L6-v2, FOMAML K = 1), page faults and clearing were
//! about a tenth of the run, and keeping the memory cut a meta-iteration from 2.4 to
//! 1.9 s. So [`keep_freed_buffers`] fixes the mmap threshold at glibc's maximum
//! (32 MiB: larger buffers are still mapped and unmapped) and sets the trim
//! threshold to 2 GiB.
//!
//! The process's resident memory then stays near its peak instead of shrinking after
//! it; the peak itself, and the heap figures melora reports (counted by its own
//! allocator, in bytes requested), do not change. A user who tunes malloc through
//! the environment (`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`,
//! `GLIBC_TUNABLES`) keeps their settings, and `MELORA_RETURN_FREED_MEMORY=1` leaves
//! malloc at its defaults.

/// The environment variable that leaves malloc's defaults alone.
pub const RETURN_FREED_MEMORY_ENV: &str = "MELORA_RETURN_FREED_MEMORY";

/// Variables through which a user tunes glibc's malloc; any of them set means theirs.
const USER_TUNING: &[&str] = &[
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "GLIBC_TUNABLES",
];

/// Whether this process keeps freed buffers (it does on glibc, unless the user
/// tunes malloc or sets [`RETURN_FREED_MEMORY_ENV`] to `1`).
pub(crate) fn keeps_freed_buffers() -> bool {
    cfg!(all(target_os = "linux", target_env = "gnu"))
        && std::env::var(RETURN_FREED_MEMORY_ENV).map_or(true, |v| v != "1")
        && USER_TUNING
            .iter()
            .all(|name| std::env::var_os(name).is_none())
}

/// Sets glibc's mmap and trim thresholds as the module explains (a no-op elsewhere
/// and when [`keeps_freed_buffers`] is false). Returns whether both were set.
pub(crate) fn keep_freed_buffers() -> bool {
    if !keeps_freed_buffers() {
        return false;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        /// glibc's largest mmap threshold on 64-bit targets (`HEAP_MAX_SIZE / 2`).
        const MMAP_THRESHOLD: libc::c_int = 32 << 20;
        const TRIM_THRESHOLD: libc::c_int = libc::c_int::MAX;
        // SAFETY: mallopt only changes two of malloc's tuning parameters; it is
        // thread-safe and valid at any time.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    false
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::*;

    /// Minor page faults of the calling thread so far.
    fn minor_faults() -> i64 {
        // SAFETY: getrusage writes into the zeroed struct it is given.
        unsafe {
            let mut usage: libc::rusage = std::mem::zeroed();
            assert_eq!(libc::getrusage(libc::RUSAGE_THREAD, &mut usage), 0);
            usage.ru_minflt
        }
    }

    /// Faults of allocating and filling a buffer of `bytes`, then freeing it.
    fn faults_of_a_buffer(bytes: usize) -> i64 {
        let before = minor_faults();
        let buffer = std::hint::black_box(vec![1u8; bytes]);
        drop(buffer);
        minor_faults() - before
    }

    /// With the thresholds set, a freed 16 MiB buffer's pages serve the next one: its
    /// second allocation faults in (almost) no page, where fresh memory faults in one
    /// per 4 KiB page (the counter is checked on fresh pages of a private mapping).
    #[test]
    fn a_freed_buffer_is_reused_without_page_faults() {
        if !keeps_freed_buffers() {
            eprintln!("skipped: malloc tuned by the environment");
            return;
        }
        assert!(keep_freed_buffers());
        let bytes = 16 << 20;
        let pages = (bytes / 4096) as i64;
        // SAFETY: a private anonymous mapping of `bytes`, written, then unmapped.
        let fresh = unsafe {
            let before = minor_faults();
            let map = libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            assert_ne!(map, libc::MAP_FAILED);
            std::ptr::write_bytes(map.cast::<u8>(), 1, bytes);
            let faults = minor_faults() - before;
            libc::munmap(map, bytes);
            faults
        };
        assert!(fresh >= pages / 2, "fresh pages faulted {fresh} times");
        faults_of_a_buffer(bytes);
        let second = faults_of_a_buffer(bytes);
        assert!(
            second < pages / 20,
            "the reused buffer faulted {second} pages"
        );
    }
}
