//! `melora bench fsct-memory`: the FS-CT reference project's memory scenario
//! ([`crate::bench::fsct_memory`]). Every row is planned in a fresh child process
//! (`melora bench plan-row`, hidden) and, where the prediction is under the limit,
//! measured in another (`melora bench memory-row`), so that no row's heap peak
//! includes another's. Results are rewritten after every row.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, ExitCode};

use super::args::{BenchFsctMemoryArgs, GlobalArgs};
use super::bench_memory_cmd::{config_from_stdin, measuring_process, run_child};
use super::{write_stdout, UserError};
use crate::bench::fsct_memory::{
    scenario_config, write_scenario_images, ScenarioBench, ScenarioRow, Setting,
};
use crate::bench::machine::Machine;
use crate::memory::format_bytes;

/// What a row needs of a plan (`bench plan-row`'s output).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct PlannedRow {
    /// [`crate::plan::Plan::step_peak_bytes`].
    step_peak_bytes: u64,
    /// The data set's share of it.
    dataset_bytes: u64,
}

/// Runs the scenario; exit status 1 when a measuring process failed.
pub(crate) fn run(global: &GlobalArgs, args: &BenchFsctMemoryArgs) -> anyhow::Result<ExitCode> {
    if args.iterations == 0 {
        return Err(UserError::Usage("--iterations must be at least 1".into()).into());
    }
    if global.config.is_some() {
        return Err(UserError::Usage(
            "bench fsct-memory runs its own scenario; use --backbones, --sizes and \
             --settings instead of --config"
                .into(),
        )
        .into());
    }
    for backbone in &args.backbones {
        if crate::models::Backbone::from_name(backbone).is_none() {
            return Err(UserError::Usage(format!(
                "--backbones: `{backbone}` is not a vision backbone (conv4, conv6, resnet12, \
                 resnet18, resnet34)"
            ))
            .into());
        }
    }
    let measure_up_to = match &args.measure_up_to {
        Some(text) => crate::config::parse_bytes(text)
            .map_err(|e| UserError::Usage(format!("--measure-up-to: {e}")))?,
        None => crate::memory::physical_memory_bytes().unwrap_or(8 << 30) / 2,
    };
    let settings = if args.settings.is_empty() {
        Setting::ALL.to_vec()
    } else {
        args.settings.clone()
    };
    let output = global
        .output
        .clone()
        .unwrap_or_else(|| PathBuf::from("bench-results"));
    let images = output.join("fsct-memory-images");
    write_scenario_images(&images)?;
    let mut bench = ScenarioBench {
        machine: Machine::current(),
        measure_up_to_bytes: measure_up_to,
        iterations: args.iterations,
        rows: Vec::new(),
    };
    let mut written = None;
    for backbone in &args.backbones {
        for &size in &args.sizes {
            for &setting in &settings {
                let row = scenario_row(backbone, size, setting, &images, measure_up_to, args);
                let _ = writeln!(std::io::stderr(), "{}", describe(&row));
                bench.rows.push(row);
                bench.machine.load_average_end = crate::bench::machine::load_average();
                written = Some(bench.write(&output)?);
            }
        }
    }
    let (json, md) = match written {
        Some(paths) => paths,
        None => bench.write(&output)?,
    };
    // A row planned under the limit but without a measurement: its process failed.
    let failed = bench
        .rows
        .iter()
        .filter(|row| row.measured_bytes.is_none())
        .filter(|row| row.predicted_bytes.is_some_and(|p| p <= measure_up_to))
        .count();
    write_stdout(&format!(
        "{}\nwrote {} and {}\n",
        bench.to_markdown(),
        json.display(),
        md.display()
    ))?;
    if failed > 0 {
        let _ = writeln!(
            std::io::stderr(),
            "error: {failed} measuring process(es) failed (see {})",
            md.display()
        );
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

/// One row: the configuration (or why it is refused), the plan, the measurement.
fn scenario_row(
    backbone: &str,
    size: usize,
    setting: Setting,
    images: &std::path::Path,
    measure_up_to: u64,
    args: &BenchFsctMemoryArgs,
) -> ScenarioRow {
    let mut row = ScenarioRow {
        backbone: backbone.into(),
        image_size: size,
        setting,
        refused: None,
        predicted_bytes: None,
        dataset_bytes: None,
        measured_bytes: None,
        rss_bytes: None,
        seconds_per_iter: None,
        not_measured: None,
    };
    let config = match scenario_config(backbone, size, setting, images) {
        Ok(config) => config,
        Err(e) => {
            row.refused = Some(e.to_string());
            return row;
        }
    };
    let plan = config
        .to_yaml_string()
        .map_err(|e| e.to_string())
        .and_then(|yaml| plan_child(&yaml));
    let plan = match plan {
        Ok(plan) => plan,
        Err(why) => {
            row.refused = Some(why);
            return row;
        }
    };
    let predicted = plan.step_peak_bytes;
    row.predicted_bytes = Some(predicted);
    row.dataset_bytes = Some(plan.dataset_bytes);
    if predicted > measure_up_to {
        row.not_measured = Some(format!("predicted above {}", format_bytes(measure_up_to)));
        return row;
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    match run_child(&config, args.iterations, threads) {
        Ok(m) => {
            row.measured_bytes = m.peak_bytes;
            row.rss_bytes = m.rss_bytes;
            row.seconds_per_iter = Some(m.seconds_per_iter);
        }
        Err(why) => row.not_measured = Some(why),
    }
    row
}

/// The plan of the configuration `yaml`, made in a fresh process.
fn plan_child(yaml: &str) -> Result<PlannedRow, String> {
    let exe =
        std::env::current_exe().map_err(|e| format!("cannot find the melora executable: {e}"))?;
    let mut command = Command::new(exe);
    command.args(["bench", "plan-row"]);
    measuring_process(command, Some(yaml))
}

/// `melora bench plan-row`: the configuration (YAML) from standard input, planned in
/// this process; its step peak and data set as one line of JSON.
pub(crate) fn run_plan_row() -> anyhow::Result<()> {
    let config = config_from_stdin()?;
    let plan = crate::plan::plan(&config).map_err(UserError::Config)?;
    let row = PlannedRow {
        step_peak_bytes: plan.step_peak_bytes(),
        dataset_bytes: plan.breakdown.dataset,
    };
    write_stdout(&format!("{}\n", serde_json::to_string(&row)?))
}

/// A progress line for one row.
fn describe(row: &ScenarioRow) -> String {
    let head = format!("{} {}px {}", row.backbone, row.image_size, row.setting);
    if let Some(why) = &row.refused {
        return format!("{head}: refused ({why})");
    }
    let bytes = |b: Option<u64>| b.map_or("–".into(), format_bytes);
    format!(
        "{head}: predicted {}, measured {}{}",
        bytes(row.predicted_bytes),
        bytes(row.measured_bytes),
        row.not_measured
            .as_ref()
            .map_or(String::new(), |why| format!(" ({why})"))
    )
}
