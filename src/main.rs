//! The `melora` program. Everything but process set-up lives in the library's
//! command line, reached through `melora::main_entry`.

use std::process::ExitCode;

/// Every allocation of the process is counted, so memory figures are exact.
#[global_allocator]
static ALLOC: melora::memory::CountingAllocator = melora::memory::CountingAllocator;

fn main() -> ExitCode {
    // First, before any thread starts: second-order gradients depend on it.
    melora::init();
    melora::main_entry()
}
