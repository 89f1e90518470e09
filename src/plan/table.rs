//! Plans as Markdown tables for people.

use std::fmt::Write as _;

use super::Plan;
use crate::memory::format_bytes;

fn percent(part: u64, total: u64) -> String {
    if total == 0 {
        return "-".into();
    }
    format!("{:.1}%", 100.0 * part as f64 / total as f64)
}

/// ", checkpointing layers 0, 1" when gradient checkpointing is on.
fn checkpointing(plan: &Plan) -> String {
    match &plan.checkpoint_layers {
        Some(layers) => {
            let list: Vec<String> = layers.iter().map(usize::to_string).collect();
            format!(", checkpointing the inputs of layers {}", list.join(", "))
        }
        None => String::new(),
    }
}

/// "bf16 base and activations, f32 trainable, int8 frozen matrices" and the like.
fn precision(plan: &Plan) -> String {
    let mut out = if plan.dtype == plan.trainable_dtype {
        plan.dtype.clone()
    } else {
        format!(
            "{} base and activations, {} trainable",
            plan.dtype, plan.trainable_dtype
        )
    };
    if plan.loss_scaling {
        out.push_str(" under loss scaling");
    }
    if plan.int8 {
        out.push_str(", int8 frozen matrices");
    }
    out
}

/// The breakdown of one plan's peak, with the assumptions it rests on.
pub fn format_breakdown(plan: &Plan) -> String {
    let b = &plan.breakdown;
    let total = b.total();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Predicted peak {}of {} on {} ({}; K = {}, meta-batch {}, {} support + {} query{}{}{}{})",
        if plan.device == "cpu" {
            String::new()
        } else {
            format!("in the memory of {} ", plan.device)
        },
        plan.method,
        plan.model,
        precision(plan),
        plan.inner_steps,
        plan.meta_batch_size,
        plan.support_examples,
        plan.query_examples,
        match (&plan.heaviest_task, plan.sequence_length) {
            (Some(task), _) => format!(
                " of the heaviest {} task: {} + {} tokens",
                task.split, task.support_tokens, task.query_tokens
            ),
            (None, Some(t)) => format!(" × {t} tokens"),
            (None, None) => String::new(),
        },
        plan.micro_batch
            .map_or(String::new(), |m| format!(", micro-batches of {m}")),
        plan.second_order_micro_batch
            .map_or(String::new(), |m| format!(
                ", second-order products in micro-batches of {m}"
            )),
        checkpointing(plan),
    );
    out.push('\n');
    out.push_str("| part | bytes | share |\n|---|---:|---:|\n");
    let activations = format!(
        "activations ({:.1} × one forward graph of {})",
        plan.graphs_kept,
        format_bytes(plan.forward_graph_bytes)
    );
    let rows: [(&str, u64); 8] = [
        ("frozen weights", b.frozen_weights),
        ("trainable parameters", b.trainable),
        ("gradients", b.gradients),
        ("optimizer state", b.optimizer_state),
        (activations.as_str(), b.activations),
        ("data (episodes)", b.data),
        ("data set and tokenizer", b.dataset),
        ("temporary buffers", b.temporaries),
    ];
    for (name, bytes) in rows {
        let _ = writeln!(
            out,
            "| {name} | {} | {} |",
            format_bytes(bytes),
            percent(bytes, total)
        );
    }
    let _ = writeln!(
        out,
        "| **total (peak)** | **{}** | 100% |",
        format_bytes(total)
    );
    if plan.load_peak_bytes > total {
        let _ = writeln!(
            out,
            "\nLoading the weights peaks higher, at {} (the file is read whole).",
            format_bytes(plan.load_peak_bytes)
        );
    }
    let _ = writeln!(
        out,
        "\nMeasured: the real code run on {} instance(s) of this configuration (the same \
         width, sequence length, image size, K and micro-batches; 1 to 4 layers, 1 or 2 \
         tasks, k and k + 1 queries per class on images of k shots, 2k and 2k + 1 \
         checkpointed), extrapolated to its \
         layers, meta-batch and queries.",
        plan.instances
    );
    out
}

/// One row per plan: peak, activations, gradients, graphs kept, the ratio to the
/// first row and, with a budget, whether it fits.
pub fn format_comparison(plans: &[Plan], budget: Option<u64>) -> String {
    let mut out = String::new();
    out.push_str("| method | predicted peak | activations | gradients | graphs kept | vs first |");
    match budget {
        Some(b) => {
            let _ = writeln!(out, " fits in {} |", format_bytes(b));
            out.push_str("|---|---:|---:|---:|---:|---:|:---:|\n");
        }
        None => out.push_str("\n|---|---:|---:|---:|---:|---:|\n"),
    }
    let first = plans.first().map_or(0, |p| p.peak_bytes);
    for p in plans {
        let ratio = if first > 0 {
            format!("{:.2}×", p.peak_bytes as f64 / first as f64)
        } else {
            "-".into()
        };
        let _ = write!(
            out,
            "| {} | {} | {} | {} | {:.1} | {ratio} |",
            p.method,
            format_bytes(p.peak_bytes),
            format_bytes(p.breakdown.activations),
            format_bytes(p.breakdown.gradients),
            p.graphs_kept,
        );
        match budget {
            Some(b) if p.peak_bytes <= b => out.push_str(" yes |\n"),
            Some(_) => out.push_str(" no |\n"),
            None => out.push('\n'),
        }
    }
    out
}
