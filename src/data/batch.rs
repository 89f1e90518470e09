//! A batch of labelled examples as a model consumes it.

use candle_core::{DType, Tensor};

use crate::{Error, Result};

/// Tokenised sequences, right- or left-padded to one length `t`.
#[derive(Debug, Clone)]
pub struct TokenInputs {
    /// Token ids, `u32` `[b, t]`.
    pub input_ids: Tensor,
    /// 1 for real tokens, 0 for padding, `u32` `[b, t]`.
    pub attention_mask: Tensor,
    /// Segment ids for BERT-style models, `u32` `[b, t]`; `None` means all zeros.
    pub token_type_ids: Option<Tensor>,
}

/// What a model reads.
#[derive(Debug, Clone)]
pub enum Inputs {
    /// Tokenised text (transformers).
    Tokens(TokenInputs),
    /// A dense float tensor whose first dimension is the batch: images `[b, c, h, w]`,
    /// feature vectors `[b, d]`.
    Dense(Tensor),
}

/// A batch: inputs and their class labels (`u32` `[b]`), or, for regression, their
/// float targets.
///
/// Classification batches have `targets: None` and `labels` holding each example's
/// class. Regression batches (see [`Batch::regression`]) hold the real-valued targets
/// in `targets` (`f32` `[b, d]`, read them with [`Batch::regression_targets`] and score
/// with [`regression_loss`]); their `labels` are all zero, so that code which only
/// counts examples keeps working, and must not be read as classes.
#[derive(Debug, Clone)]
pub struct Batch {
    /// The examples.
    pub inputs: Inputs,
    /// Class of each example, `u32` `[b]` (all zero in a regression batch).
    pub labels: Tensor,
    /// Real-valued targets `[b, d]` of a regression batch; `None` for classification.
    pub targets: Option<Tensor>,
}

/// Mean squared error between a model's `prediction` (`[b, d]`) and a regression
/// batch's targets; an error for a classification batch.
pub fn regression_loss(prediction: &Tensor, batch: &Batch) -> Result<Tensor> {
    let targets = batch.regression_targets()?.to_dtype(prediction.dtype())?;
    Ok(crate::tensor::ops::mse(prediction, &targets)?)
}

impl Batch {
    /// The same batch with every tensor on `device` (a clone where it is there).
    pub fn to_device(&self, device: &candle_core::Device) -> Result<Self> {
        let moved = |t: &Option<Tensor>| t.as_ref().map(|t| t.to_device(device)).transpose();
        let inputs = match &self.inputs {
            Inputs::Tokens(t) => Inputs::Tokens(TokenInputs {
                input_ids: t.input_ids.to_device(device)?,
                attention_mask: t.attention_mask.to_device(device)?,
                token_type_ids: moved(&t.token_type_ids)?,
            }),
            Inputs::Dense(x) => Inputs::Dense(x.to_device(device)?),
        };
        Ok(Self {
            inputs,
            labels: self.labels.to_device(device)?,
            targets: moved(&self.targets)?,
        })
    }

    /// A text batch, checking that shapes agree and converting ids, masks and labels
    /// to `u32` (they may come as integer-valued floats, as in the fixtures).
    pub fn from_tokens(
        input_ids: Tensor,
        attention_mask: Tensor,
        token_type_ids: Option<Tensor>,
        labels: Tensor,
    ) -> Result<Self> {
        let (b, t) = input_ids.dims2().map_err(|_| {
            Error::Shape(format!(
                "input_ids must be [batch, tokens], got {:?}",
                input_ids.dims()
            ))
        })?;
        let check = |name: &str, tensor: &Tensor| -> Result<Tensor> {
            if tensor.dims() != [b, t] {
                return Err(Error::Shape(format!(
                    "{name} has shape {:?}, input_ids [{b}, {t}]",
                    tensor.dims()
                )));
            }
            Ok(tensor.to_dtype(DType::U32)?)
        };
        let attention_mask = check("attention_mask", &attention_mask)?;
        let token_type_ids = token_type_ids
            .map(|tt| check("token_type_ids", &tt))
            .transpose()?;
        if labels.dims() != [b] {
            return Err(Error::Shape(format!(
                "labels have shape {:?}, expected [{b}]",
                labels.dims()
            )));
        }
        Ok(Self {
            inputs: Inputs::Tokens(TokenInputs {
                input_ids: input_ids.to_dtype(DType::U32)?,
                attention_mask,
                token_type_ids,
            }),
            labels: labels.to_dtype(DType::U32)?,
            targets: None,
        })
    }

    /// A batch of dense inputs `[b, ...]` (images, feature vectors) with labels `[b]`.
    pub fn from_dense(inputs: Tensor, labels: Tensor) -> Result<Self> {
        let b = inputs.dims().first().copied().unwrap_or(0);
        if inputs.rank() < 2 || labels.dims() != [b] {
            return Err(Error::Shape(format!(
                "dense inputs {:?} need a batch dimension matching labels {:?}",
                inputs.dims(),
                labels.dims()
            )));
        }
        Ok(Self {
            inputs: Inputs::Dense(inputs),
            labels: labels.to_dtype(DType::U32)?,
            targets: None,
        })
    }

    /// A regression batch: dense inputs `[b, ...]` and float targets `[b, d]` (or `[b]`,
    /// taken as `[b, 1]`); `labels` are zeros (see [`Batch`]).
    pub fn regression(inputs: Tensor, targets: Tensor) -> Result<Self> {
        let b = inputs.dims().first().copied().unwrap_or(0);
        let targets = match targets.rank() {
            1 => targets.unsqueeze(1)?,
            _ => targets,
        };
        if inputs.rank() < 2 || targets.rank() != 2 || targets.dims()[0] != b {
            return Err(Error::Shape(format!(
                "regression inputs {:?} need a batch dimension matching targets [b, d], got {:?}",
                inputs.dims(),
                targets.dims()
            )));
        }
        let labels = Tensor::zeros(b, DType::U32, inputs.device())?;
        Ok(Self {
            inputs: Inputs::Dense(inputs),
            labels,
            targets: Some(targets),
        })
    }

    /// The float targets of a regression batch, or an error for a classification batch.
    pub fn regression_targets(&self) -> Result<&Tensor> {
        self.targets.as_ref().ok_or_else(|| {
            Error::InvalidArgument("this batch holds class labels, not regression targets".into())
        })
    }

    /// Whether the batch holds regression targets rather than classes.
    pub fn is_regression(&self) -> bool {
        self.targets.is_some()
    }

    /// The token inputs, or an error for a model that reads text given other inputs.
    pub fn tokens(&self) -> Result<&TokenInputs> {
        match &self.inputs {
            Inputs::Tokens(t) => Ok(t),
            Inputs::Dense(_) => Err(Error::InvalidArgument(
                "this model reads tokenised text, but the batch holds dense inputs".into(),
            )),
        }
    }

    /// The dense inputs, or an error for a model that reads tensors given text.
    pub fn dense(&self) -> Result<&Tensor> {
        match &self.inputs {
            Inputs::Dense(t) => Ok(t),
            Inputs::Tokens(_) => Err(Error::InvalidArgument(
                "this model reads dense inputs (images, features), but the batch holds text".into(),
            )),
        }
    }

    /// Consecutive sub-batches of at most `size` examples (gradient accumulation),
    /// as few as that allows and balanced (sizes differ by at most one, the larger
    /// first): 25 examples in at most 8 are 7, 6, 6, 6, not 8, 8, 8, 1, whose last
    /// product would cost nearly a full one's fixed overhead for one example.
    pub fn split(&self, size: usize) -> Result<Vec<Batch>> {
        if size == 0 {
            return Err(Error::InvalidArgument(
                "micro-batches need at least 1 example".into(),
            ));
        }
        let n = self.len();
        let count = n.div_ceil(size).max(1);
        let (base, larger) = (n / count, n % count);
        let mut parts = Vec::with_capacity(count);
        let mut start = 0;
        for part in 0..count {
            let len = base + usize::from(part < larger);
            if len == 0 {
                break;
            }
            let rows = |t: &Tensor| t.narrow(0, start, len);
            let inputs = match &self.inputs {
                Inputs::Tokens(t) => Inputs::Tokens(TokenInputs {
                    input_ids: rows(&t.input_ids)?,
                    attention_mask: rows(&t.attention_mask)?,
                    token_type_ids: t.token_type_ids.as_ref().map(rows).transpose()?,
                }),
                Inputs::Dense(x) => Inputs::Dense(rows(x)?),
            };
            parts.push(Batch {
                inputs,
                labels: rows(&self.labels)?,
                targets: self.targets.as_ref().map(rows).transpose()?,
            });
            start += len;
        }
        Ok(parts)
    }

    /// The examples of `parts` in one batch, in order (pre-training on whole tasks).
    /// Token batches are right-padded to the longest, with id 0 under a zero mask, so
    /// the padding changes nothing a model computes for the real tokens.
    pub fn concat(parts: &[Batch]) -> Result<Batch> {
        let Some(first) = parts.first() else {
            return Err(Error::InvalidArgument("no batches to concatenate".into()));
        };
        let cat = |tensors: Vec<Tensor>| -> Result<Tensor> { Ok(Tensor::cat(&tensors, 0)?) };
        let inputs = match &first.inputs {
            Inputs::Tokens(_) => {
                let tokens = parts
                    .iter()
                    .map(Batch::tokens)
                    .collect::<Result<Vec<_>>>()?;
                let length = tokens
                    .iter()
                    .map(|t| t.input_ids.dims()[1])
                    .max()
                    .unwrap_or(1);
                let pad = |t: &Tensor| -> Result<Tensor> {
                    let (b, len) = t.dims2()?;
                    if len == length {
                        return Ok(t.clone());
                    }
                    let zeros = Tensor::zeros((b, length - len), DType::U32, t.device())?;
                    Ok(Tensor::cat(&[t, &zeros], 1)?)
                };
                let types = tokens
                    .iter()
                    .map(|t| t.token_type_ids.as_ref().map(&pad).transpose())
                    .collect::<Result<Option<Vec<_>>>>()?;
                Inputs::Tokens(TokenInputs {
                    input_ids: cat(tokens
                        .iter()
                        .map(|t| pad(&t.input_ids))
                        .collect::<Result<_>>()?)?,
                    attention_mask: cat(tokens
                        .iter()
                        .map(|t| pad(&t.attention_mask))
                        .collect::<Result<_>>()?)?,
                    token_type_ids: types.map(cat).transpose()?,
                })
            }
            Inputs::Dense(_) => Inputs::Dense(cat(parts
                .iter()
                .map(|b| b.dense().cloned())
                .collect::<Result<_>>()?)?),
        };
        let targets = match first.targets {
            Some(_) => Some(cat(parts
                .iter()
                .map(|b| b.regression_targets().cloned())
                .collect::<Result<_>>()?)?),
            None => None,
        };
        Ok(Batch {
            inputs,
            labels: cat(parts.iter().map(|b| b.labels.clone()).collect())?,
            targets,
        })
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.labels.dims().first().copied().unwrap_or(0)
    }

    /// Whether the batch holds no example.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
