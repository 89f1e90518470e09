//! Progress display and Ctrl-C handling shared by `train`, `evaluate` and `full`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use indicatif::{ProgressBar, ProgressStyle};

use crate::memory::{self, format_bytes};
use crate::train::{IterationReport, ProgressFn};

/// The process's stop flag, set by the first Ctrl-C; a second Ctrl-C exits at once.
/// Installing the handler can fail (another handler exists): then Ctrl-C keeps its
/// default behaviour and the flag is never set.
pub(crate) fn interrupt_flag() -> Arc<AtomicBool> {
    static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();
    FLAG.get_or_init(|| {
        let flag = Arc::new(AtomicBool::new(false));
        let handler_flag = flag.clone();
        let _ = ctrlc::set_handler(move || {
            if handler_flag.swap(true, Ordering::SeqCst) {
                eprintln!("\nsecond Ctrl-C: exiting without saving");
                std::process::exit(130);
            }
            eprintln!(
                "\nCtrl-C: stopping after this iteration and saving a checkpoint \
                 (Ctrl-C again to exit at once)"
            );
        });
        flag
    })
    .clone()
}

/// A progress bar on standard error (hidden when it is not a terminal).
pub(crate) fn bar(total: u64, prefix: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    let style = ProgressStyle::with_template(
        "{prefix} {bar:25.cyan/blue} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    bar.set_style(style);
    bar.set_prefix(prefix.to_string());
    bar
}

/// Current and peak heap, and on a GPU its memory, for the progress line.
fn memory_text(device: Option<&memory::DeviceMemoryReading>) -> String {
    let mut text = if memory::is_installed() {
        format!(
            "mem {} (peak {})",
            format_bytes(memory::current_bytes() as u64),
            format_bytes(memory::peak_bytes() as u64)
        )
    } else {
        String::new()
    };
    if let Some(d) = device {
        let approximate = if d.exact { "" } else { ", whole device" };
        text.push_str(&format!(
            "{}gpu {} (peak {}{approximate})",
            if text.is_empty() { "" } else { ", " },
            format_bytes(d.used_bytes),
            format_bytes(d.peak_bytes)
        ));
    }
    text
}

/// The training callback: updates `bar` with loss, accuracy, speed and memory, and
/// prints a line at each validation (also when the bar is hidden, e.g. in a log).
pub(crate) fn training_callback(bar: ProgressBar) -> ProgressFn {
    Arc::new(move |r: &IterationReport<'_>| {
        bar.set_position(r.iteration as u64);
        let score = if r.stats.regression {
            format!("mse {:.4}", r.stats.query_loss)
        } else {
            format!(
                "loss {:.3} acc {:.3}",
                r.stats.query_loss, r.stats.query_accuracy
            )
        };
        bar.set_message(format!(
            "{score} | {:.2} it/s | {}",
            1.0 / r.seconds.max(1e-9),
            memory_text(r.device_memory.as_ref())
        ));
        if let Some(size) = r.reduced_micro_batch {
            let line = format!(
                "iteration {}: above the memory budget; redone with micro-batches of {size} \
                 (same gradient, accumulated)",
                r.iteration
            );
            bar.suspend(|| eprintln!("{line}"));
        }
        if let Some(v) = r.validation {
            let name = if r.stats.regression {
                "val −mse"
            } else {
                "val acc"
            };
            let line = format!(
                "iteration {}/{}: {name} {v:.4} (best {:.4}), {}",
                r.iteration,
                r.total,
                r.best.unwrap_or(v),
                memory_text(r.device_memory.as_ref())
            );
            bar.suspend(|| eprintln!("{line}"));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GPU reading joins the heap figures, marked when it is the whole device's.
    #[test]
    fn the_progress_line_shows_gpu_memory_on_a_gpu_run() {
        assert!(!memory_text(None).contains("gpu"));
        let mut reading = memory::DeviceMemoryReading {
            used_bytes: 3 << 20,
            peak_bytes: 5 << 30,
            reserved_bytes: 6 << 30,
            exact: true,
        };
        let text = memory_text(Some(&reading));
        assert!(text.ends_with("gpu 3.00 MiB (peak 5.00 GiB)"), "{text}");
        reading.exact = false;
        let text = memory_text(Some(&reading));
        assert!(text.ends_with("(peak 5.00 GiB, whole device)"), "{text}");
    }
}
