//! `melora adapt` (a checkpoint applied to the user's own examples) and `melora
//! export` (a checkpoint's adapter as a PEFT folder).

use std::path::Path;
use std::process::ExitCode;

use super::args::{AdaptArgs, ExportArgs, GlobalArgs};
use super::train_cmd::config_for_checkpoint;
use super::write_stdout;
use crate::config::{Config, Method};
use crate::models::adapter_files::save_model_adapter;
use crate::models::FewShotModel;
use crate::run::build::build_model;
use crate::tensor::ParamSet;
use crate::train::{adapter_params, params_from};

/// The base model an adapter belongs to: the model folder, or the built-in's name.
fn base_model(config: &Config) -> String {
    config
        .model
        .path
        .as_ref()
        .map_or(config.model.name.clone(), |p| p.display().to_string())
}

/// Writes `params` of `model` as a PEFT adapter folder `dir`.
fn write_adapter(
    dir: &Path,
    config: &Config,
    model: &dyn FewShotModel,
    params: &ParamSet,
) -> anyhow::Result<()> {
    if model.adapter_config().is_none() {
        anyhow::bail!(
            "{} has no LoRA adapter (every parameter is trained): there is no PEFT adapter to \
             write",
            config.model.name
        );
    }
    std::fs::create_dir_all(dir).map_err(|e| crate::Error::io(dir, e))?;
    save_model_adapter(
        dir,
        model,
        &adapter_params(params)?,
        Some(&base_model(config)),
    )?;
    Ok(())
}

pub(crate) fn run_adapt(global: &GlobalArgs, args: &AdaptArgs) -> anyhow::Result<ExitCode> {
    let config = config_for_checkpoint(global, Some(&args.checkpoint))?;
    if args.save_adapter.is_some() && config.meta_learning.method == Method::Prototype {
        anyhow::bail!(
            "--save-adapter: prototype adapts by class means, not by training an adapter; \
             there is nothing to save"
        );
    }
    crate::init();
    let model = build_model(&config)?;
    let params = params_from(model.as_ref(), &config, Some(&args.checkpoint))?;
    let outcome = crate::train::adapt::adapt_with(
        &config,
        model.as_ref(),
        &params,
        &args.support,
        &args.query,
    )?;
    let mut lines = String::new();
    for prediction in &outcome.predictions {
        let mut value = serde_json::to_value(prediction)?;
        // Probabilities as an object keyed by label, in the support set's order.
        let probabilities: serde_json::Map<String, serde_json::Value> = prediction
            .probabilities
            .iter()
            .map(|(label, p)| (label.clone(), serde_json::json!(p)))
            .collect();
        value["probabilities"] = serde_json::Value::Object(probabilities);
        lines.push_str(&serde_json::to_string(&value)?);
        lines.push('\n');
    }
    match &args.output {
        Some(path) => {
            crate::io::write_atomic(path, lines.as_bytes())?;
            eprintln!(
                "{} predictions written to {}",
                outcome.predictions.len(),
                path.display()
            );
        }
        None => write_stdout(&lines)?,
    }
    eprintln!(
        "adapted {} ({}) to {} classes: {}",
        crate::config::Variant::of(&config),
        config.model.name,
        outcome.classes.len(),
        outcome.classes.join(", ")
    );
    if let Some(accuracy) = outcome.accuracy {
        let labelled = outcome
            .predictions
            .iter()
            .filter(|p| p.label.is_some())
            .count();
        eprintln!("accuracy on the {labelled} labelled query items: {accuracy:.4}");
    }
    if let Some(dir) = &args.save_adapter {
        write_adapter(dir, &config, model.as_ref(), &outcome.adapted)?;
        eprintln!("adapted adapter written to {} (PEFT format)", dir.display());
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn run_export(global: &GlobalArgs, args: &ExportArgs) -> anyhow::Result<ExitCode> {
    let config = config_for_checkpoint(global, Some(&args.checkpoint))?;
    crate::init();
    let model = build_model(&config)?;
    let params = params_from(model.as_ref(), &config, Some(&args.checkpoint))?;
    write_adapter(&args.output, &config, model.as_ref(), &params)?;
    write_stdout(&format!(
        "adapter of {} written to {} (PEFT format: adapter_config.json, \
         adapter_model.safetensors; base model {})\n",
        args.checkpoint.display(),
        args.output.display(),
        base_model(&config)
    ))?;
    Ok(ExitCode::SUCCESS)
}
