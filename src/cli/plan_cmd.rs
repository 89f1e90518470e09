//! `melora plan`: the predicted peak memory of a configuration, broken down, and
//! the same configuration under each method of the comparison.

use std::fmt::Write as _;
use std::process::ExitCode;
use std::str::FromStr;

use super::args::{GlobalArgs, PlanArgs};
use super::{load_config, write_stdout, UserError};
use crate::config::{Config, Method, Variant};
use crate::memory::format_bytes;
use crate::plan::search_configured;
use crate::plan::{self, Plan};

/// Prints the plan; with a memory budget that nothing fits (not even the most frugal
/// configuration the budget search tries), exits with status 2, as `train` does, so
/// that scripts can test whether a configuration can run.
pub(crate) fn run(global: &GlobalArgs, args: &PlanArgs) -> anyhow::Result<ExitCode> {
    let config = load_config(global)?;
    let variants = methods(&config, &args.methods)?;
    // An `auto` budget is read once, before anything is planned on the device.
    let choice = search_configured(&config).map_err(UserError::Config)?;
    let budget = choice.as_ref().map(|c| c.budget);
    // Everything the planner rejects comes from the configuration (model, targets,
    // data source, micro-batches, checkpointed layers).
    let plan = plan::plan(&config).map_err(UserError::Config)?;
    let comparison = plan::compare(&config, &variants).map_err(UserError::Config)?;
    // What `train` would run under the budget, or how close it gets.
    let status = match &choice {
        Some(choice) if !choice.fits => {
            eprintln!(
                "error: nothing fits in the memory budget of {}; the smallest feasible budget \
                 is {}",
                format_bytes(choice.budget),
                format_bytes(choice.predicted_bytes)
            );
            ExitCode::from(2)
        }
        _ => ExitCode::SUCCESS,
    };

    if args.json {
        let json = serde_json::json!({
            "plan": plan,
            "comparison": comparison,
            "memory_budget_bytes": budget,
            "fits": choice.as_ref().map(|c| c.fits),
            "chosen_changes": choice.as_ref().filter(|c| c.fits).map(|c| &c.changes),
        });
        write_stdout(&format!("{}\n", serde_json::to_string_pretty(&json)?))?;
        return Ok(status);
    }
    let mut out = plan::format_breakdown(&plan);
    if let Some(b) = budget {
        let verdict = if plan.peak_bytes <= b {
            "fits in"
        } else {
            "does not fit in"
        };
        writeln!(out, "\nThis configuration {verdict} {}.", format_bytes(b))?;
        if let Some(choice) = &choice {
            writeln!(out, "{}", choice.explain())?;
        }
    }
    writeln!(out, "\nThe same configuration under each method:\n")?;
    out.push_str(&plan::format_comparison(&comparison, budget));
    out.push('\n');
    out.push_str(&notes(&plan));
    write_stdout(&out)?;
    Ok(status)
}

/// The variants of `--methods`: the configuration's names (`comparison.baselines`),
/// and `melora` for MELoRA with the configured Hessian approximation. Empty (the
/// default) gives [`plan::default_comparison`].
fn methods(config: &Config, names: &[String]) -> anyhow::Result<Vec<Variant>> {
    let names: Vec<&str> = names
        .iter()
        .map(|n| n.trim())
        .filter(|n| !n.is_empty())
        .collect();
    if names.is_empty() {
        return Ok(plan::default_comparison(config));
    }
    names
        .iter()
        .map(|&name| {
            if name.eq_ignore_ascii_case("melora") {
                let mut melora = config.clone();
                melora.meta_learning.method = Method::Melora;
                return Ok(Variant::of(&melora));
            }
            Variant::from_str(&name.to_ascii_lowercase()).map_err(|_| {
                UserError::Usage(format!(
                    "--methods: unknown method `{name}`; allowed: melora (with the configured \
                     Hessian approximation), {}",
                    Variant::ALL
                        .iter()
                        .map(|v| v.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
                .into()
            })
        })
        .collect()
}

/// What the prediction covers, in plain words.
fn notes(plan: &Plan) -> String {
    let mut out = if plan.device == "cpu" {
        String::from(
            "Heap bytes as the counting allocator counts them (`melora profile` measures them). ",
        )
    } else {
        format!(
            "Bytes of {}'s memory as its memory pool counts them, measured there (`melora              profile --device {}` measures the run). ",
            plan.device, plan.device
        )
    };
    if plan.variant.meta_trains() {
        let _ = write!(
            out,
            "Steady-state training: frozen weights, parameters and optimiser state, {} \
             meta-batches of episodes in memory (the prefetcher's), and the meta-step's \
             graphs",
            plan.options.episode_batches
        );
    } else {
        out.push_str(
            "A baseline is not meta-trained: its peak is the adaptation to one test task \
             (evaluation.finetune_steps AdamW steps) and the query's outputs",
        );
    }
    match (&plan.heaviest_task, plan.sequence_length) {
        (Some(task), _) => {
            let _ = write!(
                out,
                "; measured on the heaviest of the {} {} tasks the run reads (episode {}: \
                 {} support and {} query tokens, the longest sequence {}), since melora \
                 computes only the real tokens",
                task.tasks_read,
                task.split,
                task.episode,
                task.support_tokens,
                task.query_tokens,
                task.longest_sequence
            );
        }
        (None, Some(t)) => {
            let _ = write!(
                out,
                "; every sequence at {t} tokens, the longest a batch can hold (melora \
                 computes only the real tokens, so on shorter texts the run peaks below \
                 this: an upper bound there){}",
                plan.data_note
                    .as_ref()
                    .map_or(String::new(), |note| format!(": {note}"))
            );
        }
        (None, None) => {
            if let Some(note) = &plan.data_note {
                let _ = write!(out, "; {note}");
            }
        }
    }
    let _ = write!(
        out,
        ". \"graphs kept\" is the activations at the peak over one forward graph of the \
         support set ({}). Not included: {}validation passes. Loading the model peaks at \
         {}.",
        format_bytes(plan.forward_graph_bytes),
        if plan.breakdown.dataset > 0 {
            ""
        } else {
            "a data set read from files, the tokenizer, "
        },
        format_bytes(plan.load_peak_bytes)
    );
    out.push('\n');
    out
}
