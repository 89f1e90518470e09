//! `melora plan`: the predicted peak memory of a configuration, broken down, and
//! the same configuration under each method of the comparison.

use std::fmt::Write as _;

use super::args::{GlobalArgs, PlanArgs};
use super::{load_config, write_stdout, UserError};
use crate::memory::planner::{self, Plan, PlanMethod};
use crate::memory::{format_bytes, parse_bytes};

pub(crate) fn run(global: &GlobalArgs, args: &PlanArgs) -> anyhow::Result<()> {
    let config = load_config(global)?;
    let methods = args
        .methods
        .iter()
        .filter(|m| !m.trim().is_empty())
        .map(|m| PlanMethod::parse(m))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| UserError::Usage(format!("--methods: {e}")))?;
    if methods.is_empty() {
        return Err(UserError::Usage("--methods names no method".into()).into());
    }
    let budget = args
        .memory_budget
        .as_deref()
        .map(parse_bytes)
        .transpose()
        .map_err(|e| UserError::Usage(format!("--memory-budget: {e}")))?;
    // Everything the planner rejects comes from the configuration (model, targets,
    // data source, micro-batches).
    let plan = planner::plan(&config).map_err(UserError::Config)?;
    let comparison = planner::compare(&config, &methods).map_err(UserError::Config)?;

    if args.json {
        let json = serde_json::json!({
            "plan": plan,
            "comparison": comparison,
            "memory_budget_bytes": budget,
        });
        return write_stdout(&format!("{}\n", serde_json::to_string_pretty(&json)?));
    }
    let mut out = planner::format_breakdown(&plan);
    writeln!(out, "\nThe same configuration under each method:\n")?;
    out.push_str(&planner::format_comparison(&comparison, budget));
    out.push('\n');
    out.push_str(&notes(&plan));
    write_stdout(&out)
}

/// What the prediction covers, in plain words.
fn notes(plan: &Plan) -> String {
    let mut out = String::from(
        "Heap bytes as the counting allocator counts them (`melora profile` measures them), \
         in steady-state training: frozen weights, parameters and optimiser state, ",
    );
    let _ = write!(
        out,
        "{} meta-batches of episodes in memory (the prefetcher's), and the meta-step's \
         graphs",
        plan.options.episode_batches
    );
    if let Some(t) = plan.sequence_length {
        let _ = write!(
            out,
            "; sequences of {t} tokens (the longest a batch can hold; batches are padded \
             to their longest sequence)"
        );
    }
    let _ = writeln!(
        out,
        ". Not included: a data set read from files, the tokenizer, validation passes. \
         Loading the model peaks at {}.",
        format_bytes(plan.load_peak_bytes)
    );
    out
}
