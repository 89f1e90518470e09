//! The `melora` program. Everything but process set-up lives in `melora::cli`.

use std::io::Write;
use std::process::ExitCode;

// GLOBAL ALLOCATOR: the counting allocator of `melora::memory` is installed
// here, so that every allocation of the process is measured:
//
// #[global_allocator]
// static ALLOC: melora::memory::CountingAllocator = melora::memory::CountingAllocator;

fn main() -> ExitCode {
    // First, before any thread starts: second-order gradients depend on it.
    melora::init();
    match melora::cli::run() {
        Ok(code) => code,
        Err(err) => {
            // eprintln! would panic if stderr is closed.
            let _ = writeln!(std::io::stderr(), "error: {}", melora::cli::one_line(&err));
            melora::cli::exit_code(&err)
        }
    }
}
