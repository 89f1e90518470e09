//! The Few-Shot Cosine Transformer head (FS-CT, Nguyen et al., 2023), on the
//! embeddings of a task's support and query examples: learnable prototypes (a
//! softmax over each class's shots weighs them), a cross-attention in which the
//! prototypes attend to each query, a feed-forward block, and a cosine classifier.
//!
//! It follows `methods/transformer.py` and `backbone.py` (`CosineDistLinear`) of the
//! public Few-Shot-Cosine-Transformer repository, parameter names included (its
//! `state_dict` names), and matches the `fsct_vic` fixture in f64:
//!
//! - prototypes `P[c] = Σ_s softmax_s(proto_weight[c, s]) · S[c, s]`;
//! - `Proj(t) = LN(t)·Wᵀ` (no bias), split into heads; the prototypes give the
//!   attention's queries, each query embedding its keys and values;
//! - **cosine** attention: `cos[h, i, c] = ⟨q_{h,c}, k_{h,i}⟩ / (|q_{h,c}| |k_{h,i}|)`,
//!   no softmax, no scale, and `out[i, c] = cos[·, i, c] · v_{·, i}`; the **softmax**
//!   variant uses `softmax(q·kᵀ/√d)` over the keys instead. Each query is its own
//!   key set of one, so that softmax is 1 and its output is `v_i` for every class:
//!   the repository's behaviour, kept (the classes then differ only through the
//!   residual prototypes);
//! - `X₁ = out·W_oᵀ + b_o + P`, `X₂ = X₁ + FFN(LN(X₁))` (GELU, exact erf), `depth`
//!   times with the same weights;
//! - `Y = LN(X₂)·W₁ᵀ + b₁` `[queries, classes, dim_head]`, and the cosine
//!   classifier `logits = 2 · Σ_j Ŷ[i, c, j] · W_n[j]` with the weight-normed
//!   `W_n = g · v / |v|`. The repository normalises `Ŷ` with `torch.norm(x, dim=1)`
//!   on a 3-D tensor, i.e. over the **classes**, not the features
//!   ([`FeatureNorm::Classes`], the default, reproduced); [`FeatureNorm::Features`]
//!   normalises each feature vector instead. The softmax variant ends in a plain
//!   linear layer.
//!
//! Everything is composed from differentiable tensor ops, so second derivatives are
//! exact (MAML through the head works as through any other model).

use candle_core::{DType, Device, Tensor, D};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::tensor::ops;
use crate::tensor::ParamSet;
use crate::{Error, Result};

/// How the attention compares prototypes with queries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FsctAttention {
    /// Cosine similarity, no softmax (FS-CT).
    #[default]
    Cosine,
    /// Scaled dot products through a softmax over the keys (the repository's
    /// `softmax` variant, for comparison).
    Softmax,
}

/// Which axis the cosine classifier normalises its input over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FeatureNorm {
    /// Over the classes of each query and feature, as the repository does.
    #[default]
    Classes,
    /// Over the features of each (query, class) pair.
    Features,
}

/// Sizes and variant of an FS-CT head.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FsctConfig {
    /// Embedding width (the backbone's output).
    pub dim: usize,
    /// Attention heads (the repository's default 8).
    pub heads: usize,
    /// Width of each head (64).
    pub dim_head: usize,
    /// Hidden width of the feed-forward block (512).
    pub mlp_dim: usize,
    /// Attention + feed-forward rounds, sharing their weights (1).
    pub depth: usize,
    /// Classes per task: the prototype weights are per class and shot.
    pub n_way: usize,
    /// Shots per class.
    pub k_shot: usize,
    /// Cosine (FS-CT) or softmax attention.
    pub attention: FsctAttention,
    /// The cosine classifier's normalisation axis.
    pub feature_norm: FeatureNorm,
}

impl FsctConfig {
    /// The repository's defaults (8 heads of 64, FFN 512, depth 1, cosine
    /// attention) for `dim`-wide embeddings of `n_way`-way `k_shot`-shot tasks.
    pub fn new(dim: usize, n_way: usize, k_shot: usize) -> Self {
        Self {
            dim,
            heads: 8,
            dim_head: 64,
            mlp_dim: 512,
            depth: 1,
            n_way,
            k_shot,
            attention: FsctAttention::Cosine,
            feature_norm: FeatureNorm::Classes,
        }
    }

    fn validate(&self) -> Result<()> {
        for (name, value) in [
            ("dim", self.dim),
            ("heads", self.heads),
            ("dim_head", self.dim_head),
            ("mlp_dim", self.mlp_dim),
            ("depth", self.depth),
            ("n_way", self.n_way),
            ("k_shot", self.k_shot),
        ] {
            if value == 0 {
                return Err(Error::InvalidArgument(format!(
                    "the FS-CT head's {name} must be at least 1"
                )));
            }
        }
        Ok(())
    }
}

/// What the head computes on one task, for inspection and tests.
#[derive(Debug, Clone)]
pub struct FsctOutputs {
    /// `[queries, classes]`.
    pub logits: Tensor,
    /// The weighted prototypes `[classes, dim]`.
    pub prototypes: Tensor,
    /// The first round's attention weights `[heads, queries, classes, 1]` (cosines,
    /// or the softmax's probabilities).
    pub attention: Tensor,
}

/// The FS-CT head (see the [module documentation](self)).
#[derive(Debug, Clone)]
pub struct Fsct {
    config: FsctConfig,
    prefix: String,
}

const EPS_LN: f64 = 1e-5;
/// `CosineDistLinear`'s guard against a zero norm, and its fixed scale for one output.
const EPS_NORM: f64 = 1e-5;
const COSINE_SCALE: f64 = 2.0;

impl Fsct {
    /// A head of `config`'s sizes.
    pub fn new(config: FsctConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            config,
            prefix: String::new(),
        })
    }

    /// The same head with its parameters named `prefix` + the repository's names
    /// (beside a backbone's, e.g. `fsct.proto_weight`).
    pub fn with_prefix(mut self, prefix: &str) -> Self {
        self.prefix = prefix.to_string();
        self
    }

    /// The ParamSet name of the repository's parameter `name`.
    fn name(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// Its sizes.
    pub fn config(&self) -> &FsctConfig {
        &self.config
    }

    /// Adds the head's parameters to `params` as the repository initialises them:
    /// prototype weights 1 (equal shots), layer norms γ = 1, β = 0, linear layers
    /// PyTorch's default `U(−1/√fan_in, 1/√fan_in)` for weights and biases, and the
    /// weight norm's `g = |v|`.
    pub fn init_params(
        &self,
        seed: u64,
        dtype: DType,
        device: &Device,
        params: &mut ParamSet,
    ) -> Result<()> {
        let c = &self.config;
        let inner = c.heads * c.dim_head;
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x6673_6374);
        let mut uniform = |shape: &[usize], fan_in: usize| -> Result<Tensor> {
            let bound = 1.0 / (fan_in as f64).sqrt();
            let n: usize = shape.iter().product();
            let values: Vec<f64> = (0..n).map(|_| rng.random_range(-bound..bound)).collect();
            Ok(Tensor::from_vec(values, shape, device)?.to_dtype(dtype)?)
        };
        let ones = |n: usize| Tensor::ones(n, dtype, device);
        let zeros = |n: usize| Tensor::zeros(n, dtype, device);
        let mut put = |name: &str, t: Tensor| params.insert(self.name(name), t);
        put(
            "proto_weight",
            Tensor::ones((c.n_way, c.k_shot, 1), dtype, device)?,
        )?;
        put("ATTN.input_linear.0.weight", ones(c.dim)?)?;
        put("ATTN.input_linear.0.bias", zeros(c.dim)?)?;
        put(
            "ATTN.input_linear.1.weight",
            uniform(&[inner, c.dim], c.dim)?,
        )?;
        put(
            "ATTN.output_linear.weight",
            uniform(&[c.dim, inner], inner)?,
        )?;
        put("ATTN.output_linear.bias", uniform(&[c.dim], inner)?)?;
        put("FFN.0.weight", ones(c.dim)?)?;
        put("FFN.0.bias", zeros(c.dim)?)?;
        put("FFN.1.weight", uniform(&[c.mlp_dim, c.dim], c.dim)?)?;
        put("FFN.1.bias", uniform(&[c.mlp_dim], c.dim)?)?;
        put("FFN.3.weight", uniform(&[c.dim, c.mlp_dim], c.mlp_dim)?)?;
        put("FFN.3.bias", uniform(&[c.dim], c.mlp_dim)?)?;
        put("linear.0.weight", ones(c.dim)?)?;
        put("linear.0.bias", zeros(c.dim)?)?;
        put("linear.1.weight", uniform(&[c.dim_head, c.dim], c.dim)?)?;
        put("linear.1.bias", uniform(&[c.dim_head], c.dim)?)?;
        match c.attention {
            FsctAttention::Cosine => {
                let v = uniform(&[1, c.dim_head], c.dim_head)?;
                let g = v.sqr()?.sum_keepdim(1)?.sqrt()?;
                put("linear.2.L.weight_v", v)?;
                put("linear.2.L.weight_g", g)?;
            }
            FsctAttention::Softmax => {
                put("linear.2.weight", uniform(&[1, c.dim_head], c.dim_head)?)?;
                put("linear.2.bias", uniform(&[1], c.dim_head)?)?;
            }
        }
        Ok(())
    }

    /// Logits `[queries, classes]` of `query` embeddings `[queries, dim]` against the
    /// classes of `support` embeddings `[classes, shots, dim]` (class-major).
    pub fn logits(&self, params: &ParamSet, support: &Tensor, query: &Tensor) -> Result<Tensor> {
        Ok(self.forward(params, support, query)?.logits)
    }

    /// The logits with the prototypes and the first round's attention.
    pub fn forward(
        &self,
        params: &ParamSet,
        support: &Tensor,
        query: &Tensor,
    ) -> Result<FsctOutputs> {
        let c = &self.config;
        let (ways, shots, dim) = support.dims3()?;
        let (queries, query_dim) = query.dims2()?;
        if (ways, shots, dim) != (c.n_way, c.k_shot, c.dim) || query_dim != c.dim {
            return Err(Error::InvalidArgument(format!(
                "the FS-CT head takes support embeddings [{}, {}, {}] and query embeddings \
                 [queries, {}], got {:?} and {:?}",
                c.n_way,
                c.k_shot,
                c.dim,
                c.dim,
                support.dims(),
                query.dims()
            )));
        }
        let p = |name: &str| params.require(&self.name(name));
        // Prototypes: a softmax over each class's shots weighs them.
        let weights = ops::softmax(&p("proto_weight")?.reshape((ways, shots))?)?;
        let prototypes = support.broadcast_mul(&weights.unsqueeze(2)?)?.sum(1)?;
        // Keys and values: each query's projection, a key set of one per query.
        let keys = self.project(params, query)?; // [heads, queries, 1, dim_head]
                                                 // Rounds start from the prototypes, shared by every query ([1, classes, dim]).
        let mut x = prototypes.unsqueeze(0)?;
        let mut first_attention = None;
        for _ in 0..c.depth {
            let q = self.project(params, &x)?; // [heads, 1 or queries, classes, dim_head]
            let attention = match c.attention {
                FsctAttention::Cosine => {
                    let dots = q.broadcast_mul(&keys)?.sum_keepdim(D::Minus1)?;
                    let q_norm = q.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
                    let k_norm = keys.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
                    dots.broadcast_div(&q_norm.broadcast_mul(&k_norm)?)?
                }
                FsctAttention::Softmax => {
                    let dots = q.broadcast_mul(&keys)?.sum_keepdim(D::Minus1)?;
                    ops::softmax(&(dots * (c.dim_head as f64).powf(-0.5))?)?
                }
            }; // [heads, queries, classes, 1]
            let out = attention.broadcast_mul(&keys)?; // [heads, queries, classes, dim_head]
            let out = out
                .permute((1, 2, 0, 3))?
                .reshape((queries, ways, c.heads * c.dim_head))?;
            let attended = ops::linear(
                &out,
                p("ATTN.output_linear.weight")?,
                Some(p("ATTN.output_linear.bias")?),
            )?;
            let x1 = attended.broadcast_add(&x)?;
            let hidden = ops::norm::layer_norm(&x1, p("FFN.0.weight")?, p("FFN.0.bias")?, EPS_LN)?;
            let hidden = ops::gelu_erf(&ops::linear(
                &hidden,
                p("FFN.1.weight")?,
                Some(p("FFN.1.bias")?),
            )?)?;
            let ffn = ops::linear(&hidden, p("FFN.3.weight")?, Some(p("FFN.3.bias")?))?;
            x = (x1 + ffn)?;
            first_attention.get_or_insert(attention);
        }
        let y = ops::norm::layer_norm(&x, p("linear.0.weight")?, p("linear.0.bias")?, EPS_LN)?;
        let y = ops::linear(&y, p("linear.1.weight")?, Some(p("linear.1.bias")?))?;
        let logits = match c.attention {
            FsctAttention::Cosine => {
                let axis = match c.feature_norm {
                    FeatureNorm::Classes => 1,
                    FeatureNorm::Features => 2,
                };
                let norm = (y.sqr()?.sum_keepdim(axis)?.sqrt()? + EPS_NORM)?;
                let normalised = y.broadcast_div(&norm)?;
                let v = p("linear.2.L.weight_v")?;
                let g = p("linear.2.L.weight_g")?;
                let w = v
                    .broadcast_mul(g)?
                    .broadcast_div(&v.sqr()?.sum_keepdim(1)?.sqrt()?)?;
                (ops::linear(&normalised, &w, None)? * COSINE_SCALE)?
            }
            FsctAttention::Softmax => {
                ops::linear(&y, p("linear.2.weight")?, Some(p("linear.2.bias")?))?
            }
        };
        Ok(FsctOutputs {
            logits: logits.squeeze(2)?,
            prototypes,
            attention: first_attention.expect("depth is at least 1"),
        })
    }

    /// `LN(t)·Wᵀ` split into heads: `[rows, cols, dim]` → `[heads, rows, cols, dim_head]`,
    /// and a matrix `[rows, dim]` → `[heads, rows, 1, dim_head]`.
    fn project(&self, params: &ParamSet, t: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        let t = if t.rank() == 2 {
            t.unsqueeze(1)?
        } else {
            t.clone()
        };
        let (rows, cols, _) = t.dims3()?;
        let normed = ops::norm::layer_norm(
            &t,
            params.require(&self.name("ATTN.input_linear.0.weight"))?,
            params.require(&self.name("ATTN.input_linear.0.bias"))?,
            EPS_LN,
        )?;
        let projected = ops::linear(
            &normed,
            params.require(&self.name("ATTN.input_linear.1.weight"))?,
            None,
        )?;
        Ok(projected
            .reshape((rows, cols, c.heads, c.dim_head))?
            .permute((2, 0, 1, 3))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{self, assert_close, Fixture};
    use crate::tensor::GradGraph;

    const FORWARD: f64 = 1e-10;
    const GRADIENT: f64 = 1e-8;

    fn config_of(f: &Fixture, feature_norm: FeatureNorm) -> FsctConfig {
        let size = |key: &str| f.value(&format!("/config/{key}")).as_u64().unwrap() as usize;
        assert_eq!(f.value("/config/variant"), "cosine");
        FsctConfig {
            dim: size("dim"),
            heads: size("heads"),
            dim_head: size("dim_head"),
            mlp_dim: size("mlp_dim"),
            depth: size("depth"),
            n_way: size("n_way"),
            k_shot: size("k_shot"),
            attention: FsctAttention::Cosine,
            feature_norm,
        }
    }

    /// The head's parameters and the two embedding sets, all leaves.
    fn leaves(f: &Fixture) -> ParamSet {
        let mut params = ParamSet::new();
        for name in f.value("/param_order").as_array().unwrap() {
            let name = name.as_str().unwrap();
            params.insert(name, f.tensor(name).clone()).unwrap();
        }
        for name in ["support_embeddings", "query_embeddings"] {
            params.insert(name, f.tensor(name).clone()).unwrap();
        }
        params.to_leaves().unwrap()
    }

    fn labels(f: &Fixture) -> Tensor {
        f.tensor("query_labels").to_dtype(DType::U32).unwrap()
    }

    /// Logits, loss and every gradient of the repository's head, in f64.
    #[test]
    fn fsct_head_matches_the_fixture() {
        let Some(f) = fixtures::load("fsct_vic") else {
            return;
        };
        let head = Fsct::new(config_of(&f, FeatureNorm::Classes)).unwrap();
        let p = leaves(&f);
        let (support, query) = (
            p.require("support_embeddings").unwrap(),
            p.require("query_embeddings").unwrap(),
        );
        let out = head.forward(&p, support, query).unwrap();
        assert_close(
            "prototypes",
            &out.prototypes,
            f.tensor("prototypes"),
            FORWARD,
        );
        assert_close(
            "cosine attention",
            &out.attention,
            f.tensor("cosine_attention"),
            FORWARD,
        );
        assert_close("logits", &out.logits, f.tensor("logits"), FORWARD);
        let loss = ops::cross_entropy(&out.logits, &labels(&f), 0.0).unwrap();
        assert_close("loss", &loss.reshape(1).unwrap(), f.tensor("loss"), FORWARD);
        let grads = p.gradients(&loss, GradGraph::Detach).unwrap();
        for (name, grad) in grads.iter() {
            assert_close(
                &format!("grad.{name}"),
                grad,
                f.tensor(&format!("grad.{name}")),
                GRADIENT,
            );
        }
        assert_eq!(grads.len(), 20);
    }

    /// The variant that normalises each feature vector: the fixture's alternative.
    #[test]
    fn feature_normalisation_matches_the_fixtures_alternative() {
        let Some(f) = fixtures::load("fsct_vic") else {
            return;
        };
        let head = Fsct::new(config_of(&f, FeatureNorm::Features)).unwrap();
        let p = leaves(&f);
        let logits = head
            .logits(
                &p,
                p.require("support_embeddings").unwrap(),
                p.require("query_embeddings").unwrap(),
            )
            .unwrap();
        assert_close("logits", &logits, f.tensor("alt_featnorm.logits"), FORWARD);
        let loss = ops::cross_entropy(&logits, &labels(&f), 0.0).unwrap();
        assert_close(
            "loss",
            &loss.reshape(1).unwrap(),
            f.tensor("alt_featnorm.loss"),
            FORWARD,
        );
    }

    /// Each VIC term, the total with the fixture's weights, and their gradients.
    #[test]
    fn vic_terms_match_the_fixture() {
        let Some(f) = fixtures::load("fsct_vic") else {
            return;
        };
        let vic = |key: &str| f.value(&format!("/vic/{key}")).as_f64().unwrap();
        let head = Fsct::new(config_of(&f, FeatureNorm::Classes)).unwrap();
        let p = leaves(&f);
        let support = p.require("support_embeddings").unwrap();
        let query = p.require("query_embeddings").unwrap();
        let (ways, shots, dim) = support.dims3().unwrap();
        let rows = support.reshape((ways * shots, dim)).unwrap();
        let (threshold, eps) = (vic("variance_threshold"), vic("covariance_epsilon"));
        assert_close(
            "std",
            &ops::vic_std(support).unwrap(),
            f.tensor("vic_std"),
            FORWARD,
        );
        assert_close(
            "covariance matrix",
            &ops::vic_covariance_matrix(&rows, eps).unwrap(),
            f.tensor("vic_covariance_matrix"),
            FORWARD,
        );
        let variance = ops::vic_variance(support, threshold).unwrap();
        let covariance = ops::vic_covariance(&rows, eps).unwrap();
        let scalar = |t: &Tensor| t.reshape(1).unwrap();
        assert_close(
            "variance",
            &scalar(&variance),
            f.tensor("vic_variance_loss"),
            FORWARD,
        );
        assert_close(
            "covariance",
            &scalar(&covariance),
            f.tensor("vic_covariance_loss"),
            FORWARD,
        );
        let gradient = |loss: &Tensor, name: &str| {
            p.gradients(loss, GradGraph::Detach)
                .unwrap()
                .require(name)
                .unwrap()
                .clone()
        };
        for (loss, key) in [
            (&variance, "grad_vic_variance"),
            (&covariance, "grad_vic_covariance"),
        ] {
            assert_close(
                key,
                &gradient(loss, "support_embeddings"),
                f.tensor(&format!("{key}.support_embeddings")),
                GRADIENT,
            );
        }
        let logits = head.logits(&p, support, query).unwrap();
        let ce = ops::cross_entropy(&logits, &labels(&f), 0.0).unwrap();
        let total = ((ce * vic("lambda_i")).unwrap()
            + ops::vic_regulariser(support, vic("lambda_v"), vic("lambda_c"), threshold, eps)
                .unwrap())
        .unwrap();
        assert_close(
            "total",
            &scalar(&total),
            f.tensor("vic_total_loss"),
            FORWARD,
        );
        for name in ["support_embeddings", "query_embeddings"] {
            assert_close(
                name,
                &gradient(&total, name),
                f.tensor(&format!("grad_vic_total.{name}")),
                GRADIENT,
            );
        }
    }

    /// One shot per class: every spread is 0, where the square root has no
    /// derivative; the variance term is its constant, with a zero gradient, and the
    /// head takes the single shot as the prototype.
    #[test]
    fn one_shot_tasks_have_a_constant_variance_term_and_finite_gradients() {
        let dev = Device::Cpu;
        let support = crate::tensor::gradcheck::random_tensor(&[4, 1, 6], 5, &dev).unwrap();
        let p = ParamSet::from_pairs([("s", support)])
            .unwrap()
            .to_leaves()
            .unwrap();
        let s = p.require("s").unwrap();
        let total = ops::vic_regulariser(s, 1.0, 0.04, 1.0, 1e-4).unwrap();
        let variance = ops::vic_variance(s, 1.0).unwrap();
        assert_eq!(variance.to_scalar::<f64>().unwrap(), 1.0);
        let grad = p.gradients(&total, GradGraph::Detach).unwrap();
        let values = grad.require("s").unwrap().flatten_all().unwrap();
        assert!(values
            .to_vec1::<f64>()
            .unwrap()
            .iter()
            .all(|v| v.is_finite()));

        let head = Fsct::new(FsctConfig {
            heads: 2,
            dim_head: 3,
            mlp_dim: 5,
            ..FsctConfig::new(6, 4, 1)
        })
        .unwrap();
        let mut params = ParamSet::new();
        head.init_params(1, DType::F64, &dev, &mut params).unwrap();
        let query = crate::tensor::gradcheck::random_tensor(&[3, 6], 6, &dev).unwrap();
        let out = head.forward(&params, s, &query).unwrap();
        assert_eq!(out.logits.dims(), &[3, 4]);
        assert_close("prototypes", &out.prototypes, &s.squeeze(1).unwrap(), 1e-15);
    }

    /// Wrong embedding shapes are refused with both shapes named.
    #[test]
    fn wrong_shapes_are_refused() {
        let dev = Device::Cpu;
        let head = Fsct::new(FsctConfig::new(8, 5, 2)).unwrap();
        let mut params = ParamSet::new();
        head.init_params(1, DType::F32, &dev, &mut params).unwrap();
        let support = Tensor::zeros((5, 3, 8), DType::F32, &dev).unwrap();
        let query = Tensor::zeros((4, 8), DType::F32, &dev).unwrap();
        let err = head
            .logits(&params, &support, &query)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("[5, 2, 8]") && err.contains("[5, 3, 8]"),
            "{err}"
        );
        assert!(Fsct::new(FsctConfig::new(0, 5, 2)).is_err());
    }
}
