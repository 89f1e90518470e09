//! The `melora` program. Everything but process set-up lives in `melora::cli`.

use std::io::Write;
use std::process::ExitCode;

/// Every allocation of the process is counted, so memory figures are exact.
#[global_allocator]
static ALLOC: melora::memory::CountingAllocator = melora::memory::CountingAllocator;

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
