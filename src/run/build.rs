//! Turning a [`Config`] into the objects of a run: model, learner or baseline, text
//! encoder, outer update.

use candle_core::{DType, Device};

use crate::config::{
    self, CheckpointPlan, ComputeDevice, Config, HessianKind, InnerMode, LearnerSpec, LrSchedule,
    Method, OuterOptimizer, Precision, PretrainTune, PrototypeDistance,
};
use crate::data::{EncodeText, TextTokenizer, WordHashTokenizer};
use crate::engine::{Checkpointed, GradEngine, WholeGraph};
use crate::meta::{
    Adapter, Distance, Finetune, Fomaml, FsctLearner, FullFinetune, HeadFinetune,
    HessianApproximation, InnerLoop, InnerStepRule, LoraFinetune, Maml, MamlMode, Melora,
    MetaLearner, MetaSgd, NoAdaptation, ProtoNet, Prototype, Reptile, VicWeights,
};
use crate::models::fsct::{FeatureNorm, FsctAttention, FsctConfig};
use crate::models::load::{builtin_on, from_directory_on, BuiltinInputs};
use crate::models::{Architecture, FewShotModel, LoraSettings, ModelPrecision, Quantization};
use crate::nn::{LoraInit, LoraSpec};
use crate::optim::{LossScaler, Optimizer, OptimizerKind, Schedule};
use crate::tensor::ParamSet;
use crate::{Error, Result};

use super::OuterUpdate;

fn dtype(config: &Config) -> DType {
    match config.model.dtype {
        config::DType::F32 => DType::F32,
        config::DType::F64 => DType::F64,
        config::DType::Bf16 => DType::BF16,
        config::DType::F16 => DType::F16,
    }
}

/// The dtypes and storage of the model: `model.dtype` throughout, or with
/// `memory_optimization.precision` bf16/f16 a frozen base and activations in that
/// type beside f32 trainable tensors; frozen matrices as `model.quantization` says.
pub fn model_precision(config: &Config) -> ModelPrecision {
    let quantization = match config.model.quantization {
        config::Quantization::None => Quantization::None,
        config::Quantization::Int8 => Quantization::Int8,
    };
    let precision = match config.memory_optimization.precision {
        Precision::F32 => ModelPrecision::from(dtype(config)),
        Precision::Bf16 => ModelPrecision::mixed(DType::BF16),
        Precision::F16 => ModelPrecision::mixed(DType::F16),
    };
    precision.with_quantization(quantization)
}

/// The model named by `model.name` (built-in) or `model.path` (Hugging Face folder),
/// with LoRA from the `lora` section and a head for `data.n_way` classes, in the
/// precision of [`model_precision`] (selective recomputation on when
/// `memory_optimization.checkpointing.selective`).
pub fn build_model(config: &Config) -> Result<Box<dyn FewShotModel>> {
    let lora = lora_settings(config);
    let outputs = model_outputs(config)?;
    let device = device(config)?;
    let model = match &config.model.path {
        Some(dir) => from_directory_on(dir, model_precision(config), Some(lora), outputs, &device)?,
        None => builtin_on(
            &config.model.name,
            config.seed,
            model_precision(config),
            Some(lora),
            outputs,
            builtin_inputs(config)?,
            &device,
        )?,
    };
    with_selective_recompute(config, model)
}

/// [`build_model`] with the configured transformer cut to its first `layers` layers
/// and random frozen weights (of the same dtypes and storage): what the memory
/// planner measures. Dense models are built as configured.
pub fn build_model_with_layers(config: &Config, layers: usize) -> Result<Box<dyn FewShotModel>> {
    let Some(architecture) = Architecture::from_config(config)? else {
        return build_model(config);
    };
    let model = architecture.with_layers(layers).build_random(
        config.seed,
        model_precision(config),
        Some(lora_settings(config)),
        model_outputs(config)?,
        &device(config)?,
    )?;
    with_selective_recompute(config, model)
}

/// The device `device` names, opened: the CPU, or a CUDA GPU in a build with the
/// `cuda` feature (a clear error in a CPU-only build, or when the GPU cannot be
/// opened).
pub fn device(config: &Config) -> Result<Device> {
    open_device(config.device)
}

/// [`device`] for one [`ComputeDevice`].
///
/// A GPU is opened once per process and handed out again: candle gives every
/// `Device::new_cuda` a new identity, and tensors of two identities refuse to meet
/// even on the same GPU (the model, the episodes and the planner's batches are made
/// by separate calls).
pub fn open_device(device: ComputeDevice) -> Result<Device> {
    match device {
        ComputeDevice::Cpu => Ok(Device::Cpu),
        #[cfg(feature = "cuda")]
        ComputeDevice::Cuda(index) => {
            static OPENED: std::sync::Mutex<Vec<(usize, Device)>> =
                std::sync::Mutex::new(Vec::new());
            let mut opened = OPENED.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((_, device)) = opened.iter().find(|(i, _)| *i == index) {
                return Ok(device.clone());
            }
            let missing = missing_cuda_libraries();
            if !missing.is_empty() {
                return Err(Error::Config {
                    key: "device".into(),
                    message: format!(
                        "cannot open CUDA device {index}: {} could not be loaded (install the \
                         NVIDIA driver and CUDA 13's cuBLAS and cuRAND, or add their folder to \
                         LD_LIBRARY_PATH); `--device cpu` runs on the CPU",
                        missing.join(", ")
                    ),
                });
            }
            let device = Device::new_cuda(index).map_err(|e| Error::Config {
                key: "device".into(),
                message: format!(
                    "cannot open CUDA device {index} ({e}); `nvidia-smi` lists the GPUs \
                     and their indices, `--device cpu` runs on the CPU"
                ),
            })?;
            opened.push((index, device.clone()));
            Ok(device)
        }
        #[cfg(not(feature = "cuda"))]
        ComputeDevice::Cuda(_) => Err(Error::Config {
            key: "device".into(),
            message: format!(
                "`{device}` needs melora built with CUDA, and this build is CPU-only: \
                 eval \"$(scripts/setup-cuda.sh)\" && cargo build --release --features cuda \
                 (README, \"The CUDA build\"), or run with `--device cpu`"
            ),
        }),
    }
}

/// The shared libraries candle opens with a GPU (the driver, cuBLAS, cuRAND) that
/// cannot be loaded. They are loaded at run time, and cudarc panics on one it cannot
/// find, so they are looked for first.
#[cfg(feature = "cuda")]
fn missing_cuda_libraries() -> Vec<&'static str> {
    use candle_core::cuda_backend::cudarc;
    // SAFETY: each check only tries to load the library under its usual names and
    // drops it again.
    let found = unsafe {
        [
            (
                "the NVIDIA driver (libcuda.so.1)",
                cudarc::driver::sys::is_culib_present(),
            ),
            (
                "cuBLAS (libcublas.so)",
                cudarc::cublas::sys::is_culib_present(),
            ),
            (
                "cuRAND (libcurand.so)",
                cudarc::curand::sys::is_culib_present(),
            ),
        ]
    };
    found
        .iter()
        .filter(|(_, present)| !present)
        .map(|(library, _)| *library)
        .collect()
}

fn lora_settings(config: &Config) -> LoraSettings {
    LoraSettings {
        spec: LoraSpec {
            rank: config.lora.rank,
            alpha: config.lora.alpha,
            dropout: config.lora.dropout,
        },
        target_modules: config.lora.target_modules.clone(),
        init: LoraInit::Peft { seed: config.seed },
    }
}

fn with_selective_recompute(
    config: &Config,
    mut model: Box<dyn FewShotModel>,
) -> Result<Box<dyn FewShotModel>> {
    if config.memory_optimization.checkpointing.selective {
        model.set_selective_recompute(true)?;
    }
    Ok(model)
}

/// The gradient engine of a run over `model`: checkpointed segment sweeps when
/// `memory_optimization.checkpointing.enabled` (an error for models that are not
/// transformer stacks, or layers the model does not have), the whole graph
/// otherwise; the task's own loss.
pub fn build_engine<'m>(
    config: &Config,
    model: &'m dyn FewShotModel,
) -> Result<Box<dyn GradEngine + 'm>> {
    engine_over(
        model,
        config.memory_optimization.checkpointing.plan().as_ref(),
    )
}

/// Checkpointed segment sweeps over `model` with `plan`, the whole graph without.
fn engine_over<'m>(
    model: &'m dyn FewShotModel,
    plan: Option<&CheckpointPlan>,
) -> Result<Box<dyn GradEngine + 'm>> {
    Ok(match plan {
        Some(plan) => Box::new(Checkpointed::new(model, plan)?),
        None => Box::new(WholeGraph::new(model)),
    })
}

/// Outputs of the configured model's head: one per class, or one for the sinusoid
/// regression. A model that cannot read the configured tasks is an error naming the
/// fix (`config::pairing`, which validation applies too). The memory planner sizes the
/// head with it too.
pub(crate) fn model_outputs(config: &Config) -> Result<usize> {
    config::pairing::validate(config)?;
    // A regression network has one output, whatever n_way says.
    Ok(if is_sinusoid(config) {
        1
    } else {
        config.data.n_way
    })
}

/// Whether the configured tasks are the synthetic sinusoid regressions.
pub(crate) fn is_sinusoid(config: &Config) -> bool {
    config::pairing::TaskInputs::of(config) == config::pairing::TaskInputs::Regression
}

/// The input sizes of the built-in dense models: the vision backbones read grey
/// `data.image_size` images (every image source gives grey images);
/// the MLP one input for the sinusoid, or one per feature of a table (read from the
/// file: categorical columns are one-hot encoded over the values they take).
pub(crate) fn builtin_inputs(config: &Config) -> Result<BuiltinInputs> {
    let mut inputs = BuiltinInputs {
        image_size: config.data.image_size,
        ..BuiltinInputs::default()
    };
    if config::pairing::TaskInputs::of(config) == config::pairing::TaskInputs::Images
        && !config.data.synthetic_only
        && config.data.source == config::DataSource::ImageFolder
    {
        inputs.image_channels = crate::data::PhotoTransform::for_config(&config.data).channels;
    }
    if config::pairing::TaskInputs::of(config) == config::pairing::TaskInputs::Rows
        && config::pairing::ModelKind::of(config) == config::pairing::ModelKind::Mlp
    {
        let path = config.data.path.as_deref().ok_or_else(|| Error::Config {
            key: "data.path".into(),
            message: "required when data.source is `tabular`".into(),
        })?;
        let table = crate::data::readers::read_tabular(path, &config.data.label_column)?;
        if table.features.is_empty() {
            return Err(Error::Format {
                path: path.into(),
                message: format!(
                    "no feature columns besides the label column `{}`",
                    config.data.label_column
                ),
            });
        }
        inputs.features = table.features.len();
    }
    Ok(inputs)
}

/// The text encoder: the model folder's `tokenizer.json`, or for built-in models a
/// word-hash tokenisation into their 1000-id vocabulary.
pub fn build_text_encoder(config: &Config) -> Result<Box<dyn EncodeText>> {
    match &config.model.path {
        Some(dir) => Ok(Box::new(TextTokenizer::from_file(
            &dir.join("tokenizer.json"),
            config.model.max_length,
        )?)),
        None => Ok(Box::new(WordHashTokenizer::tiny(config.model.max_length))),
    }
}

fn inner_loop(config: &Config) -> InnerLoop {
    let inner_config = &config.meta_learning.inner;
    let inner = InnerLoop::new(
        config.meta_learning.inner.steps,
        config.meta_learning.inner.lr,
    );
    let accumulation = &config.memory_optimization.gradient_accumulation;
    InnerLoop {
        micro_batch: accumulation.micro_batch,
        second_order_micro_batch: accumulation.second_order_micro_batch,
        head_only: inner_config.adapt == config::InnerAdapt::Head,
        rule: match inner_config.optimizer {
            config::InnerOptimizer::Sgd => InnerStepRule::Sgd,
            config::InnerOptimizer::Adam => InnerStepRule::Adam {
                beta1: inner_config.adam_beta1,
                beta2: inner_config.adam_beta2,
            },
        },
        ..inner
    }
}

/// The meta-learner of `meta_learning.method`; the baselines have none (they only
/// adapt), which is an error naming the fix.
pub fn build_learner(config: &Config) -> Result<Box<dyn MetaLearner>> {
    let inner = inner_loop(config);
    let mode = |mode: InnerMode| match mode {
        InnerMode::FullGraph => MamlMode::FullGraph,
        InnerMode::Recompute => MamlMode::Recompute,
    };
    Ok(match LearnerSpec::of(config) {
        LearnerSpec::Maml { mode: m } => Box::new(Maml {
            inner,
            mode: mode(m),
        }),
        LearnerSpec::MetaSgd { mode: m } => Box::new(MetaSgd {
            inner,
            mode: mode(m),
        }),
        LearnerSpec::Fomaml => Box::new(Fomaml { inner }),
        LearnerSpec::Fsct { .. } => Box::new(fsct_learner(config)),
        LearnerSpec::ProtoNet {
            distance,
            cosine_scale,
        } => Box::new(ProtoNet {
            distance: match distance {
                PrototypeDistance::Euclidean => Distance::SquaredEuclidean,
                PrototypeDistance::Cosine => Distance::Cosine {
                    scale: cosine_scale,
                },
            },
        }),
        LearnerSpec::Reptile => Box::new(Reptile { inner }),
        LearnerSpec::Melora {
            hessian,
            probes,
            damping,
        } => Box::new(Melora {
            inner,
            approximation: match hessian {
                HessianKind::None => HessianApproximation::None,
                HessianKind::Diagonal => HessianApproximation::Diagonal {
                    probes,
                    exact: false,
                },
                HessianKind::GaussNewton => HessianApproximation::GaussNewton,
                HessianKind::BlockDiagonal => HessianApproximation::BlockDiagonal,
            },
            damping,
            clamp: None,
            seed: config.seed,
        }),
        LearnerSpec::Baseline(baseline) => {
            let method = baseline.method();
            return Err(Error::InvalidArgument(format!(
                "`{method}` is a baseline without meta-training: evaluate it with `melora \
                 evaluate --method {method}` or compare it with `melora full` \
                 (meta_learning.method)"
            )));
        }
    })
}

/// The FS-CT learner of `meta_learning.fsct` for the configured task shape.
fn fsct_learner(config: &Config) -> FsctLearner {
    let f = &config.meta_learning.fsct;
    FsctLearner {
        head: FsctConfig {
            // The backbone's width, read from the parameters when they exist.
            dim: 1,
            heads: f.heads,
            dim_head: f.dim_head,
            mlp_dim: f.mlp_dim,
            depth: f.depth,
            n_way: config.data.n_way,
            k_shot: config.data.k_shot,
            attention: if config.meta_learning.method == Method::FsctSoftmax {
                FsctAttention::Softmax
            } else {
                FsctAttention::Cosine
            },
            feature_norm: match f.feature_norm {
                config::FsctFeatureNorm::Classes => FeatureNorm::Classes,
                config::FsctFeatureNorm::Features => FeatureNorm::Features,
            },
        },
        weights: VicWeights {
            cross_entropy: f.lambda_i,
            variance: f.lambda_v,
            covariance: f.lambda_c,
        },
    }
}

/// The parameters a run starts from: the model's initialisation (the head as
/// `model.head_init` says), with MetaSGD's per-entry step sizes (all
/// `meta_learning.inner.lr`) beside them for `metasgd`, FS-CT's head for `fsct_*`.
pub fn initial_params(model: &dyn FewShotModel, config: &Config) -> Result<ParamSet> {
    let mut params = model.init_params(config.seed)?;
    if config.model.head_init != config::HeadInit::Model {
        let Some(weight) = params.get(crate::models::HEAD_WEIGHT) else {
            return Err(Error::Config {
                key: "model.head_init".into(),
                message: format!(
                    "`{}` has no classification head to initialise; set it to model",
                    config.model.name
                ),
            });
        };
        let (classes, features) = weight.dims2()?;
        let std = match config.model.head_init {
            config::HeadInit::Normal => 1.0,
            _ => 0.0,
        };
        crate::models::ClassificationHead::new(features, classes).reset_params(
            std,
            config.seed,
            &mut params,
        )?;
    }
    match config.meta_learning.method {
        Method::FsctCosine | Method::FsctSoftmax => {
            fsct_learner(config).init_head(&mut params, config.seed)?;
            Ok(params)
        }
        Method::Metasgd => MetaSgd {
            inner: inner_loop(config),
            mode: MamlMode::Recompute,
        }
        .with_step_sizes(&params),
        _ => Ok(params),
    }
}

/// Whether every task of the configured source has the same classes, label for label
/// (synthetic domains, sinusoids), so that a head trained across tasks (by
/// pre-training) means something on a new one; data sets test new classes.
pub(crate) fn tasks_share_classes(config: &Config) -> bool {
    let synthetic =
        config.data.synthetic_only || config.data.source == config::DataSource::Synthetic;
    synthetic
        && matches!(
            config.data.synthetic_task,
            config::SyntheticTask::Domains | config::SyntheticTask::Sinusoid
        )
}

/// What adapts to a test task: the learner's inner loop, or a baseline's (fine-tuning:
/// `evaluation.finetune_steps` AdamW steps at `evaluation.finetune_lr`).
/// `pretrain-finetune` adapts the parameters its pre-training gave (see
/// `train::pretrain`): a new head, or everything with `comparison.pretrain.tune: all`.
pub fn build_adapter(config: &Config) -> Result<Box<dyn Adapter>> {
    let (steps, lr) = (
        config.evaluation.finetune_steps,
        config.evaluation.finetune_lr,
    );
    Ok(match config.meta_learning.method {
        Method::Finetune => Box::new(FullFinetune {
            steps,
            lr,
            seed: config.seed,
        }),
        Method::LoraFinetune => Box::new(LoraFinetune {
            steps,
            lr,
            seed: config.seed,
        }),
        Method::NoAdaptation => Box::new(NoAdaptation),
        Method::Prototype => Box::new(Prototype::default()),
        Method::PretrainFinetune => match config.comparison.pretrain.tune {
            PretrainTune::Head => Box::new(HeadFinetune {
                steps,
                lr,
                reset_head: !tasks_share_classes(config),
            }),
            PretrainTune::All => Box::new(Finetune { steps, lr }),
        },
        _ => Box::new(AdapterOf(build_learner(config)?)),
    })
}

/// The fine-tuning baselines' optimiser (`evaluation.finetune_steps` AdamW steps at
/// `evaluation.finetune_lr`) applied to whatever parameters it is given: the
/// `meta-init-finetune` comparison of a meta-trained initialisation.
pub fn build_finetune(config: &Config) -> Box<dyn Adapter> {
    Box::new(Finetune {
        steps: config.evaluation.finetune_steps,
        lr: config.evaluation.finetune_lr,
    })
}

struct AdapterOf(Box<dyn MetaLearner>);

impl Adapter for AdapterOf {
    fn adapt(
        &self,
        engine: &dyn GradEngine,
        params: &ParamSet,
        support: &crate::data::Batch,
        mode: crate::nn::Mode,
    ) -> Result<ParamSet> {
        self.0.adapt(engine, params, support, mode)
    }

    fn predict(
        &self,
        engine: &dyn GradEngine,
        adapted: &ParamSet,
        batch: &crate::data::Batch,
        mode: crate::nn::Mode,
    ) -> Result<candle_core::Tensor> {
        self.0.predict(engine, adapted, batch, mode)
    }
}

/// The outer optimiser, schedule and clipping of `meta_learning.outer`, with dynamic
/// loss scaling under `memory_optimization.precision: f16`.
pub fn build_outer(config: &Config) -> Result<OuterUpdate> {
    let outer = &config.meta_learning.outer;
    Ok(OuterUpdate {
        optimizer: Optimizer::new(match outer.optimizer {
            OuterOptimizer::Adamw => OptimizerKind::adamw(outer.weight_decay),
            OuterOptimizer::Sgd => OptimizerKind::Sgd {
                weight_decay: outer.weight_decay,
            },
        }),
        schedule: match outer.schedule {
            LrSchedule::Constant => Schedule::Constant,
            LrSchedule::Cosine => Schedule::Cosine,
            LrSchedule::WarmupCosine => Schedule::WarmupCosine {
                warmup: outer.warmup_steps,
            },
        },
        lr: outer.lr,
        grad_clip: outer.grad_clip,
        total_steps: config.meta_learning.num_iterations,
        loss_scale: loss_scaler(config)?,
    })
}

/// Dynamic loss scaling with f16 activations; none otherwise (bf16 has f32's range).
fn loss_scaler(config: &Config) -> Result<Option<LossScaler>> {
    let memory = &config.memory_optimization;
    if memory.precision != Precision::F16 {
        return Ok(None);
    }
    let scaling = &memory.loss_scaling;
    Ok(Some(LossScaler::new(
        scaling.initial_scale,
        scaling.growth_interval,
    )?))
}

/// The objects of a run, built once from its configuration: what `train`,
/// `evaluate`, `profile`, the memory benchmark and the planner work with.
///
/// ```
/// # melora::init();
/// use melora::config::Config;
/// use melora::run::Run;
///
/// let config = Config::from_yaml_str("model:\n  name: tiny-bert\n")?;
/// let mut run = Run::build(&config)?;
/// let source = melora::run::build::build_sources(&config, &[melora::data::Split::Train])?.remove(0);
/// let tasks: Vec<_> = (0..2).map(|i| source.episode(i)).collect::<Result<_, _>>()?;
/// // The engine borrows only the model, so the outer update stays free to change
/// // (`run.engine()` is the same engine, borrowing the whole run).
/// let engine = melora::run::build::build_engine(&config, run.model.as_ref())?;
/// let learner = run.learner.as_deref().expect("MAML meta-trains");
/// let mode = melora::run::training_mode(config.seed, 0, tasks.len());
/// let (next, stats) =
///     melora::run::meta_step(learner, engine.as_ref(), &run.params, &tasks, &mut run.outer, mode)?;
/// assert!(stats.query_loss.is_finite() && next.len() == run.params.len());
/// # Ok::<(), melora::Error>(())
/// ```
pub struct Run {
    /// The model (its frozen base inside).
    pub model: Box<dyn FewShotModel>,
    /// The parameters the run starts from.
    pub params: ParamSet,
    /// The meta-learner; `None` for the baselines, which only adapt.
    pub learner: Option<Box<dyn MetaLearner>>,
    /// What adapts to a test task: the learner's inner loop, or a baseline's.
    pub adapter: Box<dyn Adapter>,
    /// The outer optimiser, schedule, clipping and loss scale.
    pub outer: OuterUpdate,
    /// The checkpointed layers, when gradient checkpointing is on.
    checkpoint: Option<CheckpointPlan>,
}

impl Run {
    /// Everything `config` configures but the episodes ([`build_sources`]): the
    /// model, its initial parameters, the learner (or the baseline's adapter) and the
    /// outer update; the engine is checked against the model.
    pub fn build(config: &Config) -> Result<Run> {
        Self::with_model(config, build_model(config)?)
    }

    /// [`Run::build`] over a model built apart (the planner's smaller instances).
    pub fn with_model(config: &Config, model: Box<dyn FewShotModel>) -> Result<Run> {
        // A checkpointing plan the model cannot follow fails here, before any work.
        build_engine(config, model.as_ref())?;
        let meta_trains = LearnerSpec::of(config).meta_trains();
        Ok(Run {
            params: initial_params(model.as_ref(), config)?,
            learner: meta_trains.then(|| build_learner(config)).transpose()?,
            adapter: build_adapter(config)?,
            outer: build_outer(config)?,
            checkpoint: config.memory_optimization.checkpointing.plan(),
            model,
        })
    }

    /// The gradient engine over the model: checkpointed segments or the whole graph.
    pub fn engine(&self) -> Result<Box<dyn GradEngine + '_>> {
        engine_over(self.model.as_ref(), self.checkpoint.as_ref())
    }
}

/// The episodes of each of `splits` as a run draws them, texts tokenised by the
/// model's encoder ([`build_text_encoder`]).
pub fn build_sources(
    config: &Config,
    splits: &[crate::data::Split],
) -> Result<Vec<std::sync::Arc<dyn crate::data::EpisodeSource>>> {
    let encoder = build_text_encoder(config)?;
    crate::data::episode_sources(
        &config.data,
        config.seed,
        splits,
        encoder.as_ref(),
        &device(config)?,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::EpisodeSource;

    /// The CPU opens everywhere; in a CPU-only build CUDA is a config error that says
    /// how to build with it; the planner refuses a GPU run (it measures the host heap).
    #[test]
    fn devices_open_or_say_why_not() {
        assert!(open_device(ComputeDevice::Cpu).unwrap().is_cpu());
        #[cfg(not(feature = "cuda"))]
        match open_device(ComputeDevice::Cuda(1)) {
            Err(Error::Config { key, message }) => {
                assert_eq!(key, "device");
                assert!(
                    message.contains("`cuda:1` needs melora built with CUDA")
                        && message.contains("--features cuda")
                        && message.contains("--device cpu"),
                    "{message}"
                );
            }
            other => panic!("expected a config error, got {other:?}"),
        }
        let config = Config {
            device: ComputeDevice::Cuda(0),
            ..Config::default()
        };
        match crate::plan::plan(&config) {
            Err(Error::Config { key, message }) => {
                assert_eq!(key, "device");
                assert!(message.contains("--device cpu"), "{message}");
            }
            other => panic!(
                "expected a config error, got {:?}",
                other.map(|p| p.peak_bytes)
            ),
        }
    }

    /// `memory_optimization.precision` and `model.quantization` reach the model and the
    /// outer update: f32 trainable tensors and logits over a bf16/f16 or int8 base,
    /// a loss scaler with f16 only.
    /// `model.head_init: normal` draws the head's weight from N(0, 1), seeded, with a
    /// zero bias, `zero` zeroes both, and both leave every other parameter as the model's own
    /// initialisation (Conv4's head: N(0, 0.02²)) has it; a model without a
    /// classification head refuses them by key.
    #[test]
    fn head_init_zeroes_or_draws_the_head() {
        let mut config = Config::default();
        config.model.name = "conv4".into();
        config.data.synthetic_task = config::SyntheticTask::Images;
        let model = build_model(&config).unwrap();
        let own = initial_params(model.as_ref(), &config).unwrap();
        config.model.head_init = config::HeadInit::Zero;
        let zero = initial_params(model.as_ref(), &config).unwrap();
        config.model.head_init = config::HeadInit::Normal;
        let random = initial_params(model.as_ref(), &config).unwrap();
        let again = initial_params(model.as_ref(), &config).unwrap();
        let values = |p: &ParamSet, name: &str| -> Vec<f32> {
            p.require(name)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        for name in [crate::models::HEAD_WEIGHT, crate::models::HEAD_BIAS] {
            assert!(values(&zero, name).iter().all(|&v| v == 0.0));
            assert_eq!(values(&random, name), values(&again, name));
        }
        let own = values(&own, crate::models::HEAD_WEIGHT);
        assert!(own.iter().all(|v| v.abs() < 0.2) && own.iter().any(|&v| v != 0.0));
        let drawn = values(&random, crate::models::HEAD_WEIGHT);
        let n = drawn.len() as f64;
        let mean = drawn.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = drawn
            .iter()
            .map(|&v| (v as f64 - mean).powi(2))
            .sum::<f64>()
            / n;
        assert!(mean.abs() < 0.2 && (var - 1.0).abs() < 0.25, "{mean} {var}");
        assert!(values(&random, crate::models::HEAD_BIAS)
            .iter()
            .all(|&v| v == 0.0));
        for (name, t) in zero.iter() {
            if !name.starts_with("classifier.") {
                assert_eq!(values(&zero, name), values(&random, name), "{name}");
                assert_eq!(t.dims(), random.require(name).unwrap().dims());
            }
        }
        let mut sinusoid = Config::default();
        sinusoid.model.name = "mlp".into();
        sinusoid.data.synthetic_task = config::SyntheticTask::Sinusoid;
        sinusoid.model.head_init = config::HeadInit::Normal;
        let mlp = build_model(&sinusoid).unwrap();
        if mlp
            .init_params(1)
            .unwrap()
            .get(crate::models::HEAD_WEIGHT)
            .is_none()
        {
            let err = initial_params(mlp.as_ref(), &sinusoid).unwrap_err();
            assert!(err.to_string().contains("model.head_init"), "{err}");
        }
    }

    #[test]
    fn precision_settings_reach_the_model_and_the_outer_update() {
        let base = Config::default();
        let reference = build_model(&base).unwrap();
        let params = reference.init_params(base.seed).unwrap();
        for (precision, quantization, scaled) in [
            (Precision::Bf16, config::Quantization::None, false),
            (Precision::F16, config::Quantization::None, true),
            (Precision::F32, config::Quantization::Int8, false),
            (Precision::Bf16, config::Quantization::Int8, false),
        ] {
            let mut config = base.clone();
            config.memory_optimization.precision = precision;
            config.model.quantization = quantization;
            config.validate().unwrap();
            let model = build_model(&config).unwrap();
            let own = model.init_params(config.seed).unwrap();
            assert_eq!(own.sub(&params).unwrap().norm().unwrap(), 0.0);
            assert!(own.iter().all(|(_, t)| t.dtype() == DType::F32));
            let task = crate::data::SyntheticText::default().episode(0).unwrap();
            let logits = model
                .logits(&params, &task.query, crate::nn::Mode::Eval)
                .unwrap();
            assert_eq!(logits.dtype(), DType::F32, "{precision} {quantization}");
            let outer = build_outer(&config).unwrap();
            assert_eq!(outer.loss_scale.is_some(), scaled, "{precision}");
        }
    }

    fn config(yaml: &str) -> Config {
        Config::from_yaml_str(yaml).unwrap()
    }

    #[test]
    fn checkpointing_wraps_transformers_and_refuses_what_it_cannot_do() {
        let on = "model:\n  name: tiny-bert\nmemory_optimization:\n  checkpointing:\n    \
                  enabled: true\n";
        let engine = |yaml: &str| -> Result<bool> {
            let config = config(yaml);
            let model = build_model(&config)?;
            // Checkpointed and whole-graph engines agree; only the checkpointed one
            // refuses a plan the model cannot follow.
            build_engine(&config, &*model).map(|_| config.memory_optimization.checkpointing.enabled)
        };
        assert!(engine(on).unwrap());
        assert!(!engine("model:\n  name: tiny-bert\n").unwrap());
        let err = engine(&format!("{on}    layers: [1, 2]\n"))
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("layer 2")
                && err.contains("0..=1")
                && err.contains("checkpointing.layers"),
            "{err}"
        );
        // Vision backbones are checkpointed per stage; the MLP has no chain to cut.
        assert!(engine(
            "model:\n  name: resnet12\ndata:\n  synthetic_task: images\nmemory_optimization:\n  \
             checkpointing:\n    enabled: true\n",
        )
        .unwrap());
        let err = engine(
            "model:\n  name: mlp\ndata:\n  synthetic_task: sinusoid\nmemory_optimization:\n  \
             checkpointing:\n    enabled: true\n",
        )
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains("checkpointing.enabled to false"), "{err}");
    }

    /// Training with checkpointing takes the same steps as without (f32: to rounding).
    #[test]
    fn training_with_checkpointing_follows_the_same_path() {
        let dir = tempfile::tempdir().unwrap();
        let run = |checkpointing: bool, name: &str| {
            let yaml = format!(
                "seed: 3\nmodel:\n  name: tiny-gpt2\n  max_length: 16\nlora:\n  rank: 2\n\
                 meta_learning:\n  method: maml\n  meta_batch_size: 2\n  num_iterations: 2\n  \
                 inner:\n    steps: 2\n    lr: 0.5\n    mode: recompute\n\
                 data:\n  n_way: 3\n  k_shot: 2\n  n_query: 2\n\
                 evaluation:\n  episodes: 2\n  eval_every: 2\n\
                 memory_optimization:\n  checkpointing:\n    enabled: {checkpointing}\n"
            );
            let mut config = config(&yaml);
            config.tracking.output_dir = dir.path().join(name);
            crate::train::train(&config, &crate::train::TrainOptions::default())
                .unwrap()
                .params
        };
        let (plain, checkpointed) = (run(false, "plain"), run(true, "checkpointed"));
        let gap = checkpointed.sub(&plain).unwrap().norm().unwrap() / plain.norm().unwrap();
        assert!(gap < 1e-5, "checkpointed training differs by {gap:.3e}");
    }

    /// Conv4 is built for data.image_size (it read only 28×28 before and failed at the
    /// first forward pass of other sizes), and the planner plans that size.
    #[test]
    fn conv4_trains_on_images_of_the_configured_size() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = config(
            "model:\n  name: conv4\nmeta_learning:\n  method: fomaml\n  meta_batch_size: 1\n  \
             num_iterations: 2\ndata:\n  synthetic_task: images\n  image_size: 36\n  n_way: 3\n  \
             k_shot: 1\n  n_query: 1\nevaluation:\n  episodes: 2\n  eval_every: 2\n  \
             val_episodes: 1\n",
        );
        config.tracking.output_dir = dir.path().to_path_buf();
        let summary = crate::train::train(&config, &crate::train::TrainOptions::default()).unwrap();
        assert_eq!(summary.iterations, 2);
        // 36 → 18 → 9 → 4 → 2: a head over 64·2·2 features.
        assert_eq!(
            summary.params.require("classifier.weight").unwrap().dims(),
            [3, 256]
        );
        let plan = crate::plan::plan(&config).unwrap();
        assert!(plan.peak_bytes > 0);
    }

    /// The MLP reads tabular rows, one input per feature (categorical columns one-hot),
    /// and classifies them; the planner plans it.
    #[test]
    fn the_mlp_trains_on_a_table() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("table.csv");
        let mut rows = String::from("size,weight,colour,kind\n");
        for class in 0..8 {
            for i in 0..6 {
                let colour = if i % 2 == 0 { "red" } else { "blue" };
                rows.push_str(&format!("{},{}.5,{colour},k{class}\n", class * 10 + i, i));
            }
        }
        std::fs::write(&path, rows).unwrap();
        let mut config = config(&format!(
            "model:\n  name: mlp\nmeta_learning:\n  method: maml\n  meta_batch_size: 2\n  \
             num_iterations: 2\n  inner:\n    lr: 0.1\ndata:\n  source: tabular\n  path: {}\n  \
             label_column: kind\n  n_way: 2\n  k_shot: 2\n  n_query: 2\n  train_fraction: 0.5\n  \
             val_fraction: 0.25\nevaluation:\n  episodes: 2\n  eval_every: 2\n  \
             val_episodes: 1\n",
            path.display()
        ));
        config.tracking.output_dir = dir.path().join("runs");
        assert_eq!(builtin_inputs(&config).unwrap().features, 4);
        let summary = crate::train::train(&config, &crate::train::TrainOptions::default()).unwrap();
        assert_eq!(
            summary.params.require("layers.0.weight").unwrap().dims(),
            [40, 4]
        );
        assert_eq!(
            summary.params.require("classifier.weight").unwrap().dims(),
            [2, 40]
        );
        let evaluation = crate::train::evaluate(
            &config,
            &crate::train::EvaluateOptions {
                checkpoint: Some(summary.run_dir.join("last")),
                ..Default::default()
            },
            &mut |_| {},
        )
        .unwrap();
        assert!(evaluation.accuracy.is_some());
        assert!(crate::plan::plan(&config).unwrap().peak_bytes > 0);
    }

    /// MetaSGD is a method of the configuration: it trains θ and its per-entry step
    /// sizes (saved in the checkpoint, which evaluation reads back), and is planned.
    #[test]
    fn metasgd_trains_its_step_sizes_and_evaluates_its_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = config(
            "seed: 2\nmodel:\n  name: tiny-bert\n  max_length: 8\nlora:\n  rank: 2\n\
             meta_learning:\n  method: metasgd\n  meta_batch_size: 2\n  num_iterations: 3\n  \
             inner:\n    lr: 0.5\ndata:\n  synthetic_task: domains\n  n_way: 3\n  k_shot: 2\n  \
             n_query: 2\nevaluation:\n  episodes: 2\n  eval_every: 3\n  val_episodes: 1\n",
        );
        config.tracking.output_dir = dir.path().to_path_buf();
        let summary = crate::train::train(&config, &crate::train::TrainOptions::default()).unwrap();
        let steps: Vec<_> = summary
            .params
            .iter()
            .filter(|(n, _)| n.starts_with(crate::meta::STEP_SIZE_PREFIX))
            .collect();
        assert_eq!(steps.len() * 2, summary.params.len());
        let moved = steps.iter().any(|(_, t)| {
            let gap = (*t - 0.5)
                .unwrap()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            gap > 0.0
        });
        assert!(moved, "no step size was trained");
        let evaluation = crate::train::evaluate(
            &config,
            &crate::train::EvaluateOptions {
                checkpoint: Some(summary.run_dir.join("last")),
                ..Default::default()
            },
            &mut |_| {},
        )
        .unwrap();
        assert_eq!(evaluation.episodes.len(), 2);
        let plan = crate::plan::plan(&config).unwrap();
        assert_eq!(plan.variant, crate::config::Variant::Metasgd);
        assert_eq!(plan.trainable_parameters as usize, summary.params.numel());
    }
}
