use clap::CommandFactory;

use super::args::Cli;
use crate::config::ConfigOverrides;

#[test]
fn command_line_is_well_formed() {
    Cli::command().debug_assert();
}

/// Error messages about overrides name these flags: they must exist.
#[test]
fn every_override_flag_exists() {
    let command = Cli::command();
    for flag in ConfigOverrides::all_flags() {
        let long = flag.trim_start_matches("--");
        assert!(
            command
                .get_arguments()
                .any(|arg| arg.get_long() == Some(long) && arg.is_global_set()),
            "no global flag {flag}"
        );
    }
}
