//! From a [`Config`] to the sizes the simulation needs: the model's architecture
//! (a built-in model's configuration, or a model folder's `config.json` and the
//! header of its safetensors file), the resolved LoRA targets and the task's batches.

use std::io::Read;
use std::path::Path;

use serde::de::DeserializeOwned;

use super::models::{
    layer_count, Family, Inputs, LoraPlan, MlpShape, ModelSpec, Precision, SimBatch, SimModel,
    Source,
};
use super::sim::{Category, DType, Sim, SimDType};
use crate::config::{self, Config, DataSource};
use crate::data::SyntheticText;
use crate::models::conv4::Conv4Config;
use crate::models::{bert, distilbert, gpt2, t5, Activation};
use crate::{Error, Result};

/// What loading the weights costs before the model exists.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct LoadSpec {
    /// The weights file, read whole.
    pub(crate) file_bytes: u64,
    /// Its tensors in the file's dtype.
    pub(crate) tensor_bytes: u64,
    /// The largest tensor converted to the model's dtype (alive with the rest).
    pub(crate) conversion_scratch: u64,
    /// Its tensors in the model's dtype (floats converted), as kept.
    pub(crate) kept_bytes: u64,
}

/// Everything the simulation needs to know of a configuration.
#[derive(Debug, Clone)]
pub(crate) struct Spec {
    /// The model's name or folder.
    pub(crate) name: String,
    /// Architecture, LoRA, head, dtype.
    pub(crate) model: ModelSpec,
    /// One task's support batch.
    pub(crate) support: Inputs,
    /// One task's query batch.
    pub(crate) query: Inputs,
    /// Loading costs.
    pub(crate) load: LoadSpec,
    /// With gradient checkpointing, the layers whose input the forward pass keeps
    /// (`CheckpointPlan::boundaries`).
    pub(crate) checkpoint: Option<Vec<usize>>,
}

impl Spec {
    /// Tokens per sequence, for text models.
    pub(crate) fn sequence_length(&self) -> Option<usize> {
        match self.support {
            Inputs::Tokens { t, .. } => Some(t),
            Inputs::Images { .. } | Inputs::Dense { .. } => None,
        }
    }
}

/// A float type's name in safetensors headers.
fn safetensors_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F64 => "F64",
        DType::BF16 => "BF16",
        DType::F16 => "F16",
        _ => "F32",
    }
}

/// `run::build::model_precision`: `model.dtype` throughout, or with
/// `memory_optimization.precision` bf16/f16 a frozen base and activations in that
/// type beside f32 trainable tensors; int8 frozen matrices with `model.quantization`.
pub(crate) fn precision_of(config: &Config) -> Precision {
    let model = match config.model.dtype {
        config::DType::F32 => DType::F32,
        config::DType::F64 => DType::F64,
        config::DType::Bf16 => DType::BF16,
        config::DType::F16 => DType::F16,
    };
    let mut precision = match config.memory_optimization.precision {
        config::Precision::F32 => Precision::uniform(model),
        config::Precision::Bf16 => Precision {
            frozen: DType::BF16,
            trainable: DType::F32,
            int8: false,
        },
        config::Precision::F16 => Precision {
            frozen: DType::F16,
            trainable: DType::F32,
            int8: false,
        },
    };
    precision.int8 = config.model.quantization == config::Quantization::Int8;
    precision
}

fn parse<T: DeserializeOwned>(value: serde_json::Value, what: &str) -> Result<T> {
    serde_json::from_value(value).map_err(|e| Error::Model(format!("{what}: {e}")))
}

/// The family of a `config.json`, refused where the model itself would refuse it
/// (heads that do not divide the width, an unknown activation, T5's buckets).
fn family_from(kind: &str, value: serde_json::Value, origin: &str) -> Result<Family> {
    let family = parse_family(kind, value, origin)?;
    match &family {
        Family::Bert(c) => {
            c.validate()?;
            Activation::from_hf(&c.hidden_act)?;
        }
        Family::DistilBert(c) => {
            c.validate()?;
            Activation::from_hf(&c.activation)?;
        }
        Family::Gpt2(c) => {
            c.validate()?;
            Activation::from_hf(&c.activation_function)?;
        }
        Family::T5(c) => {
            c.validate()?;
            c.feed_forward()?;
        }
        Family::Conv4(_) | Family::Mlp(_) => {}
    }
    Ok(family)
}

fn parse_family(kind: &str, value: serde_json::Value, origin: &str) -> Result<Family> {
    Ok(match kind {
        "bert" => Family::Bert(parse(
            value,
            &format!("{origin} is not a valid bert config"),
        )?),
        "distilbert" => Family::DistilBert(parse(
            value,
            &format!("{origin} is not a valid distilbert config"),
        )?),
        "gpt2" => Family::Gpt2(parse(
            value,
            &format!("{origin} is not a valid gpt2 config"),
        )?),
        "t5" => Family::T5(parse(value, &format!("{origin} is not a valid t5 config"))?),
        other => {
            return Err(Error::Model(format!(
                "unsupported architecture `{other}` in {origin}; supported model_type values: {}",
                crate::models::load::SUPPORTED_FAMILIES.join(", ")
            )))
        }
    })
}

fn default_targets(family: &Family) -> &'static [&'static str] {
    match family {
        Family::Bert(_) => bert::DEFAULT_TARGETS,
        Family::DistilBert(_) => distilbert::DEFAULT_TARGETS,
        Family::Gpt2(_) => gpt2::DEFAULT_TARGETS,
        Family::T5(_) => t5::DEFAULT_TARGETS,
        Family::Conv4(_) | Family::Mlp(_) => &[],
    }
}

fn family_name(family: &Family) -> &'static str {
    match family {
        Family::Bert(_) => "bert",
        Family::DistilBert(_) => "distilbert",
        Family::Gpt2(_) => "gpt2",
        Family::T5(_) => "t5",
        Family::Conv4(_) => "conv4",
        Family::Mlp(_) => "mlp",
    }
}

/// Sizes of the tensors of a safetensors file, read from its header only.
fn safetensors_sizes(path: &Path, dtype: DType) -> Result<LoadSpec> {
    let format = |message: String| Error::Format {
        path: path.into(),
        message,
    };
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let file_bytes = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut len = [0u8; 8];
    file.read_exact(&mut len)
        .map_err(|e| format(format!("not a safetensors file: {e}")))?;
    let header_len = u64::from_le_bytes(len);
    if header_len > file_bytes.saturating_sub(8) || header_len > 1 << 30 {
        return Err(format(
            "not a safetensors file: header length out of range".into(),
        ));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header)
        .map_err(|e| format(format!("cannot read the safetensors header: {e}")))?;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|e| format(format!("malformed safetensors header: {e}")))?;
    let mut load = LoadSpec {
        file_bytes,
        ..LoadSpec::default()
    };
    for (name, entry) in &header {
        if name == "__metadata__" {
            continue;
        }
        let stored = entry.get("dtype").and_then(|d| d.as_str()).unwrap_or("F32");
        let elems: u64 = entry
            .get("shape")
            .and_then(|s| s.as_array())
            .map(|s| {
                s.iter()
                    .filter_map(|d| d.as_u64())
                    .try_fold(1u64, |acc, d| acc.checked_mul(d))
            })
            .unwrap_or(Some(0))
            .ok_or_else(|| format(format!("tensor `{name}` has an impossible shape")))?;
        let bytes_per = match stored {
            "F64" | "I64" | "U64" => 8,
            "F32" | "I32" | "U32" => 4,
            "F16" | "BF16" | "I16" | "U16" => 2,
            _ => 1,
        };
        load.tensor_bytes = load
            .tensor_bytes
            .saturating_add(elems.saturating_mul(bytes_per));
        let float = matches!(stored, "F64" | "F32" | "F16" | "BF16");
        let kept = elems.saturating_mul(if float { dtype.bytes() } else { bytes_per });
        load.kept_bytes = load.kept_bytes.saturating_add(kept);
        if float && stored != safetensors_name(dtype) {
            load.conversion_scratch = load.conversion_scratch.max(kept);
        }
    }
    // The tensors are stored after the header: they cannot be larger than the file.
    if load.tensor_bytes > file_bytes {
        return Err(format(format!(
            "the header describes {} bytes of tensors, but the file has {file_bytes}",
            load.tensor_bytes
        )));
    }
    Ok(load)
}

/// The sizes of `config`'s run.
pub(crate) fn model_spec(config: &Config) -> Result<Spec> {
    let precision = precision_of(config);
    // Classes of the head, or one output for regression; a model that cannot read the
    // configured tasks is refused here as `build_model` refuses it.
    let outputs = crate::run::build::model_outputs(config)?;
    let (name, family, weights_file) = match &config.model.path {
        Some(dir) => {
            let path = dir.join("config.json");
            let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
            let value: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| Error::Format {
                    path: path.clone(),
                    message: format!("not JSON: {e}"),
                })?;
            let kind = value
                .get("model_type")
                .and_then(|v| v.as_str())
                .unwrap_or("")
                .to_string();
            let family = family_from(&kind, value, &path.display().to_string())?;
            (
                dir.display().to_string(),
                family,
                Some(dir.join("model.safetensors")),
            )
        }
        None if config.model.name == "conv4" => (
            "conv4".to_string(),
            Family::Conv4(Conv4Config {
                image_size: config.data.image_size,
                ..Conv4Config::default()
            }),
            None,
        ),
        None if config.model.name == "mlp" => (
            "mlp".to_string(),
            Family::Mlp(MlpShape {
                inputs: crate::run::build::builtin_inputs(config)?.features,
                hidden: crate::models::load::MLP_HIDDEN.to_vec(),
            }),
            None,
        ),
        None => {
            let name = &config.model.name;
            let Some((kind, value)) = crate::models::load::builtin_config(name) else {
                return Err(Error::Model(format!(
                    "unknown built-in model `{name}`; built-in models: {}",
                    crate::models::load::BUILTIN_MODELS
                        .iter()
                        .map(|(n, _)| *n)
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            };
            (name.clone(), family_from(kind, value, name)?, None)
        }
    };
    let lora = match &family {
        Family::Conv4(_) | Family::Mlp(_) => None,
        f => {
            let targets: Vec<String> = match &config.lora.target_modules {
                Some(t) => t.clone(),
                None => default_targets(f).iter().map(|t| t.to_string()).collect(),
            };
            let paths = super::models::module_paths(f);
            let on = crate::models::targets::resolve(family_name(f), &targets, &paths)?;
            Some(LoraPlan {
                rank: config.lora.rank,
                dropout: config.lora.dropout,
                targets: paths
                    .into_iter()
                    .zip(on)
                    .filter(|(_, on)| *on)
                    .map(|(p, _)| p)
                    .collect(),
            })
        }
    };
    let data = &config.data;
    let (support_n, query_n) = (data.n_way * data.k_shot, data.n_way * data.n_query);
    let (support, query) = match &family {
        Family::Mlp(m) => {
            if crate::run::build::is_sinusoid(config) {
                // Sinusoid tasks: k_shot support points and n_query query points, whatever
                // n_way says, each with one real target.
                let rows = |n| Inputs::Dense {
                    n,
                    d: m.inputs,
                    targets: Some(outputs),
                };
                (rows(data.k_shot), rows(data.n_query))
            } else {
                // Tabular rows with class labels.
                let rows = |n| Inputs::Dense {
                    n,
                    d: m.inputs,
                    targets: None,
                };
                (rows(support_n), rows(query_n))
            }
        }
        // Images are made (or resized) to data.image_size, which Conv4 is built for.
        Family::Conv4(c) => {
            let images = |n| Inputs::Images {
                n,
                c: c.in_channels,
                side: c.image_size,
            };
            (images(support_n), images(query_n))
        }
        _ => {
            let synthetic = data.synthetic_only || data.source == DataSource::Synthetic;
            // Batches are padded to their longest sequence: at most max_length
            // tokens, and synthetic texts are never longer than the generator's limit.
            let t = if synthetic {
                SyntheticText::with_max_length(config.model.max_length)?.max_len
            } else {
                config.model.max_length
            };
            (
                Inputs::Tokens { n: support_n, t },
                Inputs::Tokens { n: query_n, t },
            )
        }
    };
    check_positions(&family, support, config)?;
    check_sizes(&family, support.len().max(query.len()), support, config)?;
    let source = match (&family, &weights_file) {
        (Family::Conv4(_) | Family::Mlp(_), _) => Source::None,
        (_, Some(_)) => Source::File { unused: 0 },
        (_, None) => Source::Drawn,
    };
    let mut model = ModelSpec {
        family,
        lora,
        classes: outputs,
        precision,
        source,
        selective: config.memory_optimization.checkpointing.selective,
    };
    if model.selective && matches!(model.family, Family::Conv4(_) | Family::Mlp(_)) {
        return Err(crate::models::not_a_stack_selective());
    }
    let mut load = LoadSpec::default();
    if let Some(file) = weights_file {
        if !file.exists() {
            return Err(Error::Model(format!(
                "{} not found; melora reads safetensors weights only",
                file.display()
            )));
        }
        load = safetensors_sizes(&file, precision.frozen)?;
        // The file's tensors the model does not use live until it is built.
        let used = dense_weight_bytes(&model);
        model.source = Source::File {
            unused: load.kept_bytes.saturating_sub(used),
        };
    }
    let checkpoint = match config.memory_optimization.checkpointing.plan() {
        None => None,
        Some(plan) => match &model.family {
            Family::Conv4(_) | Family::Mlp(_) => return Err(crate::engine::not_a_stack()),
            family => Some(plan.boundaries(layer_count(family))?),
        },
    };
    Ok(Spec {
        name,
        model,
        support,
        query,
        load,
        checkpoint,
    })
}

/// Refuses sequences longer than the model's position table, as its `embed` does at
/// run time.
fn check_positions(family: &Family, inputs: Inputs, config: &Config) -> Result<()> {
    let Inputs::Tokens { t, .. } = inputs else {
        return Ok(());
    };
    let positions = match family {
        Family::Bert(c) => c.max_position_embeddings,
        Family::DistilBert(c) => c.max_position_embeddings,
        Family::Gpt2(c) => c.n_positions,
        // Relative positions: any length.
        Family::T5(_) | Family::Conv4(_) | Family::Mlp(_) => return Ok(()),
    };
    if t <= positions {
        return Ok(());
    }
    let synthetic = config.data.synthetic_only || config.data.source == DataSource::Synthetic;
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

/// Largest tensor the planner sizes, in bytes: far beyond any machine's memory, and
/// far below where the simulation's byte counts could overflow.
const LARGEST_TENSOR: u64 = 1 << 50;

/// Refuses configurations whose tensors could not exist (more than [`LARGEST_TENSOR`]
/// bytes): sizes are products of configured numbers, and the simulation counts them in
/// 64 bits.
fn check_sizes(family: &Family, n: usize, inputs: Inputs, config: &Config) -> Result<()> {
    // Per family: the elements of a row (token, pixel), the row widths, and the
    // attention scores' heads (each `t × t`).
    let (rows, widths, heads): (usize, Vec<usize>, usize) = match (family, inputs) {
        (Family::Bert(c), Inputs::Tokens { t, .. }) => (
            t,
            vec![c.hidden_size, c.intermediate_size, c.vocab_size],
            c.num_attention_heads,
        ),
        (Family::DistilBert(c), Inputs::Tokens { t, .. }) => {
            (t, vec![c.dim, c.hidden_dim, c.vocab_size], c.n_heads)
        }
        (Family::Gpt2(c), Inputs::Tokens { t, .. }) => (
            t,
            vec![
                c.n_embd.saturating_mul(4),
                c.n_inner.unwrap_or(0),
                c.vocab_size,
            ],
            c.n_head,
        ),
        (Family::T5(c), Inputs::Tokens { t, .. }) => (
            t,
            vec![
                c.d_model,
                c.num_heads.saturating_mul(c.d_kv),
                c.d_ff,
                c.vocab_size,
            ],
            c.num_heads,
        ),
        (Family::Conv4(c), Inputs::Images { side, .. }) => (
            side.saturating_mul(side),
            vec![
                c.channels.saturating_mul(9),
                c.in_channels.saturating_mul(9),
            ],
            0,
        ),
        (Family::Mlp(m), Inputs::Dense { d, .. }) => {
            let mut widths = m.hidden.clone();
            widths.push(d);
            (1, widths, 0)
        }
        _ => return Ok(()),
    };
    let product = |factors: &[usize]| -> Option<u64> {
        factors
            .iter()
            .try_fold(8u64, |acc, &f| acc.checked_mul(f as u64))
    };
    let widest = widths.into_iter().max().unwrap_or(1);
    let tokens = matches!(inputs, Inputs::Tokens { .. });
    let largest = [
        product(&[n, rows, widest]),
        if tokens {
            product(&[n, heads, rows, rows])
        } else {
            Some(0)
        },
    ]
    .into_iter()
    .try_fold(0u64, |largest, bytes| bytes.map(|b| largest.max(b)));
    match largest {
        Some(bytes) if bytes <= LARGEST_TENSOR => Ok(()),
        _ => Err(Error::InvalidArgument(format!(
            "the configured sizes (model.max_length {}, {n} examples per batch, the model's \
             widths) make tensors of more than {}; no machine holds them, so the planner \
             does not size them",
            config.model.max_length,
            crate::memory::format_bytes(LARGEST_TENSOR)
        ))),
    }
}

/// Bytes of the frozen tensors the model uses, dense (as the file's tensors are
/// before the model stores some of them in int8).
fn dense_weight_bytes(model: &ModelSpec) -> u64 {
    let mut dense = model.clone();
    dense.precision.int8 = false;
    dense.source = Source::None;
    let sim = Sim::new(1);
    sim.set_category(Category::Weights);
    let built = SimModel::build(&sim, &dense);
    let bytes = sim.data_bytes();
    drop(built);
    bytes
}

/// Activations of one forward graph of the support set (one micro-batch's with
/// gradient accumulation), at trainable leaves, with the loss alive.
pub(crate) fn forward_graph_bytes(spec: &Spec, micro: Option<usize>, threads: usize) -> u64 {
    let sim = Sim::new(threads);
    let model = SimModel::build(&sim, &spec.model);
    let n = spec.support.len();
    let inputs = spec.support.with_len(micro.map_or(n, |m| m.min(n)));
    let params: Vec<_> = model
        .param_shapes()
        .iter()
        .map(|s| sim.variable(s, spec.model.precision.trainable))
        .collect();
    let batch = SimBatch::new(&sim, inputs, spec.model.precision.frozen);
    let before = sim.live();
    let logits = model.logits(&params, &batch, false);
    let loss = super::models::task_loss(&logits, &batch);
    let after = sim.live();
    drop((loss, logits));
    after - before
}
