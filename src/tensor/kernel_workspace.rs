//! The matrix kernels' per-thread scratch buffers.
//!
//! candle's CPU matrix product (the `gemm` crate) packs operand panels into a
//! thread-local buffer the size of the L2 cache. A thread allocates it the first time
//! it runs a kernel on that path and keeps it until it exits. Which threads take that
//! path depends on the shapes and on rayon's work stealing, so a measured peak could
//! hold any number of these buffers, in L2-sized steps that differ between machines
//! and runs. Reserving them on every kernel thread before a measurement puts them in
//! the baseline, where the planner assumes they are.

/// Allocates the kernel scratch buffer of the calling thread (a no-op once it has one).
pub(crate) fn reserve_on_this_thread() {
    gemm_common::gemm::L2_SLAB.with(|_| ());
}

/// Allocates the kernel scratch buffers of the calling thread and of every thread of
/// rayon's global pool, which runs candle's parallel kernels.
pub(crate) fn reserve_on_kernel_threads() {
    reserve_on_this_thread();
    rayon::broadcast(|_| reserve_on_this_thread());
}
