//! The pre-training of the `pretrain-finetune` baseline (the "Baseline" of Chen et
//! al., 2019): supervised training of the trainable tensors (LoRA and a head, or a
//! dense model's every weight) over all meta-training classes at once, by AdamW on
//! batches of `comparison.pretrain.batch_size` examples labelled by their class.
//! Each test task then fine-tunes a new head (or everything) from the result.

use std::time::Instant;

use candle_core::Tensor;

use crate::config::Config;
use crate::data::{episode_source, Split};
use crate::engine::MicroBatched;
use crate::memory::MemoryMeter;
use crate::models::{FewShotModel, HEAD_BIAS, HEAD_WEIGHT};
use crate::nn::Mode;
use crate::optim::{Optimizer, OptimizerKind};
use crate::tensor::ParamSet;
use crate::{Error, Result};

use crate::run::build::{build_engine, build_text_encoder, initial_params, tasks_share_classes};

/// What pre-training produced.
#[derive(Debug, Clone)]
pub struct PretrainOutcome {
    /// The trained tensors, with a zero head of the tasks' classes when the test
    /// classes are new (the pre-training head spans the meta-training classes), or
    /// the trained head when every task has the same classes.
    pub params: ParamSet,
    /// Supervised steps taken.
    pub steps: usize,
    /// Median seconds per step.
    pub seconds_per_step: Option<f64>,
    /// Loss of the last step.
    pub final_loss: f64,
    /// Classes the head was trained over.
    pub classes: usize,
    /// Peak heap bytes above the start of pre-training.
    pub peak_bytes: Option<u64>,
}

/// A zero head of `classes` rows, shaped like `params`' head otherwise.
fn with_zero_head(params: &ParamSet, classes: usize) -> Result<ParamSet> {
    let weight = params.require(HEAD_WEIGHT)?;
    let (dtype, device) = (weight.dtype(), weight.device());
    let mut out = params.clone();
    out.set(
        HEAD_WEIGHT,
        Tensor::zeros((classes, weight.dims()[1]), dtype, device)?,
    );
    out.set(HEAD_BIAS, Tensor::zeros(classes, dtype, device)?);
    Ok(out)
}

/// Pre-trains `model`'s trainable tensors on the meta-training split of `config`'s
/// data (see the module documentation).
pub fn pretrain(config: &Config, model: &dyn FewShotModel) -> Result<PretrainOutcome> {
    crate::init();
    let meter = MemoryMeter::start();
    let (steps, batch_size, lr) = config.comparison.pretrain.resolved(config);
    let encoder = build_text_encoder(config)?;
    let source = episode_source(
        &config.data,
        config.seed,
        Split::Train,
        encoder.as_ref(),
        &crate::run::build::device(config)?,
    )?;
    let initial = initial_params(model, config)?;
    let engine = build_engine(config, model)?;
    let micro_batch = config.memory_optimization.gradient_accumulation.micro_batch;
    let task_head_rows = initial.require(HEAD_WEIGHT)?.dims()[0];
    let mut params: Option<ParamSet> = None;
    let mut optimizer = Optimizer::new(OptimizerKind::adamw(0.0));
    let (mut times, mut final_loss, mut classes) = (Vec::new(), f64::NAN, task_head_rows);
    for step in 0..steps {
        let started = Instant::now();
        let Some(batch) = source.pretraining_batch(step as u64, batch_size)? else {
            return Err(Error::InvalidArgument(format!(
                "pretrain-finetune trains a head over fixed classes, but synthetic `{}` tasks \
                 make new classes for every task; use a data set, or data.synthetic_task: \
                 domains or sinusoid",
                config.data.synthetic_task
            )));
        };
        let theta = match params.take() {
            Some(p) => p,
            None => {
                classes = batch.classes;
                with_zero_head(&initial, batch.classes)?
            }
        };
        let context = || format!("pre-training step {}", step + 1);
        let (grads, loss, _) = crate::meta::loss_gradient(
            &MicroBatched::new(engine.as_ref(), micro_batch),
            &theta,
            &batch.batch,
            Mode::Train {
                seed: crate::tensor::ops::mix_seed(config.seed, step as u64),
            },
            &context,
        )?;
        final_loss = loss;
        params = Some(optimizer.step(&theta, &grads, lr)?);
        times.push(started.elapsed().as_secs_f64());
    }
    let trained = params.unwrap_or(initial);
    // A head over the meta-training classes means nothing to a task of new classes.
    let params = if tasks_share_classes(config) && classes == task_head_rows {
        trained
    } else {
        with_zero_head(&trained, task_head_rows)?
    };
    Ok(PretrainOutcome {
        params,
        steps,
        seconds_per_step: crate::eval::stats::median(&times),
        final_loss,
        classes,
        peak_bytes: crate::memory::is_installed().then(|| meter.peak_above_baseline() as u64),
    })
}
