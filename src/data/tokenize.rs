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
    pad_id: u32,
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
        Ok(Self {
            inner,
            max_length,
            pad_id,
        })
    }

    /// The longest sequence a batch may have.
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// The padding token id.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
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

impl EncodeText for TextTokenizer {
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        // One sequence: batch-longest padding adds nothing.
        let encoding = self
            .inner
            .encode(text, true)
            .map_err(|e| Error::InvalidArgument(format!("tokenisation failed: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    fn pad_id(&self) -> u32 {
        self.pad_id
    }

    fn max_length(&self) -> usize {
        self.max_length
    }
}

/// Turns one text into token ids (truncated, special tokens included), so that a
/// data set is tokenised once and batches are only padded.
pub trait EncodeText {
    /// The token ids of `text`.
    fn encode(&self, text: &str) -> Result<Vec<u32>>;
    /// The id batches are padded with.
    fn pad_id(&self) -> u32;
    /// The longest sequence `encode` returns (`model.max_length`); synthetic text
    /// sources generate no longer sequences either.
    fn max_length(&self) -> usize;
}

/// A tokeniser that needs no file, for the built-in tiny models: lower-cased words
/// (runs of alphanumeric characters) hashed (FNV-1a, 64 bits) into `[2, vocab)`, after
/// a leading id 1 (`[CLS]`-like); 0 is padding. Different words may share an id; with
/// a vocabulary of 1000 that is the price of having no vocabulary file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WordHashTokenizer {
    /// Ids are below this (at least 3).
    pub vocab: u32,
    /// Longest sequence, the leading id included (at least 1).
    pub max_length: usize,
}

impl WordHashTokenizer {
    /// Ids for the built-in tiny models: vocabulary 1000.
    pub fn tiny(max_length: usize) -> Self {
        Self {
            vocab: 1000,
            max_length,
        }
    }
}

impl EncodeText for WordHashTokenizer {
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        if self.vocab < 3 || self.max_length == 0 {
            return Err(Error::InvalidArgument(format!(
                "word-hash tokeniser needs vocab >= 3 and max_length >= 1, got {} and {}",
                self.vocab, self.max_length
            )));
        }
        let mut ids = vec![1u32];
        for word in text
            .split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
        {
            if ids.len() >= self.max_length {
                break;
            }
            let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
            for c in word.chars().flat_map(char::to_lowercase) {
                let mut buf = [0u8; 4];
                for &b in c.encode_utf8(&mut buf).as_bytes() {
                    hash ^= u64::from(b);
                    hash = hash.wrapping_mul(0x0100_0000_01b3);
                }
            }
            ids.push(2 + (hash % u64::from(self.vocab - 2)) as u32);
        }
        Ok(ids)
    }

    fn pad_id(&self) -> u32 {
        0
    }

    fn max_length(&self) -> usize {
        self.max_length
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
