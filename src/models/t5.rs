//! T5 encoders for classification: shared token embeddings, pre-norm layers with
//! RMS layer norms, unscaled attention with a learned relative-position bias, plain
//! or gated feed-forward layers, masked mean pooling of the final states and a
//! classification head.

use std::path::Path;

use candle_core::{Device, Tensor};
use serde::Deserialize;

use super::attention::{padding_keep, Projections, SelfAttention};
use super::layers::{load_dense, Dense, FeedForward, Frozen, FrozenTable, Sublayers};
use super::load::ConfigJson;
use super::{
    attach_lora, layer_at, Activation, ClassifierParts, FamilyConventions, LoraSettings, Pooling,
    StackContext, TransformerClassifier, Weights,
};
use crate::data::Batch;
use crate::nn::{LoraLinear, Mode};
use crate::tensor::ops::{self, norm::rms_norm};
use crate::tensor::ParamSet;
use crate::{Error, Result};

/// LoRA targets when the configuration names none (PEFT's default for T5).
pub const DEFAULT_TARGETS: &[&str] = &["q", "v"];

/// The keys of a Hugging Face `T5Config` (`config.json`) that the encoder uses.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct T5Config {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Width of the hidden states.
    pub d_model: usize,
    /// Width of one attention head; the attention's inner width is
    /// `num_heads · d_kv`, which need not equal `d_model`.
    pub d_kv: usize,
    /// Width of the feed-forward layer.
    pub d_ff: usize,
    /// Number of encoder blocks.
    pub num_layers: usize,
    /// Attention heads per block.
    pub num_heads: usize,
    /// Buckets of the relative-position bias.
    #[serde(default = "default_buckets")]
    pub relative_attention_num_buckets: usize,
    /// Distance beyond which relative positions share the last bucket.
    #[serde(default = "default_max_distance")]
    pub relative_attention_max_distance: usize,
    /// RMS-norm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    /// `relu`, `gelu`, … or `gated-<act>` (`gated-gelu` means `gelu_new`, as in HF).
    #[serde(default = "default_ff_proj")]
    pub feed_forward_proj: String,
}

fn default_buckets() -> usize {
    32
}
fn default_max_distance() -> usize {
    128
}
fn default_eps() -> f64 {
    1e-6
}
fn default_ff_proj() -> String {
    "relu".into()
}

impl T5Config {
    /// Reads a Hugging Face `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        ConfigJson::typed(path, "T5")
    }

    /// The feed-forward activation and whether the layer is gated, parsed as
    /// `T5Config.__init__` does.
    pub(crate) fn feed_forward(&self) -> Result<(Activation, bool)> {
        let proj = self.feed_forward_proj.as_str();
        let (gated, act) = match proj.split_once('-') {
            Some(("gated", act)) => (true, act),
            None => (false, proj),
            Some(_) => {
                return Err(Error::Model(format!(
                    "feed_forward_proj `{proj}` is neither `<act>` nor `gated-<act>`"
                )))
            }
        };
        // HF maps `gated-gelu` to the tanh approximation for the original T5 v1.1.
        let act = if gated && act == "gelu" {
            "gelu_new"
        } else {
            act
        };
        Ok((Activation::from_hf(act)?, gated))
    }

    /// Refuses empty heads and relative-position buckets the bucketing cannot use.
    pub(crate) fn validate(&self) -> Result<()> {
        if self.num_heads == 0 || self.d_kv == 0 {
            return Err(Error::Model(format!(
                "num_heads ({}) and d_kv ({}) must be positive",
                self.num_heads, self.d_kv
            )));
        }
        // Bidirectional buckets halve the count, and half of that are exact; the
        // logarithmic part needs at least one exact bucket and max_distance beyond it.
        let max_exact = self.relative_attention_num_buckets / 4;
        if max_exact == 0 || self.relative_attention_max_distance <= max_exact {
            return Err(Error::Model(format!(
                "relative_attention_num_buckets {} must be at least 4 and \
                 relative_attention_max_distance {} above a quarter of it",
                self.relative_attention_num_buckets, self.relative_attention_max_distance
            )));
        }
        Ok(())
    }
}

/// HF `T5Attention._relative_position_bucket` with `bidirectional=True`:
/// half the buckets for keys after the query, half for keys before; within each half,
/// distances below a quarter of the buckets get their own bucket and longer ones share
/// logarithmically wider buckets up to `max_distance`. The logarithm is taken in f32
/// as PyTorch does, so that bucket edges fall where they do in the checkpoint's
/// training.
fn relative_position_bucket(
    relative_position: i64,
    num_buckets: usize,
    max_distance: usize,
) -> usize {
    let half = num_buckets / 2;
    let mut bucket = if relative_position > 0 { half } else { 0 };
    let distance = relative_position.unsigned_abs() as usize;
    let max_exact = half / 2;
    bucket += if distance < max_exact {
        distance
    } else {
        let log_ratio = (distance as f32 / max_exact as f32).ln()
            / (max_distance as f32 / max_exact as f32).ln()
            * (half - max_exact) as f32;
        (max_exact + log_ratio as usize).min(half - 1)
    };
    bucket
}

/// The conventions of the T5 family.
const FAMILY: FamilyConventions = FamilyConventions {
    name: "t5",
    pooling: Pooling::MaskedMean,
    default_targets: DEFAULT_TARGETS,
    fan_in_fan_out: false,
};

/// One pre-norm T5 encoder block: `h + attention(rms(h))`, then `h + ffn(rms(h))`.
#[derive(Debug, Clone)]
struct T5Block {
    /// `SelfAttention.{q, k, v, o}`, unscaled, and `DenseReluDense`: `wi` (or `wi_0`,
    /// the activated branch, and `wi_1`, the linear branch, when gated) and `wo`.
    sublayers: Sublayers,
    attention_norm: Frozen,
    ffn_norm: Frozen,
}

/// A T5 encoder with LoRA and a classification head on masked mean pooling.
#[derive(Debug, Clone)]
pub struct T5Encoder {
    config: T5Config,
    embeddings: FrozenTable,
    /// `[num_buckets, num_heads]`, block 0's table, which every block uses.
    relative_attention_bias: Frozen,
    blocks: Vec<T5Block>,
    final_norm: Frozen,
    parts: ClassifierParts,
}

impl T5Encoder {
    /// Builds the encoder from `weights` (Hugging Face `T5EncoderModel` or
    /// `T5ForConditionalGeneration` names; the decoder is ignored), with LoRA on the
    /// layers `lora` selects and a head for `classes` classes.
    pub fn new(
        config: T5Config,
        weights: Weights,
        lora: Option<LoraSettings>,
        classes: usize,
    ) -> Result<Self> {
        config.validate()?;
        let (activation, gated) = config.feed_forward()?;
        let (d, inner, ff) = (config.d_model, config.num_heads * config.d_kv, config.d_ff);
        let norm = |name: &str| Frozen::load(&weights, name, &[d]);
        let mut blocks = Vec::with_capacity(config.num_layers);
        for l in 0..config.num_layers {
            let a = format!("encoder.block.{l}.layer.0");
            let f = format!("encoder.block.{l}.layer.1");
            let linear = |name: String, n_in, n_out| {
                load_dense(&weights, Dense::LinearNoBias, &name, n_in, n_out)
            };
            let attention =
                |name: &str, n_in, n_out| linear(format!("{a}.SelfAttention.{name}"), n_in, n_out);
            let dense =
                |name: &str, n_in, n_out| linear(format!("{f}.DenseReluDense.{name}"), n_in, n_out);
            let (input, gate) = if gated {
                (dense("wi_0", d, ff)?, Some(dense("wi_1", d, ff)?))
            } else {
                (dense("wi", d, ff)?, None)
            };
            let projections = Projections::Separate {
                query: attention("q", d, inner)?,
                key: attention("k", d, inner)?,
                value: attention("v", d, inner)?,
            };
            let output = attention("o", inner, d)?;
            let attention_norm = norm(&format!("{a}.layer_norm.weight"))?;
            // T5 folds the 1/√d_kv scale into its q initialisation: no scaling here.
            let attention = SelfAttention::new(projections, output, config.num_heads, 1.0);
            let feed_forward = FeedForward {
                input,
                gate,
                output: dense("wo", ff, d)?,
                activation,
            };
            blocks.push(T5Block {
                sublayers: Sublayers {
                    attention,
                    feed_forward,
                },
                attention_norm,
                ffn_norm: norm(&format!("{f}.layer_norm.weight"))?,
            });
        }
        let vocab = [config.vocab_size, d];
        // `shared` is the canonical name; encoder-only exports may keep only the
        // encoder's tied copy. A missing table reports the canonical name.
        let (table_name, embeddings) = match weights.get("shared.weight", &vocab) {
            Ok(t) => ("shared.weight", t),
            Err(e) => (
                "encoder.embed_tokens.weight",
                weights
                    .get("encoder.embed_tokens.weight", &vocab)
                    .map_err(|_| e)?,
            ),
        };
        let model = Self {
            embeddings: FrozenTable::new(&weights, table_name, embeddings)?,
            relative_attention_bias: Frozen::load(
                &weights,
                "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                &[config.relative_attention_num_buckets, config.num_heads],
            )?,
            blocks,
            final_norm: norm("encoder.final_layer_norm.weight")?,
            parts: ClassifierParts::new(FAMILY, &weights, d, classes, lora),
            config,
        };
        attach_lora(model, Self::linears_mut)
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &T5Config {
        &self.config
    }

    fn linears_mut(&mut self) -> Vec<&mut LoraLinear> {
        self.blocks
            .iter_mut()
            .flat_map(|b| b.sublayers.linears_mut())
            .collect()
    }
    /// The relative-position bias `[1, heads, t, t]` added to every block's scores.
    fn position_bias(&self, t: usize, device: &Device, params: &ParamSet) -> Result<Tensor> {
        let buckets: Vec<u32> = (0..t as i64)
            .flat_map(|query| {
                (0..t as i64).map(move |key| {
                    relative_position_bucket(
                        key - query,
                        self.config.relative_attention_num_buckets,
                        self.config.relative_attention_max_distance,
                    ) as u32
                })
            })
            .collect();
        let buckets = Tensor::from_vec(buckets, (t, t), device)?;
        // index_select through ops::embedding keeps the lookup differentiable.
        let bias = ops::embedding(&buckets, &self.relative_attention_bias.get(params)?)?;
        Ok(bias.permute((2, 0, 1))?.unsqueeze(0)?.contiguous()?)
    }

    /// Final encoder states `[b, t, d_model]` (after the final layer norm) at
    /// `params`.
    pub fn hidden_states(&self, params: &ParamSet, batch: &Batch, mode: Mode) -> Result<Tensor> {
        self.encode(params, batch, mode)
    }
}

impl TransformerClassifier for T5Encoder {
    fn stack_context(&self, batch: &Batch, params: &ParamSet) -> Result<StackContext> {
        let mask = &batch.tokens()?.attention_mask;
        let (_, t) = mask.dims2()?;
        let bias = self.position_bias(t, mask.device(), params)?;
        StackContext::new(batch, padding_keep(mask)?, Some(bias))
    }

    fn embed(&self, params: &ParamSet, batch: &Batch, _mode: Mode) -> Result<Tensor> {
        // T5 does not scale its embeddings and has no absolute positions.
        self.embeddings.lookup(&batch.tokens()?.input_ids, params)
    }

    fn num_layers(&self) -> usize {
        self.blocks.len()
    }

    fn layer(
        &self,
        index: usize,
        h: &Tensor,
        context: &StackContext,
        params: &ParamSet,
        mode: Mode,
    ) -> Result<Tensor> {
        let block = layer_at(&self.blocks, index)?;
        let eps = self.config.layer_norm_epsilon;
        let rms = |norm: &Frozen, x: &Tensor| -> Result<Tensor> {
            Ok(rms_norm(x, &norm.get(params)?, eps)?)
        };
        block.sublayers.pre_norm(
            h,
            [&|x| rms(&block.attention_norm, x), &|x| {
                rms(&block.ffn_norm, x)
            }],
            context,
            params,
            mode,
            self.parts.recompute,
        )
    }

    fn finish(&self, h: &Tensor, params: &ParamSet) -> Result<Tensor> {
        Ok(rms_norm(
            h,
            &self.final_norm.get(params)?,
            self.config.layer_norm_epsilon,
        )?)
    }

    fn lora_linears(&self) -> Vec<&LoraLinear> {
        self.blocks
            .iter()
            .flat_map(|b| b.sublayers.linears())
            .collect()
    }

    fn embedding_and_norm_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = vec![
            self.embeddings.base()?,
            self.relative_attention_bias.base(),
            self.final_norm.base(),
        ];
        for block in &self.blocks {
            out.push(block.attention_norm.base());
            out.push(block.ffn_norm.base());
        }
        Ok(out)
    }

    fn parts(&self) -> &ClassifierParts {
        &self.parts
    }

    fn parts_mut(&mut self) -> &mut ClassifierParts {
        &mut self.parts
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::test_support::{
        check_logits_ignore_padding, check_loss_derivatives, lora, max_abs_diff, padded_batch,
        RandomWeights,
    };
    use crate::models::FewShotModel;

    const CLASSES: usize = 3;

    /// Inner attention width 2·3 = 6 differs from d_model 8 on purpose; 8 buckets
    /// with max_distance 8 give exact buckets for distances 0 and 1 and logarithmic
    /// ones beyond, so a 5-token batch uses several buckets of each kind.
    fn config(feed_forward_proj: &str) -> T5Config {
        serde_json::from_value(serde_json::json!({
            "vocab_size": 11, "d_model": 8, "d_kv": 3, "d_ff": 10, "num_layers": 2,
            "num_heads": 2, "relative_attention_num_buckets": 8,
            "relative_attention_max_distance": 8, "feed_forward_proj": feed_forward_proj,
        }))
        .unwrap()
    }

    fn random_weights(config: &T5Config) -> RandomWeights {
        let (d, inner, ff) = (config.d_model, config.num_heads * config.d_kv, config.d_ff);
        let gated = config.feed_forward().unwrap().1;
        let mut w = RandomWeights::default();
        w.add("shared.weight", &[config.vocab_size, d]);
        w.add(
            "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            &[config.relative_attention_num_buckets, config.num_heads],
        );
        for l in 0..config.num_layers {
            let a = format!("encoder.block.{l}.layer.0");
            for lin in ["q", "k", "v"] {
                w.add(&format!("{a}.SelfAttention.{lin}.weight"), &[inner, d]);
            }
            w.add(&format!("{a}.SelfAttention.o.weight"), &[d, inner]);
            w.add_gain(&format!("{a}.layer_norm.weight"), d);
            let f = format!("encoder.block.{l}.layer.1");
            let wis: &[&str] = if gated { &["wi_0", "wi_1"] } else { &["wi"] };
            for wi in wis {
                w.add(&format!("{f}.DenseReluDense.{wi}.weight"), &[ff, d]);
            }
            w.add(&format!("{f}.DenseReluDense.wo.weight"), &[d, ff]);
            w.add_gain(&format!("{f}.layer_norm.weight"), d);
        }
        w.add_gain("encoder.final_layer_norm.weight", d);
        w
    }

    fn model(feed_forward_proj: &str) -> T5Encoder {
        let config = config(feed_forward_proj);
        let dir = tempfile::tempdir().unwrap();
        let weights = random_weights(&config).save_and_load(&dir);
        T5Encoder::new(config, weights, Some(lora(None)), CLASSES).unwrap()
    }

    #[test]
    fn relative_position_buckets_match_hugging_face() {
        // num_buckets 32 → 16 per direction (keys after the query in 16..32), of
        // which max_exact = 8 are exact; distance n ≥ 8 goes to
        // 8 + trunc(ln(n/8) / ln(128/8) · 8), capped at 15.
        let bucket = |rel| relative_position_bucket(rel, 32, 128);
        assert_eq!(bucket(0), 0);
        assert_eq!(bucket(1), 17);
        assert_eq!(bucket(-1), 1);
        assert_eq!(bucket(7), 23);
        // n = 20: ln(2.5)/ln(16)·8 = 0.9163/2.7726·8 = 2.64 → 8 + 2 = 10.
        assert_eq!(bucket(20), 16 + 10);
        assert_eq!(bucket(-20), 10);
        // n = 200: 8 + trunc(ln(25)/ln(16)·8 = 9.29) = 17, capped at 15.
        assert_eq!(bucket(200), 31);
        assert_eq!(bucket(-200), 15);
        // The tests' small config: 8 buckets, max_exact 2, max_distance 8:
        // n = 3 → 2 + trunc(ln(1.5)/ln(4)·2 = 0.58) = 2; n = 7 → 2 + trunc(1.81) = 3.
        let small = |rel| relative_position_bucket(rel, 8, 8);
        assert_eq!([small(-1), small(3), small(-7)], [1, 4 + 2, 3]);
    }

    fn matvec(m: &[Vec<f64>], x: &[f64]) -> Vec<f64> {
        m.iter()
            .map(|row| row.iter().zip(x).map(|(a, b)| a * b).sum())
            .collect()
    }

    fn rms(x: &[f64], gain: &[f64], eps: f64) -> Vec<f64> {
        let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
        x.iter()
            .zip(gain)
            .map(|(v, g)| v / (ms + eps).sqrt() * g)
            .collect()
    }

    /// The encoder written out with loops over positions and heads, independently of
    /// the tensor code: pre-norm blocks, unscaled scores plus `bias[bucket(key −
    /// query)][head]` over unpadded keys, ReLU FFN, final RMS norm. Index loops
    /// mirror the formulas, which is the point of a reference.
    #[allow(clippy::needless_range_loop)]
    fn reference_hidden(
        config: &T5Config,
        w: &RandomWeights,
        ids: &[Vec<u32>],
        mask: &[Vec<u32>],
    ) -> Vec<Vec<Vec<f64>>> {
        let eps = config.layer_norm_epsilon;
        let (heads, dkv) = (config.num_heads, config.d_kv);
        let shared = w.matrix("shared.weight");
        let bias = w.matrix("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight");
        let mut out = Vec::new();
        for (ids, mask) in ids.iter().zip(mask) {
            let t = ids.len();
            let mut h: Vec<Vec<f64>> = ids.iter().map(|&i| shared[i as usize].clone()).collect();
            for l in 0..config.num_layers {
                let a = format!("encoder.block.{l}.layer.0");
                let m = |n: &str| w.matrix(&format!("{a}.SelfAttention.{n}.weight"));
                let (wq, wk, wv, wo) = (m("q"), m("k"), m("v"), m("o"));
                let g = &w.matrix(&format!("{a}.layer_norm.weight"))[0];
                let x: Vec<Vec<f64>> = h.iter().map(|hi| rms(hi, g, eps)).collect();
                let q: Vec<Vec<f64>> = x.iter().map(|xi| matvec(&wq, xi)).collect();
                let k: Vec<Vec<f64>> = x.iter().map(|xi| matvec(&wk, xi)).collect();
                let v: Vec<Vec<f64>> = x.iter().map(|xi| matvec(&wv, xi)).collect();
                for i in 0..t {
                    let mut context = vec![0.0; heads * dkv];
                    for hd in 0..heads {
                        let r = hd * dkv..(hd + 1) * dkv;
                        let scores: Vec<Option<f64>> = (0..t)
                            .map(|j| {
                                (mask[j] != 0).then(|| {
                                    let dot: f64 = q[i][r.clone()]
                                        .iter()
                                        .zip(&k[j][r.clone()])
                                        .map(|(a, b)| a * b)
                                        .sum();
                                    let bucket = relative_position_bucket(
                                        j as i64 - i as i64,
                                        config.relative_attention_num_buckets,
                                        config.relative_attention_max_distance,
                                    );
                                    dot + bias[bucket][hd]
                                })
                            })
                            .collect();
                        let max = scores.iter().flatten().fold(f64::MIN, |m, s| m.max(*s));
                        let exps: Vec<f64> = scores
                            .iter()
                            .map(|s| s.map_or(0.0, |s| (s - max).exp()))
                            .collect();
                        let total: f64 = exps.iter().sum();
                        for (j, e) in exps.iter().enumerate() {
                            for d in r.clone() {
                                context[d] += e / total * v[j][d];
                            }
                        }
                    }
                    let attended = matvec(&wo, &context);
                    h[i].iter_mut().zip(attended).for_each(|(a, b)| *a += b);
                }
                let f = format!("encoder.block.{l}.layer.1");
                let g = &w.matrix(&format!("{f}.layer_norm.weight"))[0];
                let wi = w.matrix(&format!("{f}.DenseReluDense.wi.weight"));
                let wo = w.matrix(&format!("{f}.DenseReluDense.wo.weight"));
                for hi in h.iter_mut() {
                    let inner: Vec<f64> = matvec(&wi, &rms(hi, g, eps))
                        .into_iter()
                        .map(|z| z.max(0.0))
                        .collect();
                    hi.iter_mut()
                        .zip(matvec(&wo, &inner))
                        .for_each(|(a, b)| *a += b);
                }
            }
            let g = &w.matrix("encoder.final_layer_norm.weight")[0];
            out.push(h.iter().map(|hi| rms(hi, g, eps)).collect());
        }
        out
    }

    #[test]
    fn hidden_states_match_a_loop_reference() {
        let config = config("relu");
        let w = random_weights(&config);
        let dir = tempfile::tempdir().unwrap();
        let model = T5Encoder::new(config.clone(), w.save_and_load(&dir), None, CLASSES).unwrap();
        let batch = padded_batch([0, 0]);
        let params = model.init_params(0).unwrap();
        let hidden = model.hidden_states(&params, &batch, Mode::Eval).unwrap();
        let expected = reference_hidden(
            &config,
            &w,
            &batch.tokens().unwrap().input_ids.to_vec2::<u32>().unwrap(),
            &batch
                .tokens()
                .unwrap()
                .attention_mask
                .to_vec2::<u32>()
                .unwrap(),
        );
        let expected = Tensor::new(expected, &candle_core::Device::Cpu).unwrap();
        assert!(
            max_abs_diff(&hidden, &expected) <= 1e-12,
            "{hidden} {expected}"
        );
    }

    #[test]
    fn logits_have_batch_by_classes_shape_and_ignore_padding() {
        for proj in ["relu", "gated-gelu", "gated-silu"] {
            check_logits_ignore_padding(&model(proj), CLASSES, proj);
        }
    }

    #[test]
    fn embed_tokens_is_accepted_in_place_of_shared() {
        let config = config("relu");
        let mut w = random_weights(&config);
        w.remove("shared.weight");
        let err = {
            let dir = tempfile::tempdir().unwrap();
            T5Encoder::new(config.clone(), w.save_and_load(&dir), None, CLASSES)
                .unwrap_err()
                .to_string()
        };
        assert!(err.contains("`shared.weight` is missing"), "{err}");
        w.add(
            "encoder.embed_tokens.weight",
            &[config.vocab_size, config.d_model],
        );
        let dir = tempfile::tempdir().unwrap();
        assert!(T5Encoder::new(config, w.save_and_load(&dir), None, CLASSES).is_ok());
    }

    #[test]
    fn default_lora_targets_are_q_and_v() {
        let params = model("gated-gelu").init_params(0).unwrap();
        for block in 0..2 {
            for lin in ["q", "v"] {
                for ab in ["lora_A", "lora_B"] {
                    let name = format!(
                        "base_model.model.encoder.block.{block}.layer.0.SelfAttention.{lin}.{ab}.weight"
                    );
                    assert!(params.get(&name).is_some(), "{name}");
                }
            }
        }
        assert!(params
            .names()
            .all(|n| !n.contains(".k.") && !n.contains(".o.")));
        let config = config("relu");
        let dir = tempfile::tempdir().unwrap();
        let weights = random_weights(&config).save_and_load(&dir);
        let err = T5Encoder::new(config, weights, Some(lora(Some(vec!["query".into()]))), 3)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`query` matches no module of t5")
                && err.contains("SelfAttention.q")
                && err.contains("DenseReluDense.wi"),
            "{err}"
        );
    }

    #[test]
    fn loss_derivatives_match_finite_differences() {
        check_loss_derivatives(
            &model("gated-gelu"),
            &[
                "base_model.model.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight",
                "base_model.model.encoder.block.1.layer.0.SelfAttention.v.lora_B.weight",
            ],
        );
    }

    #[test]
    fn missing_weight_is_an_error_naming_it() {
        let config = config("gated-gelu");
        let mut w = random_weights(&config);
        w.remove("encoder.block.1.layer.1.DenseReluDense.wi_1.weight");
        let dir = tempfile::tempdir().unwrap();
        let err = T5Encoder::new(config, w.save_and_load(&dir), None, CLASSES)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`encoder.block.1.layer.1.DenseReluDense.wi_1.weight` is missing"),
            "{err}"
        );
    }
}
