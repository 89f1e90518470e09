//! `melora config`: shows the configuration a run would use.

use super::args::{ConfigArgs, GlobalArgs};
use super::{load_config, write_stdout};

pub(crate) fn run(global: &GlobalArgs, args: &ConfigArgs) -> anyhow::Result<()> {
    let config = load_config(global)?;
    if args.check {
        write_stdout("config OK\n")
    } else {
        write_stdout(&config.to_yaml_string()?)
    }
}
