//! Gradient accumulation as a wrapper of any engine: every product of a batch is the
//! sum of its micro-batches' products weighted by their sizes, which equals the
//! whole batch's for a mean loss while only one micro-batch's graph is alive.

use candle_core::{DType, Tensor};

use crate::data::Batch;
use crate::models::FewShotModel;
use crate::nn::Mode;
use crate::tensor::ParamSet;
use crate::{Error, Result};

use super::{GradEngine, Gradient, Loss};

/// `engine` over micro-batches of at most `size` examples (`None`: whole batches).
/// After each micro-batch the process's memory budget is checked
/// ([`crate::memory::check_budget`]), so an over-budget step stops early.
#[derive(Clone, Copy)]
pub struct MicroBatched<'e> {
    engine: &'e dyn GradEngine,
    size: Option<usize>,
}

impl<'e> MicroBatched<'e> {
    /// `engine` in micro-batches of `size` examples.
    pub fn new(engine: &'e dyn GradEngine, size: Option<usize>) -> Self {
        Self { engine, size }
    }

    /// The micro-batches of `batch` with their weights n_i/N: the whole batch, of
    /// weight one, when no size is set or it is not smaller than the batch. A model
    /// whose examples are coupled (batch statistics) cannot be split.
    pub(crate) fn chunks(&self, batch: &Batch) -> Result<Vec<(Batch, f64)>> {
        match self.size {
            Some(0) => Err(Error::InvalidArgument(
                "micro-batches need at least 1 example \
                 (memory_optimization.gradient_accumulation.micro_batch)"
                    .into(),
            )),
            Some(size) if size < batch.len() => {
                if self.engine.model().couples_examples() {
                    return Err(Error::InvalidArgument(
                        "this model normalises with the statistics of the whole batch, so \
                         splitting it into micro-batches would change the result; unset \
                         memory_optimization.gradient_accumulation.micro_batch"
                            .into(),
                    ));
                }
                let n = batch.len() as f64;
                Ok(batch
                    .split(size)?
                    .into_iter()
                    .map(|b| {
                        let w = b.len() as f64 / n;
                        (b, w)
                    })
                    .collect())
            }
            _ => Ok(vec![(batch.clone(), 1.0)]),
        }
    }

    /// Σ_i w_i·f(chunk_i, w_i) over the micro-batches of `batch`, for any number of
    /// ParamSets per chunk.
    fn weighted_sums(
        &self,
        batch: &Batch,
        mut f: impl FnMut(&Batch, f64) -> Result<Vec<ParamSet>>,
    ) -> Result<Vec<ParamSet>> {
        let mut total: Option<Vec<ParamSet>> = None;
        for (chunk, w) in self.chunks(batch)? {
            let parts = f(&chunk, w)?;
            // Under a memory budget, stop at the first chunk that went above it.
            crate::memory::check_budget()?;
            let parts = if w == 1.0 {
                parts
            } else {
                parts.iter().map(|p| p.scale(w)).collect::<Result<_>>()?
            };
            total = Some(match total {
                Some(t) => t
                    .iter()
                    .zip(&parts)
                    .map(|(a, b)| a.add(b))
                    .collect::<Result<_>>()?,
                None => parts,
            });
        }
        total.ok_or_else(|| Error::InvalidArgument("an empty batch has no gradient".into()))
    }
}

/// `Σ w_i·loss_i` in f64 (the losses' own dtype may be half precision).
fn weighted_loss(parts: &[(Tensor, f64)]) -> Result<Tensor> {
    let mut total: Option<Tensor> = None;
    for (loss, w) in parts {
        let term = loss.to_dtype(DType::F64)?.affine(*w, 0.0)?;
        total = Some(match total {
            Some(t) => (t + term)?,
            None => term,
        });
    }
    total.ok_or_else(|| Error::InvalidArgument("an empty batch has no loss".into()))
}

impl GradEngine for MicroBatched<'_> {
    fn model(&self) -> &dyn FewShotModel {
        self.engine.model()
    }

    fn loss(&self) -> &dyn Loss {
        self.engine.loss()
    }

    fn gradient(&self, theta: &ParamSet, batch: &Batch, mode: Mode) -> Result<Gradient> {
        let chunks = self.chunks(batch)?;
        if chunks.len() == 1 {
            let gradient = self.engine.gradient(theta, batch, mode)?;
            crate::memory::check_budget()?;
            return Ok(gradient);
        }
        let (mut losses, mut logits) = (Vec::new(), Vec::new());
        let mut total: Option<ParamSet> = None;
        for (chunk, w) in chunks {
            let part = self.engine.gradient(theta, &chunk, mode)?;
            crate::memory::check_budget()?;
            losses.push((part.loss, w));
            logits.push(part.logits);
            let grads = part.grads.scale(w)?;
            total = Some(match total {
                Some(t) => t.add(&grads)?,
                None => grads,
            });
        }
        Ok(Gradient {
            grads: total.expect("at least one chunk"),
            loss: weighted_loss(&losses)?,
            logits: Tensor::cat(&logits, 0)?,
        })
    }

    fn differentiable_gradient(
        &self,
        leaves: &ParamSet,
        batch: &Batch,
        mode: Mode,
    ) -> Result<(ParamSet, Tensor)> {
        let mut losses = Vec::new();
        let mut sums = self.weighted_sums(batch, |chunk, w| {
            let (grads, loss) = self.engine.differentiable_gradient(leaves, chunk, mode)?;
            losses.push((loss.detach(), w));
            Ok(vec![grads])
        })?;
        Ok((sums.remove(0), weighted_loss(&losses)?))
    }

    fn gradient_and_hvps(
        &self,
        theta: &ParamSet,
        batch: &Batch,
        vs: &[ParamSet],
        mode: Mode,
    ) -> Result<(ParamSet, Vec<ParamSet>)> {
        let mut sums = self.weighted_sums(batch, |chunk, _| {
            let (grads, mut products) = self.engine.gradient_and_hvps(theta, chunk, vs, mode)?;
            products.insert(0, grads);
            Ok(products)
        })?;
        let grads = sums.remove(0);
        Ok((grads, sums))
    }

    fn block_products(
        &self,
        theta: &ParamSet,
        batch: &Batch,
        blocks: &[(usize, &ParamSet)],
        mode: Mode,
    ) -> Result<Vec<Tensor>> {
        let mut total: Option<Vec<Tensor>> = None;
        for (chunk, w) in self.chunks(batch)? {
            let parts = self.engine.block_products(theta, &chunk, blocks, mode)?;
            crate::memory::check_budget()?;
            let parts = if w == 1.0 {
                parts
            } else {
                parts
                    .iter()
                    .map(|p| Ok((p * w)?))
                    .collect::<Result<Vec<_>>>()?
            };
            total = Some(match total {
                Some(t) => t
                    .iter()
                    .zip(&parts)
                    .map(|(a, b)| Ok((a + b)?))
                    .collect::<Result<_>>()?,
                None => parts,
            });
        }
        total.ok_or_else(|| Error::InvalidArgument("an empty batch has no Hessian".into()))
    }

    fn gauss_newton_product(
        &self,
        theta: &ParamSet,
        batch: &Batch,
        v: &ParamSet,
        mode: Mode,
    ) -> Result<ParamSet> {
        let mut sums = self.weighted_sums(batch, |chunk, _| {
            Ok(vec![self
                .engine
                .gauss_newton_product(theta, chunk, v, mode)?])
        })?;
        Ok(sums.remove(0))
    }

    /// Whole sets, through the wrapped engine: a metric learner's objective couples
    /// every example of a set (class means, attention over the queries), so its
    /// features are pulled back in one piece.
    fn feature_pullback<'s>(
        &'s self,
        theta: &ParamSet,
        batch: &Batch,
        mode: Mode,
    ) -> Result<(Tensor, super::FeaturePullback<'s>)> {
        self.engine.feature_pullback(theta, batch, mode)
    }
}
