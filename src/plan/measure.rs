//! Running the real code of a run on one instance of a configuration under the
//! counting allocator, and what it measures: the live bytes each part of a run adds
//! (model, parameters, episodes, optimiser state) and the peak of its meta-steps.

use candle_core::{DType, Device, Tensor};

use crate::config::{self, Config, DataSource, Method, SyntheticTask};
use crate::data::{Batch, Episode, EpisodeSource, SinusoidTasks, SyntheticText};
use crate::memory::TensorMeter;
use crate::models::FewShotModel;
use crate::nn::Mode;
use crate::optim::{Optimizer, OptimizerKind};
use crate::run::build::{
    build_engine, build_model, build_model_with_layers, builtin_inputs, is_sinusoid,
};
use crate::run::{meta_step, training_mode, Run};
use crate::tensor::GradGraph;
use crate::{Error, Result};

use super::tasks::ObservedTask;

/// The inputs of the configured tasks, as the planner assumes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Inputs {
    /// Token sequences of `t` tokens: `model.max_length` for data read from files
    /// (the longest a batch can be), the generator's longest for synthetic text.
    Tokens { t: usize },
    /// Square images of `channels` colour channels.
    Images {
        channels: usize,
        side: usize,
        dtype: DType,
    },
    /// Table rows of `features` values.
    Rows { features: usize },
    /// The sinusoid regression's x.
    Sinusoid,
}

impl Inputs {
    /// The inputs of `config`'s tasks.
    pub(crate) fn of(config: &Config) -> Result<Self> {
        use config::pairing::{ModelKind, TaskInputs};
        let data = &config.data;
        Ok(match TaskInputs::of(config) {
            TaskInputs::Regression => Inputs::Sinusoid,
            TaskInputs::Rows if ModelKind::of(config) == ModelKind::Mlp => Inputs::Rows {
                features: builtin_inputs(config)?.features,
            },
            _ if matches!(ModelKind::of(config), ModelKind::Vision(_)) => Inputs::Images {
                channels: builtin_inputs(config)?.image_channels,
                side: data.image_size,
                dtype: match config.model.dtype {
                    config::DType::F64 => DType::F64,
                    _ => DType::F32,
                },
            },
            _ => {
                let synthetic = data.synthetic_only || data.source == DataSource::Synthetic;
                let t = if synthetic && data.synthetic_task != SyntheticTask::Images {
                    SyntheticText::with_max_length(config.model.max_length)?.max_len
                } else {
                    config.model.max_length
                };
                Inputs::Tokens { t }
            }
        })
    }

    /// Tokens per sequence, for text.
    pub(crate) fn sequence_length(self) -> Option<usize> {
        match self {
            Inputs::Tokens { t } => Some(t),
            _ => None,
        }
    }

    /// Bytes of a batch of `n` examples (inputs, masks, labels), for refusing sizes
    /// no machine holds before allocating them.
    fn batch_bytes(self, n: usize) -> Option<usize> {
        let per_example = match self {
            Inputs::Tokens { t } => t.checked_mul(8)?,
            Inputs::Images {
                channels,
                side,
                dtype,
            } => side
                .checked_mul(side)?
                .checked_mul(channels)?
                .checked_mul(dtype.size_in_bytes())?,
            Inputs::Rows { features } => features.checked_mul(4)?,
            Inputs::Sinusoid => 8,
        };
        per_example.checked_add(4)?.checked_mul(n)
    }

    /// A batch of `n` examples of `classes` classes (labels cycling through them).
    fn batch(self, n: usize, classes: usize, seed: u64) -> Result<Batch> {
        let device = Device::Cpu;
        let labels = Tensor::from_vec(
            (0..n)
                .map(|i| (i % classes.max(1)) as u32)
                .collect::<Vec<_>>(),
            n,
            &device,
        )?;
        Ok(match self {
            Inputs::Tokens { t } => {
                // Small ids: valid in every vocabulary; memory does not depend on them.
                let ids: Vec<u32> = (0..n * t)
                    .map(|i| ((i as u64 * 7 + seed) % 7) as u32 + 1)
                    .collect();
                Batch::from_tokens(
                    Tensor::from_vec(ids, (n, t), &device)?,
                    Tensor::ones((n, t), DType::U32, &device)?,
                    None,
                    labels,
                )?
            }
            Inputs::Images {
                channels,
                side,
                dtype,
            } => {
                let pixels: Vec<f32> = (0..n * channels * side * side)
                    .map(|i| ((i as u64 * 2_654_435_761 + seed) % 1000) as f32 / 1000.0)
                    .collect();
                Batch::from_dense(
                    Tensor::from_vec(pixels, (n, channels, side, side), &device)?
                        .to_dtype(dtype)?,
                    labels,
                )?
            }
            Inputs::Rows { features } => {
                let values: Vec<f32> = (0..n * features)
                    .map(|i| ((i as u64 * 40_503 + seed) % 100) as f32 / 100.0)
                    .collect();
                Batch::from_dense(Tensor::from_vec(values, (n, features), &device)?, labels)?
            }
            Inputs::Sinusoid => {
                let tasks = SinusoidTasks {
                    k_shot: n,
                    n_query: 1,
                    seed,
                };
                tasks.episode(0)?.support
            }
        })
    }
}

/// The tasks the instances of a plan run on.
#[derive(Debug, Clone)]
pub(crate) struct PlannedInputs {
    /// Their shape, as configured.
    pub(crate) inputs: Inputs,
    /// For text, the heaviest task the run reads; `None`: tasks of the configured
    /// shape, every sequence at its longest.
    pub(crate) observed: Option<ObservedTask>,
    /// The device the run keeps its tensors on.
    pub(crate) device: Device,
}

/// One task of an instance: the observed one, or one of the configured shape.
pub(crate) fn episode(config: &Config, planned: &PlannedInputs, index: u64) -> Result<Episode> {
    host_episode(config, planned, index)?.to_device(&planned.device)
}

/// [`episode`] as read or made, in host memory.
fn host_episode(config: &Config, planned: &PlannedInputs, index: u64) -> Result<Episode> {
    if let Some(task) = &planned.observed {
        return task.episode();
    }
    let inputs = planned.inputs;
    let data = &config.data;
    if inputs == Inputs::Sinusoid {
        let tasks = SinusoidTasks {
            k_shot: data.k_shot,
            n_query: data.n_query,
            seed: 7,
        };
        return tasks.episode(index);
    }
    let (support, query) = (data.n_way * data.k_shot, data.n_way * data.n_query);
    Episode::new(
        inputs.batch(support, data.n_way, 2 * index)?,
        inputs.batch(query, data.n_way, 2 * index + 1)?,
        data.n_way,
    )
}

/// Refuses sequences longer than the model's position table, before anything is
/// built: the planner sizes batches at their longest, which its embedding refuses.
pub(crate) fn check_positions(
    config: &Config,
    inputs: Inputs,
    architecture: &crate::models::Architecture,
) -> Result<()> {
    let (Some(t), Some(positions)) = (inputs.sequence_length(), architecture.max_positions())
    else {
        return Ok(());
    };
    if t <= positions {
        return Ok(());
    }
    let synthetic =
        config.data.synthetic_only || config.data.source == crate::config::DataSource::Synthetic;
    Err(Error::InvalidArgument(if synthetic {
        format!(
            "synthetic texts have up to {t} tokens, more than the model's {positions} \
             positions; use a model with at least {t} positions"
        )
    } else {
        format!(
            "model.max_length is {t}, more than the model's {positions} positions; set it \
             to at most {positions}"
        )
    }))
}

/// Refuses tasks whose episodes alone would not fit in `limit` bytes (a typo in
/// `k_shot` must not make the planner try to allocate them).
pub(crate) fn check_data_fits(
    config: &Config,
    inputs: Inputs,
    tasks: usize,
    limit: u64,
) -> Result<()> {
    let data = &config.data;
    let examples = data
        .n_way
        .checked_mul(data.k_shot.saturating_add(data.n_query))
        .and_then(|n| n.checked_mul(tasks));
    let bytes = examples.and_then(|n| inputs.batch_bytes(n));
    match bytes {
        Some(b) if (b as u64) <= limit => Ok(()),
        _ => Err(Error::InvalidArgument(format!(
            "the configured tasks ({} ways × ({} support + {} query) examples{}, {tasks} \
             at once) alone need more memory than this machine has ({}); lower data.k_shot, \
             data.n_query, data.n_way or meta_learning.meta_batch_size",
            data.n_way,
            data.k_shot,
            data.n_query,
            inputs
                .sequence_length()
                .map_or(String::new(), |t| format!(" of {t} tokens")),
            crate::memory::format_bytes(limit),
        ))),
    }
}

/// What one instance of a configuration measured, in bytes: live bytes each part
/// adds, and peaks above the level before the instance was built.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Measured {
    /// The built model (its frozen base).
    pub(crate) weights: f64,
    /// The peak while the model was built.
    pub(crate) build_peak: f64,
    /// The trainable parameters.
    pub(crate) trainable: f64,
    /// The episodes held (every meta-batch the prefetcher would hold).
    pub(crate) data: f64,
    /// The outer optimiser's state after the first step (its moments' bytes).
    pub(crate) optimizer: f64,
    /// The peak of the meta-steps (or of a baseline's adaptation), everything above
    /// included.
    pub(crate) peak: f64,
    /// Live bytes of one forward graph of a support micro-batch, kept for backward.
    pub(crate) forward_graph: f64,
    /// What one first-order backward pass of it adds at its peak beyond the graph.
    pub(crate) backward_extra: f64,
    /// Live bytes of the gradient of that graph taken with its own graph (second
    /// order), beyond the forward graph.
    pub(crate) gradient_graph: f64,
}

/// Which instance of a configuration to run.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Instance {
    /// Layers of the transformer (`None`: as configured, and dense models).
    pub(crate) layers: Option<usize>,
    /// Tasks per meta-batch.
    pub(crate) tasks: usize,
    /// Queries per class instead of `data.n_query` (`None`: as configured).
    pub(crate) n_query: Option<usize>,
    /// Checkpointed layers (`memory_optimization.checkpointing.layers`) instead of
    /// the configured plan.
    pub(crate) checkpoint: Option<Vec<usize>>,
}

/// Runs `instance` of `config` as a run does — model built, parameters
/// initialised, `episode_batches` meta-batches of episodes made, learner, outer
/// update and engine built, `iterations` meta-steps (for a baseline: one test
/// task's adaptation and prediction) — and measures it.
pub(crate) fn measure(
    config: &Config,
    instance: &Instance,
    planned: &PlannedInputs,
    iterations: usize,
    episode_batches: usize,
) -> Result<Measured> {
    let mut config = config.clone();
    let meta_trains = config::LearnerSpec::of(&config).meta_trains();
    config.meta_learning.meta_batch_size = instance.tasks;
    if let Some(n_query) = instance.n_query {
        config.data.n_query = n_query;
    }
    if let Some(layers) = &instance.checkpoint {
        config.memory_optimization.checkpointing.layers = Some(layers.clone());
    }
    let config = &config;
    let device = &planned.device;
    // Device meters do not nest: each scope's figures are read before the next starts.
    let meter = TensorMeter::start(device)?;
    let level = |m: &TensorMeter| m.current_above_baseline().map(|bytes| bytes as f64);
    let model = match instance.layers {
        Some(layers) => build_model_with_layers(config, layers)?,
        None => build_model(config)?,
    };
    let mut measured = Measured {
        weights: level(&meter)?,
        build_peak: meter.peak_above_baseline()? as f64,
        ..Measured::default()
    };
    let trainable_before = level(&meter)?;
    let run = Run::with_model(config, model)?;
    let (model, mut params, mut outer) = (run.model, run.params, run.outer);
    // The learner, adapter, outer update and encoder are a few hundred bytes of
    // structure; the parameters are what the run adds here.
    measured.trainable = level(&meter)? - trainable_before;
    let batches = if meta_trains {
        episode_batches.max(1)
    } else {
        1
    };
    let tasks: Vec<Episode> = (0..batches * instance.tasks)
        .map(|i| episode(config, planned, i as u64))
        .collect::<Result<_>>()?;
    measured.data = level(&meter)? - measured.weights - measured.trainable;
    let engine = build_engine(config, model.as_ref())?;
    let before_steps = level(&meter)?;
    let steps = TensorMeter::start(device)?;
    if let Some(learner) = &run.learner {
        let meta_batch = &tasks[..instance.tasks];
        for iteration in 0..iterations.max(1) {
            let mode = training_mode(config.seed, iteration, instance.tasks);
            params = meta_step(
                learner.as_ref(),
                engine.as_ref(),
                &params,
                meta_batch,
                &mut outer,
                mode,
            )?
            .0;
            if iteration == 0 {
                measured.optimizer = outer
                    .optimizer
                    .moments()
                    .map_or(0.0, |(m, v)| (m.size_in_bytes() + v.size_in_bytes()) as f64);
            }
        }
    } else {
        params = pretrain_steps(config, planned.inputs, model.as_ref(), params)?;
        let task = &tasks[0];
        let adapted = run
            .adapter
            .adapt(engine.as_ref(), &params, &task.support, Mode::Eval)?;
        run.adapter
            .predict(engine.as_ref(), &adapted, &task.query, Mode::Eval)?;
    }
    measured.peak = before_steps + steps.peak_above_baseline()? as f64;
    drop(steps);

    // One forward graph of a support micro-batch, then its first-order backward.
    let support = &tasks[0].support;
    let micro = config
        .memory_optimization
        .gradient_accumulation
        .micro_batch
        .unwrap_or(support.len())
        .clamp(1, support.len().max(1));
    let chunk = support.split(micro)?.swap_remove(0);
    let graph = TensorMeter::start(device)?;
    let leaves = params.to_leaves()?;
    let outputs = model.logits(&leaves, &chunk, Mode::Eval)?;
    let loss = engine.loss().value(&outputs, &chunk)?;
    measured.forward_graph = level(&graph)?;
    let grads = leaves.gradients(&loss, GradGraph::Detach)?;
    measured.backward_extra =
        (graph.peak_above_baseline()? as f64 - measured.forward_graph).max(0.0);
    drop(grads);
    let before = level(&graph)?;
    let kept = leaves.gradients(&loss, GradGraph::Keep)?;
    measured.gradient_graph = (level(&graph)? - before).max(0.0);
    drop((kept, loss, outputs, leaves));
    Ok(measured)
}

/// The pre-training of `pretrain-finetune` as far as memory goes: two steps on a
/// batch of `comparison.pretrain.batch_size` examples; other methods have none.
fn pretrain_steps(
    config: &Config,
    inputs: Inputs,
    model: &dyn FewShotModel,
    params: crate::tensor::ParamSet,
) -> Result<crate::tensor::ParamSet> {
    if config.meta_learning.method != Method::PretrainFinetune {
        return Ok(params);
    }
    let size = config.comparison.pretrain.resolved(config).1;
    let batch = if is_sinusoid(config) {
        Inputs::Sinusoid.batch(size, 1, 3)?
    } else {
        inputs.batch(size, config.data.n_way, 11)?
    }
    .to_device(&crate::run::build::device(config)?)?;
    let engine = build_engine(config, model)?;
    let engine = crate::engine::MicroBatched::new(
        engine.as_ref(),
        config.memory_optimization.gradient_accumulation.micro_batch,
    );
    let mut optimizer = Optimizer::new(OptimizerKind::adamw(0.0));
    let mut params = params;
    for step in 0..2 {
        let context = || format!("pre-training step {}", step + 1);
        let (grads, _, _) =
            crate::meta::loss_gradient(&engine, &params, &batch, Mode::Eval, &context)?;
        params = optimizer.step(&params, &grads, 1e-3)?;
    }
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Synthetic text is planned at the sequence length it is generated with: at most
    /// `model.max_length`, at most the generator's 32.
    #[test]
    fn synthetic_text_is_planned_at_the_model_max_length() {
        for (max_length, planned) in [(8, 8), (16, 16), (32, 32), (64, 32)] {
            let mut c = Config::default();
            c.model.max_length = max_length;
            assert_eq!(
                Inputs::of(&c).unwrap().sequence_length(),
                Some(planned),
                "max_length {max_length}"
            );
        }
    }
}
