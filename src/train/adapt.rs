//! `melora adapt`: a trained model applied to a user's own few examples. The
//! labelled support set adapts the checkpoint exactly as its method adapts at
//! evaluation; every query item is then predicted, with the probability of each
//! label. Items are read and prepared as the checkpoint's training data was (its
//! recorded configuration says how): texts tokenised by the model's tokenizer and
//! `model.max_length`; images decoded to grey, inverted for models trained on
//! Omniglot-style strokes (Omniglot, synthetic images), resized to `data.image_size`;
//! for models trained on photographs (`image_folder`), JPEG or PNG decoded in the
//! run's colour, resized, centre-cropped and normalised as its evaluation episodes.

use std::path::{Path, PathBuf};

use candle_core::DType;
use serde::Serialize;

use crate::config::pairing::{ModelKind, TaskInputs};
use crate::config::{Config, DataSource, SyntheticTask};
use crate::data::readers::{prepare_grey_png, read_text_items, TextColumns};
use crate::data::{Batch, Class, Dataset, EncodedDataset, PhotoTransform};
use crate::models::FewShotModel;
use crate::nn::Mode;
use crate::tensor::{ops, ParamSet};
use crate::{Error, Result};

use super::run::params_from;
use crate::run::build::{
    build_adapter, build_engine, build_model, build_text_encoder, builtin_inputs,
};

/// One item a user gave: its name (the text itself, or the image's file name), its
/// label if it has one, and its model inputs.
struct Item {
    name: String,
    label: Option<String>,
    input: Input,
}

enum Input {
    Tokens(Vec<u32>),
    Pixels(Vec<f32>),
}

/// One query item's prediction.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Prediction {
    /// The item: its text, or its image's file name.
    pub item: String,
    /// The predicted label.
    pub prediction: String,
    /// The probability of each label of the support set, in the support set's order.
    pub probabilities: Vec<(String, f64)>,
    /// The item's own label, when the query file gives it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
}

/// What adapting to a user's examples produced.
#[derive(Debug, Clone)]
pub struct AdaptOutcome {
    /// The labels, in the order of their first support example (label `i` is the
    /// head's output `i`).
    pub classes: Vec<String>,
    /// One prediction per query item, in file order.
    pub predictions: Vec<Prediction>,
    /// The fraction of labelled query items predicted right (`None` without labels).
    pub accuracy: Option<f64>,
    /// The adapted parameters.
    pub adapted: ParamSet,
}

/// Whether the configuration's images are strokes on paper inverted to 1 on 0
/// (Omniglot, the synthetic images), rather than bright on dark (IDX).
fn inverted_images(config: &Config) -> bool {
    let data = &config.data;
    let synthetic = data.synthetic_only || data.source == DataSource::Synthetic;
    if synthetic {
        data.synthetic_task == SyntheticTask::Images
    } else {
        data.source == DataSource::Omniglot
    }
}

/// Whether the configuration's model was trained on photographs
/// (`data.source: image_folder`), read as JPEG or PNG in colour.
fn photographs(config: &Config) -> bool {
    !config.data.synthetic_only && config.data.source == DataSource::ImageFolder
}

/// The image files of a folder, sorted by name: PNG, and JPEG too for models
/// trained on photographs; hidden files are passed over.
fn image_files(dir: &Path, jpeg: bool) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        let hidden = path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'));
        if path.is_file() && !hidden {
            let ext = path
                .extension()
                .map(|e| e.to_string_lossy().to_ascii_lowercase())
                .unwrap_or_default();
            let readable = ext == "png" || (jpeg && (ext == "jpg" || ext == "jpeg"));
            if !readable {
                let kinds = if jpeg { "JPEG and PNG" } else { "PNG" };
                return Err(Error::Format {
                    path,
                    message: format!(
                        "this model reads {kinds} images; convert this file or remove it"
                    ),
                });
            }
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Images of `path`: one subfolder per class (labelled), or PNG files directly in it
/// (unlabelled; refused when `labelled`).
fn read_images(config: &Config, path: &Path, labelled: bool) -> Result<Vec<Item>> {
    if !path.is_dir() {
        return Err(Error::Format {
            path: path.into(),
            message: "images are read from a folder: one subfolder per class for a \
                      labelled set, or the PNG files themselves for unlabelled queries"
                .into(),
        });
    }
    let mut folders: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| Error::io(path, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    folders.sort();
    let (size, inverted) = (config.data.image_size, inverted_images(config));
    let photos = photographs(config).then(|| PhotoTransform::for_config(&config.data));
    let read = |file: &Path, label: Option<String>| -> Result<Item> {
        let bytes = std::fs::read(file).map_err(|e| Error::io(file, e))?;
        let name = file.display().to_string();
        let pixels = match &photos {
            Some(transform) => transform.prepare_for_evaluation(&bytes, &name)?,
            None => prepare_grey_png(&bytes, &name, size, inverted)?,
        };
        Ok(Item {
            input: Input::Pixels(pixels),
            name: file
                .file_name()
                .map_or(name.clone(), |n| n.to_string_lossy().into_owned()),
            label,
        })
    };
    let mut items = Vec::new();
    if folders.is_empty() {
        if labelled {
            return Err(Error::Format {
                path: path.into(),
                message: "a labelled image set needs one subfolder per class (its name \
                          is the label)"
                    .into(),
            });
        }
        for file in image_files(path, photos.is_some())? {
            items.push(read(&file, None)?);
        }
    } else {
        for folder in &folders {
            let label = folder
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            for file in image_files(folder, photos.is_some())? {
                items.push(read(&file, Some(label.clone()))?);
            }
        }
    }
    if items.is_empty() {
        return Err(Error::Format {
            path: path.into(),
            message: "no images".into(),
        });
    }
    Ok(items)
}

/// The items of `path` as `config`'s model reads them.
fn read_items(config: &Config, path: &Path, labelled: bool) -> Result<Vec<Item>> {
    match (ModelKind::of(config), TaskInputs::of(config)) {
        (ModelKind::Transformer, _) => {
            let encoder = build_text_encoder(config)?;
            let columns = TextColumns {
                text: config.data.text_column.clone(),
                label: config.data.label_column.clone(),
            };
            read_text_items(path, &columns, labelled)?
                .into_iter()
                .map(|item| {
                    Ok(Item {
                        input: Input::Tokens(encoder.encode(&item.text)?),
                        name: item.text,
                        label: item.label,
                    })
                })
                .collect()
        }
        (ModelKind::Vision(_), _) => read_images(config, path, labelled),
        (ModelKind::Mlp, _) => Err(Error::InvalidArgument(
            "adapt reads texts (transformers) and images (vision backbones); the mlp's feature rows \
             and regression targets are not supported"
                .into(),
        )),
    }
}

/// One batch of `items` with `labels`, prepared as the model's training batches are.
fn batch(config: &Config, items: &[Item], labels: Vec<u32>) -> Result<Batch> {
    let mut tokens = Vec::new();
    let mut pixels = Vec::new();
    for item in items {
        match &item.input {
            Input::Tokens(t) => tokens.push(t.clone()),
            Input::Pixels(p) => pixels.push(p.clone()),
        }
    }
    let data = if pixels.is_empty() {
        EncodedDataset::Tokens {
            dataset: Dataset::new(vec![Class {
                name: String::new(),
                examples: tokens,
            }]),
            pad_id: build_text_encoder(config)?.pad_id(),
        }
    } else {
        let side = config.data.image_size;
        EncodedDataset::Images {
            dataset: Dataset::new(vec![Class {
                name: String::new(),
                examples: pixels,
            }]),
            channels: builtin_inputs(config)?.image_channels,
            height: side,
            width: side,
        }
    };
    let picks: Vec<(usize, usize)> = (0..items.len()).map(|i| (0, i)).collect();
    data.batch_of(&picks, labels, &crate::run::build::device(config)?)
}

/// Adapts the model of `config` at the `checkpoint`'s parameters to the labelled
/// `support` examples and predicts the `query` items (see the module documentation).
///
/// Errors: a support item without a label, more classes than the model's head has
/// outputs, a labelled query item of a class the support set lacks (named), files
/// the readers refuse, a regression model.
pub fn adapt_examples(
    config: &Config,
    checkpoint: &Path,
    support: &Path,
    query: &Path,
) -> Result<AdaptOutcome> {
    crate::init();
    let model = build_model(config)?;
    let params = params_from(model.as_ref(), config, Some(checkpoint))?;
    adapt_with(config, model.as_ref(), &params, support, query)
}

/// [`adapt_examples`] with the model and parameters given.
pub(crate) fn adapt_with(
    config: &Config,
    model: &dyn FewShotModel,
    params: &ParamSet,
    support: &Path,
    query: &Path,
) -> Result<AdaptOutcome> {
    if TaskInputs::of(config) == TaskInputs::Regression {
        return Err(Error::InvalidArgument(
            "adapt predicts classes; this checkpoint was trained for regression".into(),
        ));
    }
    let support_items = read_items(config, support, true)?;
    let query_items = read_items(config, query, false)?;
    let mut classes: Vec<String> = Vec::new();
    for item in &support_items {
        let label = item.label.clone().unwrap_or_default();
        if !classes.contains(&label) {
            classes.push(label);
        }
    }
    let outputs = config.data.n_way;
    if classes.len() > outputs {
        return Err(Error::InvalidArgument(format!(
            "the support set has {} classes ({}), but the model's head has {outputs} \
             outputs (data.n_way of its training); give at most {outputs} classes",
            classes.len(),
            classes.join(", ")
        )));
    }
    if classes.len() < 2 {
        return Err(Error::InvalidArgument(format!(
            "the support set {} has one class ({}); adaptation needs examples of at \
             least two",
            support.display(),
            classes.join(", ")
        )));
    }
    let index_of = |label: &str| classes.iter().position(|c| c == label);
    for item in &query_items {
        if let Some(label) = &item.label {
            if index_of(label).is_none() {
                return Err(Error::InvalidArgument(format!(
                    "query item `{}` has label `{label}`, which no support example has; \
                     give support examples of every class (support classes: {})",
                    item.name,
                    classes.join(", ")
                )));
            }
        }
    }
    let support_labels = support_items
        .iter()
        .map(|i| index_of(i.label.as_deref().unwrap_or_default()).unwrap_or(0) as u32)
        .collect();
    let query_labels = query_items
        .iter()
        .map(|i| i.label.as_deref().and_then(index_of).unwrap_or(0) as u32)
        .collect();
    let support_batch = batch(config, &support_items, support_labels)?;
    let query_batch = batch(config, &query_items, query_labels)?;
    let adapter = build_adapter(config)?;
    let scale = super::evaluate::evaluation_loss_scale(config, None)?;
    let _scope = scale.map(crate::tensor::loss_scale::scoped);
    let engine = build_engine(config, model)?;
    let adapted = adapter.adapt(engine.as_ref(), params, &support_batch, Mode::Eval)?;
    let logits = adapter
        .predict(engine.as_ref(), &adapted, &query_batch, Mode::Eval)?
        .detach()
        .narrow(1, 0, classes.len())?;
    let probabilities = ops::softmax(&logits.to_dtype(DType::F64)?)?.to_vec2::<f64>()?;
    let mut correct = (0usize, 0usize);
    let predictions = query_items
        .into_iter()
        .zip(probabilities)
        .map(|(item, p)| {
            let best = p
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map_or(0, |(i, _)| i);
            if let Some(label) = &item.label {
                correct.1 += 1;
                correct.0 += usize::from(label == &classes[best]);
            }
            Prediction {
                item: item.name,
                prediction: classes[best].clone(),
                probabilities: classes.iter().cloned().zip(p).collect(),
                label: item.label,
            }
        })
        .collect();
    Ok(AdaptOutcome {
        accuracy: (correct.1 > 0).then(|| correct.0 as f64 / correct.1 as f64),
        classes,
        predictions,
        adapted,
    })
}

/// The meta-learned tensors of a checkpoint's parameters (MetaSGD's step sizes
/// dropped): what an adapter file holds.
pub fn adapter_params(params: &ParamSet) -> Result<ParamSet> {
    ParamSet::from_pairs(
        params
            .iter()
            .filter(|(n, _)| !n.starts_with(crate::meta::STEP_SIZE_PREFIX))
            .map(|(n, t)| (n.to_string(), t.clone())),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::adapter_files::{load_model_adapter, save_model_adapter};

    /// A checkpoint's adapter written in PEFT's format reads back exactly (MetaSGD's
    /// step sizes are not part of it).
    #[test]
    fn an_exported_adapter_reads_back_exactly() {
        let config = Config::from_yaml_str(
            "model:\n  name: tiny-gpt2\n  max_length: 8\nlora:\n  rank: 2\nmeta_learning:\n  \
             method: metasgd\ndata:\n  n_way: 3\n",
        )
        .unwrap();
        let model = build_model(&config).unwrap();
        // Non-zero B and head, so that a lost or swapped tensor shows.
        let params = crate::run::build::initial_params(model.as_ref(), &config)
            .unwrap()
            .map(|_, t| t.ones_like()? * 0.25 + t)
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let theta = adapter_params(&params).unwrap();
        assert_eq!(theta.len() * 2, params.len());
        save_model_adapter(dir.path(), model.as_ref(), &theta, Some("tiny-gpt2")).unwrap();
        let back = load_model_adapter(dir.path(), model.as_ref()).unwrap();
        assert_eq!(
            back.names().collect::<Vec<_>>(),
            theta.names().collect::<Vec<_>>()
        );
        assert_eq!(back.sub(&theta).unwrap().norm().unwrap(), 0.0);
    }
}
