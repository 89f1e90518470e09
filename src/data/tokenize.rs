//! Tokenisation with Hugging Face's `tokenizers` from a model's `tokenizer.json`
//! (WordPiece for BERT/MiniLM, byte-level BPE for GPT-2): truncation, padding to the
//! longest sequence of the batch (no compute on padding beyond it), attention masks.

use std::path::Path;

use candle_core::{Device, Tensor};
use tokenizers::{PaddingDirection, PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use super::Batch;
use crate::{Error, Result};

/// Pad tokens tried, in order, when `tokenizer.json` configures no padding.
const PAD_CANDIDATES: &[&str] = &["[PAD]", "<pad>", "<|endoftext|>", "</s>"];

/// A tokenizer that turns texts into [`Batch`]es.
pub struct TextTokenizer {
    inner: Tokenizer,
    max_length: usize,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("max_length", &self.max_length)
            .finish()
    }
}

impl TextTokenizer {
    /// Reads `tokenizer.json`; sequences are truncated to `max_length` tokens
    /// (special tokens included) and padded on the right to the longest in the batch.
    /// The pad token is the file's own, else the first of `[PAD]`, `<pad>`,
    /// `<|endoftext|>` (GPT-2, which has none; the attention mask hides it), `</s>`.
    pub fn from_file(path: &Path, max_length: usize) -> Result<Self> {
        if max_length == 0 {
            return Err(Error::InvalidArgument(
                "max_length must be at least 1".into(),
            ));
        }
        let mut inner = Tokenizer::from_file(path).map_err(|e| {
            if path.exists() {
                Error::Format {
                    path: path.into(),
                    message: format!("not a tokenizer.json: {e}"),
                }
            } else {
                Error::io(path, std::io::Error::from(std::io::ErrorKind::NotFound))
            }
        })?;
        let (pad_id, pad_token) = match inner.get_padding() {
            Some(p) => (p.pad_id, p.pad_token.clone()),
            None => PAD_CANDIDATES
                .iter()
                .find_map(|t| inner.token_to_id(t).map(|id| (id, t.to_string())))
                .ok_or_else(|| Error::Format {
                    path: path.into(),
                    message: format!(
                        "no padding configured and none of {PAD_CANDIDATES:?} in the vocabulary"
                    ),
                })?,
        };
        inner.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::BatchLongest,
            direction: PaddingDirection::Right,
            pad_id,
            pad_token,
            ..PaddingParams::default()
        }));
        inner
            .with_truncation(Some(TruncationParams {
                max_length,
                ..TruncationParams::default()
            }))
            .map_err(|e| {
                Error::InvalidArgument(format!("truncation to {max_length} tokens: {e}"))
            })?;
        Ok(Self { inner, max_length })
    }

    /// The longest sequence a batch may have.
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// Tokenises `texts` with their class `labels` into a batch on `device`.
    pub fn batch(&self, texts: &[&str], labels: &[u32], device: &Device) -> Result<Batch> {
        if texts.len() != labels.len() {
            return Err(Error::Shape(format!(
                "{} texts but {} labels",
                texts.len(),
                labels.len()
            )));
        }
        if texts.is_empty() {
            return Err(Error::InvalidArgument(
                "cannot tokenise an empty batch".into(),
            ));
        }
        let encodings = self
            .inner
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| Error::InvalidArgument(format!("tokenisation failed: {e}")))?;
        let length = encodings[0].get_ids().len();
        let gather = |field: fn(&tokenizers::Encoding) -> &[u32]| -> Vec<u32> {
            encodings
                .iter()
                .flat_map(|e| field(e).iter().copied())
                .collect()
        };
        let shape = (texts.len(), length);
        Batch::from_tokens(
            Tensor::from_vec(gather(tokenizers::Encoding::get_ids), shape, device)?,
            Tensor::from_vec(
                gather(tokenizers::Encoding::get_attention_mask),
                shape,
                device,
            )?,
            Some(Tensor::from_vec(
                gather(tokenizers::Encoding::get_type_ids),
                shape,
                device,
            )?),
            Tensor::from_vec(labels.to_vec(), labels.len(), device)?,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;

    /// A tiny WordPiece `tokenizer.json` in BERT's layout.
    fn wordpiece_file(dir: &Path) -> std::path::PathBuf {
        let words = [
            "[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "cat", "sat", "on", "mat", "##s", "a",
        ];
        let vocab: serde_json::Map<String, serde_json::Value> = words
            .iter()
            .enumerate()
            .map(|(i, w)| (w.to_string(), i.into()))
            .collect();
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": {"type": "BertNormalizer", "clean_text": true,
                "handle_chinese_chars": true, "strip_accents": null, "lowercase": true},
            "pre_tokenizer": {"type": "BertPreTokenizer"},
            "post_processor": {"type": "BertProcessing", "sep": ["[SEP]", 3], "cls": ["[CLS]", 2]},
            "decoder": null,
            "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                "max_input_chars_per_word": 100, "vocab": vocab}
        });
        let path = dir.join("wordpiece.json");
        std::fs::write(&path, json.to_string()).unwrap();
        path
    }

    /// A tiny byte-level BPE `tokenizer.json` in GPT-2's layout (no pad token).
    fn bpe_file(dir: &Path) -> std::path::PathBuf {
        let mut alphabet: Vec<char> = ByteLevel::alphabet().into_iter().collect();
        alphabet.sort();
        let mut vocab: serde_json::Map<String, serde_json::Value> = alphabet
            .iter()
            .enumerate()
            .map(|(i, c)| (c.to_string(), i.into()))
            .collect();
        vocab.insert("Ġt".into(), alphabet.len().into());
        vocab.insert("<|endoftext|>".into(), (alphabet.len() + 1).into());
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
                "use_regex": true},
            "post_processor": null, "decoder": null,
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false,
                "byte_fallback": false, "vocab": vocab, "merges": ["Ġ t"]}
        });
        let path = dir.join("bpe.json");
        std::fs::write(&path, json.to_string()).unwrap();
        path
    }

    #[test]
    fn wordpiece_batch_has_special_tokens_padding_and_masks() {
        let dir = tempfile::tempdir().unwrap();
        let tok = TextTokenizer::from_file(&wordpiece_file(dir.path()), 16).unwrap();
        let batch = tok
            .batch(&["The cats sat", "a mat"], &[1, 0], &Device::Cpu)
            .unwrap();
        let ids = batch.tokens().unwrap().input_ids.to_vec2::<u32>().unwrap();
        // [CLS] the cat ##s sat [SEP] / [CLS] a mat [SEP] [PAD] [PAD]
        assert_eq!(ids, vec![vec![2, 4, 5, 9, 6, 3], vec![2, 10, 8, 3, 0, 0]]);
        let mask = batch
            .tokens()
            .unwrap()
            .attention_mask
            .to_vec2::<u32>()
            .unwrap();
        assert_eq!(mask, vec![vec![1, 1, 1, 1, 1, 1], vec![1, 1, 1, 1, 0, 0]]);
        assert_eq!(batch.labels.to_vec1::<u32>().unwrap(), vec![1, 0]);
    }

    #[test]
    fn truncation_keeps_max_length_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let tok = TextTokenizer::from_file(&wordpiece_file(dir.path()), 4).unwrap();
        let batch = tok
            .batch(&["the cat sat on the mat"], &[0], &Device::Cpu)
            .unwrap();
        assert_eq!(
            batch.tokens().unwrap().input_ids.to_vec2::<u32>().unwrap(),
            vec![vec![2, 4, 5, 3]]
        );
    }

    #[test]
    fn byte_level_bpe_pads_with_end_of_text() {
        let dir = tempfile::tempdir().unwrap();
        let tok = TextTokenizer::from_file(&bpe_file(dir.path()), 32).unwrap();
        let batch = tok.batch(&["a tat", "b"], &[0, 1], &Device::Cpu).unwrap();
        let ids = batch.tokens().unwrap().input_ids.to_vec2::<u32>().unwrap();
        let mask = batch
            .tokens()
            .unwrap()
            .attention_mask
            .to_vec2::<u32>()
            .unwrap();
        let eot = tok.inner.token_to_id("<|endoftext|>").unwrap();
        let merged = tok.inner.token_to_id("Ġt").unwrap();
        assert!(ids[0].contains(&merged), "the merge Ġ+t applies: {ids:?}");
        assert_eq!(mask[1].iter().filter(|&&m| m == 1).count(), 1);
        assert!(ids[1][1..].iter().all(|&id| id == eot));
    }

    #[test]
    fn bad_input_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("tokenizer.json");
        let err = TextTokenizer::from_file(&missing, 8)
            .unwrap_err()
            .to_string();
        assert!(err.contains("tokenizer.json"), "{err}");
        std::fs::write(&missing, "{not json").unwrap();
        let err = TextTokenizer::from_file(&missing, 8)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a tokenizer.json"), "{err}");
        let tok = TextTokenizer::from_file(&wordpiece_file(dir.path()), 8).unwrap();
        assert!(tok.batch(&["a"], &[0, 1], &Device::Cpu).is_err());
    }
}
