//! `melora check`: verifies on this machine that every op's first and second
//! derivatives are exact and that memory is measured.

use std::fmt::Write as _;
use std::process::ExitCode;

use super::args::{CheckArgs, GlobalArgs};
use super::{write_stdout, UserError};
use crate::memory::{self, MemoryMeter, ProcessMemory};
use crate::selfcheck::derivative_checks_on;
use crate::tensor::ensure_second_order;

pub(crate) fn run(global: &GlobalArgs, args: &CheckArgs) -> anyhow::Result<ExitCode> {
    ensure_second_order()?;
    let setting = global.device.unwrap_or_default();
    let device = crate::run::build::open_device(setting).map_err(UserError::Config)?;
    let meter = MemoryMeter::start();
    let started = std::time::Instant::now();
    let rows = derivative_checks_on(&device)?;
    let elapsed = started.elapsed();
    let report = meter.report();
    let failed = rows.iter().filter(|r| !r.passed).count();

    if args.json {
        let json = serde_json::json!({
            "second_order_enabled": true,
            "device": setting.to_string(),
            "ops": rows,
            "passed": rows.len() - failed,
            "failed": failed,
            "seconds": elapsed.as_secs_f64(),
            "memory": report,
        });
        write_stdout(&format!("{}\n", serde_json::to_string_pretty(&json)?))?;
    } else {
        let mut out = String::new();
        writeln!(
            out,
            "Derivatives of every op against central finite differences (f64, on {setting});\n\
             relative error allowed: 1e-6 first order, 1e-4 Hessian-vector product.\n"
        )?;
        writeln!(
            out,
            "{:<38} {:>12} {:>13}  result",
            "op", "first order", "second order"
        )?;
        for r in &rows {
            let verdict = if r.passed { "ok" } else { "FAILED" };
            writeln!(
                out,
                "{:<38} {:>12.1e} {:>13.1e}  {verdict}",
                r.name, r.first_order, r.second_order
            )?;
        }
        writeln!(out, "\nsecond-order gradients: enabled")?;
        if memory::is_installed() {
            writeln!(
                out,
                "memory: counting allocator installed; peak {} above the baseline during the check",
                memory::format_bytes(meter.peak_above_baseline() as u64)
            )?;
        } else {
            writeln!(
                out,
                "memory: not measured (counting allocator not installed)"
            )?;
        }
        if let Ok(process) = ProcessMemory::read() {
            writeln!(
                out,
                "process: RSS {}, peak RSS {}",
                memory::format_bytes(process.rss_bytes),
                memory::format_bytes(process.peak_rss_bytes)
            )?;
        }
        writeln!(
            out,
            "{} passed, {failed} failed in {:.2} s",
            rows.len() - failed,
            elapsed.as_secs_f64()
        )?;
        write_stdout(&out)?;
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
