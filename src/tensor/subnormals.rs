//! Flushing subnormal floats to zero on the threads that compute.
//!
//! A float below the smallest normal (about 1.2e-38 in f32) takes a microcode assist
//! on x86 processors, tens to a hundred times slower than a normal operation. Real
//! models produce them: the softmax of a masked or far-below-maximum attention
//! score underflows through the subnormal range, and so do its gradients and the
//! products that take them in. Setting the MXCSR's flush-to-zero (FTZ) and
//! denormals-are-zero (DAZ) bits makes every SSE/AVX operation of the thread treat
//! them as zero, which changes results only below 1.2e-38 (f32) or 2.2e-308 (f64).
//! The bits are per thread, so they are set on the caller and on every thread of
//! rayon's global pool, which runs candle's parallel kernels.
//!
//! `MELORA_KEEP_SUBNORMALS=1` leaves the floating-point mode alone (for measuring what
//! flushing changes).

/// The environment variable that turns flushing off.
pub const KEEP_SUBNORMALS_ENV: &str = "MELORA_KEEP_SUBNORMALS";

/// Whether flushing is on for this process (it is, unless [`KEEP_SUBNORMALS_ENV`]
/// is `1`).
pub fn flushing() -> bool {
    std::env::var(KEEP_SUBNORMALS_ENV).map_or(true, |v| v != "1")
}

/// Sets flush-to-zero and denormals-are-zero on the calling thread (x86-64; a no-op
/// elsewhere, and when [`flushing`] is off).
pub(crate) fn flush_on_this_thread() {
    if !flushing() {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    {
        // FTZ is bit 15 of the MXCSR, DAZ bit 6.
        const FTZ_DAZ: u32 = (1 << 15) | (1 << 6);
        #[allow(deprecated)]
        // SAFETY: the MXCSR is per-thread state; these two bits only change how this
        // thread rounds results and reads operands below the normal range.
        unsafe {
            use std::arch::x86_64::{_mm_getcsr, _mm_setcsr};
            _mm_setcsr(_mm_getcsr() | FTZ_DAZ);
        }
    }
}

/// [`flush_on_this_thread`] on the calling thread and every thread of rayon's global
/// pool.
pub(crate) fn flush_on_compute_threads() {
    flush_on_this_thread();
    rayon::broadcast(|_| flush_on_this_thread());
}

/// Whether the calling thread flushes subnormals (x86-64; `false` elsewhere).
pub fn thread_flushes() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        #[allow(deprecated)]
        // SAFETY: reading the MXCSR has no effect.
        let csr = unsafe { std::arch::x86_64::_mm_getcsr() };
        csr & (1 << 15) != 0 && csr & (1 << 6) != 0
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flushed_threads_read_and_make_subnormals_as_zero() {
        if !flushing() || !cfg!(target_arch = "x86_64") {
            return;
        }
        std::thread::spawn(|| {
            let tiny = std::hint::black_box(f32::MIN_POSITIVE);
            assert!(std::hint::black_box(tiny / 4.0) > 0.0, "subnormal before");
            flush_on_this_thread();
            assert!(thread_flushes());
            assert_eq!(std::hint::black_box(tiny) / 4.0, 0.0, "flushed result");
            let subnormal = std::hint::black_box(f32::from_bits(1));
            assert_eq!(subnormal * 1.0e30, 0.0, "subnormal operand read as zero");
        })
        .join()
        .unwrap();
    }

    #[test]
    fn init_flushes_on_the_caller_and_every_kernel_thread() {
        if !flushing() || !cfg!(target_arch = "x86_64") {
            return;
        }
        crate::init();
        // `init` ran on whichever test thread came first; this one is set here.
        flush_on_this_thread();
        assert!(thread_flushes());
        assert!(rayon::broadcast(|_| thread_flushes())
            .into_iter()
            .all(|f| f));
    }
}
