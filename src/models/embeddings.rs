//! Token plus learned absolute-position embeddings, the input of BERT, DistilBERT and
//! GPT-2 (T5 has no absolute positions and reads its token table alone).

use candle_core::Tensor;

use super::layers::{Frozen, FrozenTable};
use super::Weights;
use crate::tensor::ParamSet;
use crate::{Error, Result};

/// A frozen token table `[vocab, width]` and position table `[positions, width]`.
#[derive(Debug, Clone)]
pub(crate) struct PositionalEmbeddings {
    words: FrozenTable,
    positions: Frozen,
    /// Rows of the position table: the longest sequence the model reads.
    max_positions: usize,
}

impl PositionalEmbeddings {
    /// The tables `words` and `positions` of `weights` (Hugging Face names), for a
    /// vocabulary of `vocab`, `max_positions` positions and hidden width `width`.
    pub(crate) fn load(
        weights: &Weights,
        (words, positions): (&str, &str),
        vocab: usize,
        max_positions: usize,
        width: usize,
    ) -> Result<Self> {
        Ok(Self {
            words: FrozenTable::load(weights, words, &[vocab, width])?,
            positions: Frozen::load(weights, positions, &[max_positions, width])?,
            max_positions,
        })
    }

    /// `words[ids] + positions[0..t]` `[b, t, width]` for token ids `[b, t]`, of the
    /// trained tables when `params` holds them; a sequence longer than the position
    /// table is an error.
    pub(crate) fn forward(&self, ids: &Tensor, params: &ParamSet) -> Result<Tensor> {
        let (_, t) = ids.dims2()?;
        if t > self.max_positions {
            return Err(Error::Shape(format!(
                "sequences of {t} tokens exceed the model's {} positions; truncate them",
                self.max_positions
            )));
        }
        let words = self.words.lookup(ids, params)?;
        let positions = self.positions.get(params)?.narrow(0, 0, t)?;
        Ok(words.broadcast_add(&positions)?)
    }

    /// The token and position tables with their names, for full fine-tuning.
    pub(crate) fn base(&self) -> Result<[(String, Tensor); 2]> {
        Ok([self.words.base()?, self.positions.base()])
    }
}
