//! Which models read which tasks: a configuration whose model cannot consume its data
//! source, or that sets options the model does not have, is refused at validation
//! (with the key, what is allowed and the fix) instead of being accepted and then
//! ignored or failing at the first forward pass.
//!
//! | model | reads | from |
//! |---|---|---|
//! | transformers (`tiny-bert`, …, a Hugging Face folder) | token sequences | synthetic `text`, `jsonl`, `csv`, `wordnet` |
//! | vision backbones (`conv4`, `conv6`, `resnet12`, `resnet18`, `resnet34`) | images of `data.image_size` pixels (at least 16 for the ConvNets and ResNet-12) | synthetic `images`, `omniglot`, `idx`, `image_folder` |
//! | `mlp` | feature rows | synthetic `sinusoid` (one input, regression), `tabular` (one input per feature, classification) |

use super::validate::invalid;
use super::{
    Backbone, Config, DataSource, InnerAdapt, LoraConfig, Method, Quantization, SyntheticTask,
};
use crate::Result;

/// What a configuration's tasks give a model to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TaskInputs {
    /// Token sequences (text).
    Tokens,
    /// Square images (grey, or RGB from `image_folder`).
    Images,
    /// The sinusoid's one real input, with a real target.
    Regression,
    /// Feature rows of a table, with a class label.
    Rows,
}

impl TaskInputs {
    /// The inputs `config`'s data section makes.
    pub(crate) fn of(config: &Config) -> Self {
        let data = &config.data;
        if data.synthetic_only || data.source == DataSource::Synthetic {
            return match data.synthetic_task {
                SyntheticTask::Text | SyntheticTask::Domains => Self::Tokens,
                SyntheticTask::Sinusoid => Self::Regression,
                SyntheticTask::Images => Self::Images,
            };
        }
        match data.source {
            DataSource::Synthetic | DataSource::Jsonl | DataSource::Csv | DataSource::Wordnet => {
                Self::Tokens
            }
            DataSource::Omniglot | DataSource::Idx | DataSource::ImageFolder => Self::Images,
            DataSource::Tabular => Self::Rows,
        }
    }
}

/// The kinds of model, by what they read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ModelKind {
    /// A transformer with LoRA (built in, or a Hugging Face folder).
    Transformer,
    /// A built-in vision backbone (Conv4, Conv6, ResNet-12/18/34), every parameter
    /// trained.
    Vision(Backbone),
    /// The built-in fully connected network, every parameter trained.
    Mlp,
}

impl ModelKind {
    /// The kind of `config`'s model.
    pub(crate) fn of(config: &Config) -> Self {
        match (&config.model.path, config.model.name.as_str()) {
            (None, "mlp") => Self::Mlp,
            (None, name) => Backbone::from_name(name).map_or(Self::Transformer, Self::Vision),
            _ => Self::Transformer,
        }
    }

    /// Whether every parameter is trained (no frozen base, no LoRA).
    pub(crate) fn trains_everything(self) -> bool {
        matches!(self, Self::Vision(_) | Self::Mlp)
    }
}

/// Refuses a model that cannot read the configured tasks, LoRA settings for a model
/// without adapters, and an image size the vision backbone cannot read.
pub(crate) fn validate(config: &Config) -> Result<()> {
    let model = ModelKind::of(config);
    let inputs = TaskInputs::of(config);
    let name = &config.model.name;
    let source = describe_source(config);
    match (model, inputs) {
        (ModelKind::Transformer, TaskInputs::Tokens)
        | (ModelKind::Vision(_), TaskInputs::Images)
        | (ModelKind::Mlp, TaskInputs::Regression | TaskInputs::Rows) => {}
        (ModelKind::Transformer, TaskInputs::Regression) => {
            return Err(invalid(
                "data.synthetic_task",
                format!(
                    "sinusoid regression tasks have one real input, which `{name}` cannot \
                     read; use model.name: mlp"
                ),
            ))
        }
        (ModelKind::Transformer, TaskInputs::Rows) => {
            return Err(invalid(
                "data.source",
                format!(
                    "tabular feature rows are read by the mlp model only, not by the text \
                     model `{name}`; use model.name: mlp"
                ),
            ))
        }
        (ModelKind::Transformer, TaskInputs::Images) => {
            return Err(invalid(
                "model.name",
                format!(
                    "`{name}` reads token sequences, but {source} gives images; use a vision \
                     backbone (model.name: conv4, conv6, resnet12, resnet18 or resnet34), or a \
                     text source (data.source jsonl, csv, wordnet or synthetic \
                     text)"
                ),
            ))
        }
        (ModelKind::Vision(_), _) => {
            return Err(invalid(
                "model.name",
                format!(
                    "{name} reads images, but {source} does not give images; use data.source \
                     omniglot, idx or image_folder, or data.synthetic_task: images"
                ),
            ))
        }
        (ModelKind::Mlp, _) => {
            return Err(invalid(
                "model.name",
                format!(
                    "mlp reads feature rows (data.source: tabular) or the sinusoid's one input \
                     (data.synthetic_task: sinusoid), but {source} gives {}; use a transformer \
                     for text or conv4 for images",
                    if inputs == TaskInputs::Images {
                        "images"
                    } else {
                        "token sequences"
                    }
                ),
            ))
        }
    }
    if model.trains_everything() {
        if let Some(key) = changed_lora_key(&config.lora) {
            return Err(invalid(
                key,
                format!(
                    "{name} trains every parameter and has no LoRA adapters; remove the lora \
                     settings (or use a transformer such as tiny-bert)"
                ),
            ));
        }
        if !config.comparison.ablation.lora_ranks.is_empty() {
            return Err(invalid(
                "comparison.ablation.lora_ranks",
                format!("{name} has no LoRA adapters to vary the rank of; empty this list"),
            ));
        }
    }
    if let Some(why) = method_does_not_apply(config) {
        return Err(invalid("meta_learning.method", why));
    }
    if config.evaluation.early_stopping_patience.is_some() && !config.data.has_validation_classes()
    {
        return Err(invalid(
            "evaluation.early_stopping_patience",
            "early stopping watches the validation score, and data.val_fraction: 0 keeps no \
             validation classes; unset one of them",
        ));
    }
    let metric = matches!(
        config.meta_learning.method,
        Method::Protonet | Method::FsctCosine | Method::FsctSoftmax
    );
    if metric
        && config
            .memory_optimization
            .gradient_accumulation
            .micro_batch
            .is_some()
    {
        return Err(invalid(
            "memory_optimization.gradient_accumulation.micro_batch",
            format!(
                "{} scores a task's support and query sets as wholes (class means, \
                 attention over the queries), so it does not split them into \
                 micro-batches; unset it (checkpointing lowers the metric learners' \
                 memory instead)",
                config.meta_learning.method
            ),
        ));
    }
    if let ModelKind::Vision(backbone) = model {
        let min = backbone.min_image_size();
        if config.data.image_size < min {
            return Err(invalid(
                "data.image_size",
                format!(
                    "{name} halves the image four times with 2×2 pooling, so it needs at \
                     least {min} pixels, got {}",
                    config.data.image_size
                ),
            ));
        }
    }
    Ok(())
}

/// Why `config`'s method cannot run on its model and data, if it cannot: a baseline
/// that does not apply (`melora full` skips such a baseline of
/// `comparison.baselines`, saying why; as the configured method it is an error).
pub(crate) fn method_does_not_apply(config: &Config) -> Option<String> {
    let name = &config.model.name;
    let data = &config.data;
    match config.meta_learning.method {
        Method::LoraFinetune if ModelKind::of(config).trains_everything() => Some(format!(
            "lora-finetune trains a fresh adapter on a frozen base, which {name} does not \
             have (every parameter is trained); use finetune or pretrain-finetune"
        )),
        Method::Finetune if config.model.quantization == Quantization::Int8 => Some(
            "finetune trains every weight of the base model, which model.quantization: int8 \
             keeps frozen; use lora-finetune, or model.quantization: none"
                .into(),
        ),
        Method::PretrainFinetune
            if (data.synthetic_only || data.source == DataSource::Synthetic)
                && matches!(
                    data.synthetic_task,
                    SyntheticTask::Text | SyntheticTask::Images
                ) =>
        {
            Some(format!(
                "pretrain-finetune trains a head over fixed classes, but synthetic `{}` tasks \
                 make new classes for every task; use a data set, or data.synthetic_task: \
                 domains or sinusoid",
                data.synthetic_task
            ))
        }
        Method::Reptile | Method::Metasgd
            if config.meta_learning.inner.adapt == InnerAdapt::Head =>
        {
            Some(format!(
                "meta_learning.inner.adapt: head (ANIL) applies to maml, fomaml and melora; {}",
                if config.meta_learning.method == Method::Reptile {
                    "Reptile moves towards the adapted parameters, so with only the head \
                     adapted the rest of the network would never be trained"
                } else {
                    "metasgd learns a step size for every parameter entry instead"
                }
            ))
        }
        Method::Prototype | Method::Protonet | Method::FsctCosine | Method::FsctSoftmax
            if TaskInputs::of(config) == TaskInputs::Regression =>
        {
            Some(format!(
                "{} classifies by class means and has no answer for regression tasks",
                config.meta_learning.method
            ))
        }
        _ => None,
    }
}

/// The first `lora` key whose value differs from its default.
fn changed_lora_key(lora: &LoraConfig) -> Option<&'static str> {
    let default = LoraConfig::default();
    if lora.rank != default.rank {
        Some("lora.rank")
    } else if lora.alpha != default.alpha {
        Some("lora.alpha")
    } else if lora.dropout != default.dropout {
        Some("lora.dropout")
    } else if lora.target_modules != default.target_modules {
        Some("lora.target_modules")
    } else {
        None
    }
}

/// `data.source \`x\`` or `synthetic \`task\`` tasks, for messages.
fn describe_source(config: &Config) -> String {
    let data = &config.data;
    if data.synthetic_only || data.source == DataSource::Synthetic {
        format!("data.synthetic_task `{}`", data.synthetic_task)
    } else {
        format!("data.source `{}`", data.source)
    }
}
