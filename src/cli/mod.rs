//! The `melora` command line. It only parses arguments, builds a
//! [`Config`] and calls the library; its interface is the command line, so
//! it is private to the crate (the binary reaches it through
//! [`crate::main_entry`]).

mod adapt_cmd;
mod args;
mod bench_cmd;
mod bench_fsct_cmd;
mod bench_memory_cmd;
mod bench_speed_cmd;
mod check_cmd;
mod config_cmd;
mod full_cmd;
mod plan_cmd;
mod profile_cmd;
mod progress;
mod train_cmd;

#[cfg(test)]
mod tests;

use std::io::Write;
use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::Parser;

use self::args::{Cli, Command, GlobalArgs};
use crate::config::Config;

/// Failures caused by what the user gave, as opposed to failures while
/// working: they exit with status 2.
#[derive(Debug, thiserror::Error)]
enum UserError {
    /// The command line does not parse.
    #[error("{0}")]
    Usage(String),
    /// The configuration (file or flags) cannot be read or is invalid.
    #[error(transparent)]
    Config(crate::Error),
}

/// The program after process set-up: runs it on its command-line arguments and, on
/// failure, prints the error as one `error: …` line on stderr and returns its status
/// (see [`exit_code`]).
pub(crate) fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(err) => {
            // eprintln! would panic if stderr is closed.
            let _ = writeln!(std::io::stderr(), "error: {}", one_line(&err));
            exit_code(&err)
        }
    }
}

/// Runs the program on its command-line arguments.
///
/// Help and version are printed here; an error is returned for the caller to
/// print (see [`one_line`]) and turn into a status (see [`exit_code`]).
pub(crate) fn run() -> anyhow::Result<ExitCode> {
    let cli = match Cli::try_parse_from(mode_as_subcommand(std::env::args_os().collect())) {
        Ok(cli) => cli,
        Err(err) => return parse_failure(err),
    };
    match &cli.command {
        Command::Config(args) => config_cmd::run(&cli.global, args).map(|()| ExitCode::SUCCESS),
        Command::Check(args) => check_cmd::run(&cli.global, args),
        Command::Bench(args::BenchCommand::Data(args)) => {
            bench_cmd::run_data(&cli.global, args).map(|()| ExitCode::SUCCESS)
        }
        Command::Bench(args::BenchCommand::Memory(args)) => {
            bench_memory_cmd::run(&cli.global, args)
        }
        Command::Bench(args::BenchCommand::FsctMemory(args)) => {
            bench_fsct_cmd::run(&cli.global, args)
        }
        Command::Bench(args::BenchCommand::PlanRow) => {
            bench_fsct_cmd::run_plan_row().map(|()| ExitCode::SUCCESS)
        }
        Command::Bench(args::BenchCommand::MemoryRow(args)) => {
            bench_memory_cmd::run_row(args).map(|()| ExitCode::SUCCESS)
        }
        Command::Bench(args::BenchCommand::Speed(args)) => bench_speed_cmd::run(&cli.global, args),
        Command::Bench(args::BenchCommand::SpeedRow(args)) => {
            bench_speed_cmd::run_row(args).map(|()| ExitCode::SUCCESS)
        }
        Command::Plan(args) => plan_cmd::run(&cli.global, args),
        Command::Profile(args) => profile_cmd::run(&cli.global, args).map(|()| ExitCode::SUCCESS),
        Command::Train(args) => train_cmd::run_train(&cli.global, args),
        Command::Evaluate(args) => train_cmd::run_evaluate(&cli.global, args),
        Command::Full(args) => full_cmd::run_full_cmd(&cli.global, args),
        Command::Report(args) => full_cmd::run_report(args),
        Command::Compare(args) => full_cmd::run_compare(args),
        Command::Adapt(args) => adapt_cmd::run_adapt(&cli.global, args),
        Command::Export(args) => adapt_cmd::run_export(&cli.global, args),
    }
}

/// The reference project's interface, `--mode train|evaluate|full` instead of a
/// subcommand: `melora --mode train --config f.yml` becomes `melora train --config
/// f.yml`; an unknown mode is then reported as an unknown subcommand.
fn mode_as_subcommand(mut args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    let position = args
        .iter()
        .position(|a| a == "--mode" || a.to_string_lossy().starts_with("--mode="));
    let Some(i) = position else { return args };
    let flag = args[i].to_string_lossy().to_string();
    let (mode, taken) = match flag.strip_prefix("--mode=") {
        Some(m) => (m.to_string(), 1),
        None => match args.get(i + 1) {
            Some(m) => (m.to_string_lossy().to_string(), 2),
            None => return args,
        },
    };
    args.drain(i..i + taken);
    args.insert(1.min(args.len()), mode.into());
    args
}

/// The message of `err` and its causes on one line, each cause once.
pub(crate) fn one_line(err: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in err.chain() {
        let part = cause.to_string();
        // Many messages already include their cause (`path: os error`).
        if text.contains(&part) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// 2 for bad arguments or configuration (or a memory budget nothing fits), 1 for any
/// other failure.
pub(crate) fn exit_code(err: &anyhow::Error) -> ExitCode {
    let user_error = err.chain().any(|cause| {
        cause.is::<UserError>()
            || matches!(
                cause.downcast_ref::<crate::Error>(),
                Some(crate::Error::Config { .. } | crate::Error::MemoryBudget(_))
            )
    });
    ExitCode::from(if user_error { 2 } else { 1 })
}

fn parse_failure(err: clap::Error) -> anyhow::Result<ExitCode> {
    match err.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            // Nothing useful to report if the help cannot be written.
            let _ = err.print();
            Ok(ExitCode::SUCCESS)
        }
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = err.print();
            Ok(ExitCode::from(2))
        }
        _ => {
            // clap's message spans several lines; keep what says what is wrong
            // and what is allowed, drop the usage and the pointer to --help.
            let rendered = err.render().to_string();
            let message = rendered
                .lines()
                .map(str::trim)
                .filter(|l| {
                    !(l.is_empty()
                        || l.starts_with("Usage:")
                        || l.starts_with("For more information"))
                })
                .map(|l| {
                    let l = l.strip_prefix("error: ").unwrap_or(l);
                    l.strip_prefix('[')
                        .and_then(|l| l.strip_suffix(']'))
                        .unwrap_or(l)
                })
                .collect::<Vec<_>>()
                .join("; ");
            Err(UserError::Usage(format!("{message}; try '--help'")).into())
        }
    }
}

/// The configuration from `--config` (or the defaults) with the flags applied.
fn load_config(global: &GlobalArgs) -> anyhow::Result<Config> {
    Config::load(global.config.as_deref(), &global.overrides()).map_err(|e| match e {
        // These name the file but not what it is for.
        crate::Error::Io { .. } | crate::Error::Format { .. } => {
            anyhow::Error::new(UserError::Config(e)).context("cannot read the configuration file")
        }
        e => UserError::Config(e).into(),
    })
}

/// Writes `text` to standard output; a closed pipe (`melora config | head`)
/// is not an error.
fn write_stdout(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(anyhow::Error::new(e).context("cannot write to standard output"))
        }
        _ => Ok(()),
    }
}
