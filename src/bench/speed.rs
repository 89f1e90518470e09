//! `melora bench speed`: seconds per meta-iteration of melora and of a PyTorch + peft
//! implementation of the same learners (`bench/pytorch/meta_bench.py`), on the same
//! episodes, one point per fresh process, the two programs alternating.
//!
//! Both read an [`EpisodeFile`]: meta-batches of real tasks (WordNet definitions
//! through the model's tokenizer, by default) as token ids without padding; each
//! program pads every batch on the right to its longest sequence.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::memory::{FirstStep, Measurement};
use crate::config::{Config, Variant};
use crate::data::{Batch, EpisodeSource, Split};
use crate::{Error, Result};

/// What an [`EpisodeFile`]'s `format` field holds.
pub const EPISODES_FORMAT: &str = "melora-episodes";

/// The labelled examples of one side of a task, unpadded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Examples {
    /// Token ids of each example (special tokens included, no padding).
    pub ids: Vec<Vec<u32>>,
    /// The class of each example within its task (0..n_way).
    pub labels: Vec<u32>,
}

/// One task: support and query examples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskExamples {
    /// The examples adapted on.
    pub support: Examples,
    /// The examples scored after adaptation.
    pub query: Examples,
}

/// Episodes written once and read by both benchmarked programs, with the settings
/// both must use (the model folder, the task shape and LoRA's).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpisodeFile {
    /// Always [`EPISODES_FORMAT`].
    pub format: String,
    /// The model folder the ids were tokenised for (a built-in model's name for
    /// tests: PyTorch needs a folder).
    pub model: PathBuf,
    /// The id batches are padded with.
    pub pad_id: u32,
    /// Classes per task.
    pub n_way: usize,
    /// Support examples per class.
    pub k_shot: usize,
    /// Query examples per class.
    pub n_query: usize,
    /// Longest sequence (`model.max_length`); shorter ones are not padded to it.
    pub max_length: usize,
    /// LoRA rank.
    pub lora_rank: usize,
    /// LoRA scale numerator (the update is scaled by alpha / rank).
    pub lora_alpha: f64,
    /// The linear layers LoRA adapts.
    pub lora_targets: Vec<String>,
    /// Tasks per meta-batch, in order; meta-iteration i reads meta-batch i.
    pub meta_batches: Vec<Vec<TaskExamples>>,
}

impl EpisodeFile {
    /// Draws `meta_batches` meta-batches of the training split of `config`'s data,
    /// tokenised by its model's tokenizer.
    pub fn sample(config: &Config, meta_batches: usize) -> Result<Self> {
        let model = config
            .model
            .path
            .clone()
            .unwrap_or_else(|| PathBuf::from(&config.model.name));
        let encoder = crate::run::build::build_text_encoder(config)?;
        let sources = crate::run::build::build_sources(config, &[Split::Train])?;
        let source = &sources[0];
        let per_batch = config.meta_learning.meta_batch_size;
        let mut batches = Vec::with_capacity(meta_batches);
        for b in 0..meta_batches {
            let tasks = (0..per_batch)
                .map(|t| {
                    let episode = source.episode((b * per_batch + t) as u64)?;
                    Ok(TaskExamples {
                        support: examples_of(&episode.support)?,
                        query: examples_of(&episode.query)?,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            batches.push(tasks);
        }
        let targets = config
            .lora
            .target_modules
            .clone()
            .unwrap_or_else(|| vec!["query".into(), "value".into()]);
        Ok(Self {
            format: EPISODES_FORMAT.into(),
            model,
            pad_id: encoder.pad_id(),
            n_way: config.data.n_way,
            k_shot: config.data.k_shot,
            n_query: config.data.n_query,
            max_length: config.model.max_length,
            lora_rank: config.lora.rank,
            lora_alpha: config.lora.alpha,
            lora_targets: targets,
            meta_batches: batches,
        })
    }

    /// Reads and checks a file written by [`EpisodeFile::write`].
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
            path: path.to_owned(),
            source: e,
        })?;
        let file: Self = serde_json::from_str(&text).map_err(|e| Error::Format {
            path: path.to_owned(),
            message: format!("not an episodes file of `melora bench speed`: {e}"),
        })?;
        let bad = |message: String| Error::Format {
            path: path.to_owned(),
            message,
        };
        if file.format != EPISODES_FORMAT {
            return Err(bad(format!(
                "format is `{}`, expected `{EPISODES_FORMAT}`",
                file.format
            )));
        }
        if file.meta_batches.is_empty() || file.meta_batches.iter().any(Vec::is_empty) {
            return Err(bad("it holds an empty meta-batch".into()));
        }
        for task in file.meta_batches.iter().flatten() {
            for side in [&task.support, &task.query] {
                if side.ids.is_empty()
                    || side.ids.len() != side.labels.len()
                    || side.ids.iter().any(Vec::is_empty)
                    || side.labels.iter().any(|&l| l as usize >= file.n_way)
                {
                    return Err(bad(format!(
                        "a task's examples do not match their labels (each side needs as \
                         many non-empty sequences as labels, labels below n_way = {})",
                        file.n_way
                    )));
                }
            }
        }
        Ok(file)
    }

    /// Writes the file atomically (a temporary file, then a rename).
    pub fn write(&self, path: &Path) -> Result<()> {
        let json = serde_json::to_string(self).map_err(|e| Error::Format {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        crate::io::write_atomic(path, json.as_bytes())
    }

    /// The episodes as a source: episode `i` is task `i mod B` of meta-batch `i / B`
    /// (cycling), so that a prefetcher of meta-batches of B reads meta-batch i at
    /// meta-iteration i.
    pub fn source(&self) -> Result<Arc<dyn EpisodeSource>> {
        let tasks = self
            .meta_batches
            .iter()
            .flatten()
            .map(|task| {
                crate::data::Episode::with_classes(
                    padded(&task.support, self.pad_id)?,
                    padded(&task.query, self.pad_id)?,
                    self.n_way,
                    self.k_shot,
                    self.n_query,
                    Vec::new(),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Arc::new(FileEpisodes { tasks }))
    }

    /// Tasks per meta-batch (the first's).
    pub fn meta_batch_size(&self) -> usize {
        self.meta_batches[0].len()
    }

    /// Real (unpadded) tokens of meta-batch `index`, support and query.
    pub fn tokens(&self, index: usize) -> usize {
        self.meta_batches[index % self.meta_batches.len()]
            .iter()
            .flat_map(|t| t.support.ids.iter().chain(&t.query.ids))
            .map(Vec::len)
            .sum()
    }
}

/// The ids of each row of `batch` up to its attention mask's length, and its labels.
fn examples_of(batch: &Batch) -> Result<Examples> {
    let crate::data::Inputs::Tokens(tokens) = &batch.inputs else {
        return Err(Error::InvalidArgument(
            "the speed benchmark measures text tasks; the configured data are not text".into(),
        ));
    };
    let ids = tokens.input_ids.to_vec2::<u32>()?;
    let mask = tokens.attention_mask.to_vec2::<u32>()?;
    let ids = ids
        .into_iter()
        .zip(mask)
        .map(|(row, mask)| {
            let length = mask.iter().filter(|&&m| m != 0).count();
            row[..length].to_vec()
        })
        .collect();
    Ok(Examples {
        ids,
        labels: batch.labels.to_vec1::<u32>()?,
    })
}

/// `examples` as a batch padded on the right to its longest sequence.
fn padded(examples: &Examples, pad_id: u32) -> Result<Batch> {
    let longest = examples.ids.iter().map(Vec::len).max().unwrap_or(0);
    let rows = examples.ids.len();
    let (mut ids, mut mask) = (Vec::with_capacity(rows * longest), Vec::new());
    for row in &examples.ids {
        ids.extend(row.iter().copied());
        ids.extend(std::iter::repeat_n(pad_id, longest - row.len()));
        mask.extend(std::iter::repeat_n(1u32, row.len()));
        mask.extend(std::iter::repeat_n(0u32, longest - row.len()));
    }
    let device = Device::Cpu;
    Batch::from_tokens(
        Tensor::from_vec(ids, (rows, longest), &device)?,
        Tensor::from_vec(mask, (rows, longest), &device)?,
        None,
        Tensor::new(examples.labels.as_slice(), &device)?,
    )
}

struct FileEpisodes {
    tasks: Vec<crate::data::Episode>,
}

impl EpisodeSource for FileEpisodes {
    fn episode(&self, index: u64) -> Result<crate::data::Episode> {
        Ok(self.tasks[(index % self.tasks.len() as u64) as usize].clone())
    }
}

/// The PyTorch script's name for a melora method, `None` where it has none: both
/// MAML modes compute the same meta-gradient, which PyTorch computes with the
/// whole graph.
pub fn pytorch_method(variant: Variant) -> Option<&'static str> {
    Some(match variant {
        Variant::Maml | Variant::MamlFullGraph => "maml",
        Variant::Fomaml => "fomaml",
        Variant::Reptile => "reptile",
        Variant::MeloraDiagonal => "melora-diagonal",
        Variant::MeloraGaussNewton => "melora-gauss_newton",
        _ => return None,
    })
}

/// What `bench/pytorch/meta_bench.py` prints for one point.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PytorchPoint {
    /// Seconds of each timed meta-iteration.
    pub seconds: Vec<f64>,
    /// Their median.
    pub seconds_per_iteration: f64,
    /// Real tokens (support and query) per second.
    pub tokens_per_second: f64,
    /// Resident bytes after loading the model.
    pub rss_after_load_bytes: u64,
    /// Peak resident bytes from then on.
    pub peak_rss_bytes: u64,
    /// The difference.
    pub peak_increment_bytes: u64,
    /// Versions of torch, transformers and peft.
    pub versions: serde_json::Value,
    /// The share of a profiled meta-iteration's wall time (after the timed ones, the
    /// profiler's overhead included) spent in matrix-product ops (`aten::mm`,
    /// `addmm`, `bmm`, …, their own time).
    #[serde(default)]
    pub matmul_share: Option<f64>,
    /// What the warm-up meta-iteration computed.
    #[serde(default)]
    pub first_step: Option<FirstStep>,
}

/// One method and K, measured by both programs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpeedRow {
    /// melora's method.
    pub method: Variant,
    /// Inner steps.
    pub k: usize,
    /// melora's measurement, or why there is none.
    pub melora: std::result::Result<Measurement, String>,
    /// melora's real tokens per second (support and query, the median iteration).
    pub melora_tokens_per_second: Option<f64>,
    /// PyTorch's measurement, or why there is none.
    pub pytorch: std::result::Result<PytorchPoint, String>,
}

impl SpeedRow {
    /// melora's seconds over PyTorch's (below 1: melora is faster).
    pub fn time_ratio(&self) -> Option<f64> {
        match (&self.melora, &self.pytorch) {
            (Ok(m), Ok(p)) => Some(m.seconds_per_iter / p.seconds_per_iteration),
            _ => None,
        }
    }

    /// Both programs' first meta-iterations, where both reported one: (melora's,
    /// PyTorch's).
    pub fn first_steps(&self) -> Option<(FirstStep, FirstStep)> {
        match (&self.melora, &self.pytorch) {
            (Ok(m), Ok(p)) => Some((m.first_step?, p.first_step?)),
            _ => None,
        }
    }
}

/// |a − b| / |b| (0 when both are 0).
fn relative_difference(a: f64, b: f64) -> f64 {
    if a == b {
        0.0
    } else {
        (a - b).abs() / b.abs()
    }
}

/// A share as a percentage, or a dash.
fn percent(share: Option<f64>) -> String {
    share.map_or("–".into(), |s| format!("{:.0}%", 100.0 * s))
}

/// What one inner step costs a method, from its rows at two K.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InnerStepCost {
    /// melora's method.
    pub method: Variant,
    /// The smaller K.
    pub from_k: usize,
    /// The larger K.
    pub to_k: usize,
    /// melora's seconds per inner step, where both of its points were measured.
    pub melora: Option<f64>,
    /// PyTorch's seconds per inner step, where both of its points were measured.
    pub pytorch: Option<f64>,
}

/// The benchmark's results: what was run and every row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpeedBench {
    /// The episodes file both programs read.
    pub episodes: PathBuf,
    /// The model folder.
    pub model: PathBuf,
    /// Threads of each program's kernels.
    pub threads: usize,
    /// Timed meta-iterations per point (after one warm-up).
    pub iterations: usize,
    /// The machine and when.
    pub machine: super::machine::Machine,
    /// The rows, in the order measured.
    pub rows: Vec<SpeedRow>,
}

impl SpeedBench {
    /// The table of both programs' figures and their ratios.
    pub fn to_markdown(&self) -> String {
        let bytes = crate::memory::format_bytes;
        let mut out = format!(
            "# melora against PyTorch + peft\n\nModel {}, episodes {} (padded to each \
             batch's longest sequence); {} timed meta-iterations after one warm-up, median; \
             {} kernel threads each; one fresh process per point, the programs \
             alternating.\n\n\
             | method | K | PyTorch s/iteration | melora s/iteration | melora ÷ PyTorch | \
             PyTorch tokens/s | melora tokens/s | PyTorch peak RSS − RSS after load | \
             melora heap peak (model included) |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
            self.model.display(),
            self.episodes.display(),
            self.iterations,
            self.threads,
        );
        for row in &self.rows {
            let (pt_s, pt_tok, pt_mem) = match &row.pytorch {
                Ok(p) => (
                    format!("{:.2}", p.seconds_per_iteration),
                    format!("{:.0}", p.tokens_per_second),
                    bytes(p.peak_increment_bytes),
                ),
                Err(e) => (format!("failed: {e}"), "–".into(), "–".into()),
            };
            let (m_s, m_mem) = match &row.melora {
                Ok(m) => (
                    format!("{:.2}", m.seconds_per_iter),
                    m.peak_bytes.map_or("–".into(), bytes),
                ),
                Err(e) => (format!("failed: {e}"), "–".into()),
            };
            let m_tok = row
                .melora_tokens_per_second
                .map_or("–".into(), |t| format!("{t:.0}"));
            let ratio = row.time_ratio().map_or("–".into(), |r| format!("{r:.2}×"));
            out.push_str(&format!(
                "| {} | {} | {pt_s} | {m_s} | {ratio} | {pt_tok} | {m_tok} | {pt_mem} | {m_mem} |\n",
                super::memory::label(row.method),
                row.k,
            ));
        }
        out.push_str(&self.computation_markdown());
        let steps = self.per_inner_step();
        if !steps.is_empty() {
            out.push_str(
                "\n## Per inner step\n\nSeconds each extra inner step adds to a meta-iteration: \
                 the slope between a method's smallest and largest K (the rest is the \
                 query pass and the meta-update).\n\n\
                 | method | K | PyTorch s / inner step | melora s / inner step | melora ÷ PyTorch |\n\
                 |---|---|---:|---:|---:|\n",
            );
            for step in steps {
                let seconds = |s: Option<f64>| s.map_or("–".into(), |s| format!("{s:.3}"));
                let ratio = match (step.melora, step.pytorch) {
                    (Some(m), Some(p)) if p > 0.0 => format!("{:.2}×", m / p),
                    _ => "–".into(),
                };
                out.push_str(&format!(
                    "| {} | {} → {} | {} | {} | {ratio} |\n",
                    super::memory::label(step.method),
                    step.from_k,
                    step.to_k,
                    seconds(step.pytorch),
                    seconds(step.melora),
                ));
            }
        }
        out
    }

    /// The table of where each program's time goes (the share in matrix products)
    /// and of whether both computed the same first meta-iteration.
    fn computation_markdown(&self) -> String {
        let mut out = String::from(
            "\n## Matrix products and the same computation\n\nShare of time in matrix \
             products: melora's over the timed iterations (the calling thread inside a \
             GEMM kernel), PyTorch's from `torch.profiler` over one more iteration (the \
             own time of `aten::mm`, `addmm`, `bmm` and the like; the profiler's overhead \
             counts as other time). Both programs start from the same parameters (melora \
             writes them as a PEFT adapter, `initial-adapter/`); their first \
             meta-iteration's mean query loss after adaptation and meta-gradient norm \
             (before clipping) should agree to float32 rounding, except where a method \
             draws random probes (MELoRA diagonal: Hutchinson's), whose norms differ by \
             the draw.\n\n\
             | method | K | PyTorch GEMM share | melora GEMM share | PyTorch query loss | \
             melora query loss | relative difference | PyTorch meta-gradient norm | \
             melora meta-gradient norm | relative difference |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        );
        for row in &self.rows {
            let pytorch_share = row.pytorch.as_ref().ok().and_then(|p| p.matmul_share);
            let melora_share = row.melora.as_ref().ok().and_then(|m| m.matmul_share);
            let side = |step: Option<FirstStep>, field: fn(&FirstStep) -> f64| {
                step.map_or("–".into(), |s| format!("{:.6}", field(&s)))
            };
            let pytorch_step = row.pytorch.as_ref().ok().and_then(|p| p.first_step);
            let melora_step = row.melora.as_ref().ok().and_then(|m| m.first_step);
            let (loss_diff, norm_diff) = match row.first_steps() {
                Some((m, p)) => (
                    format!("{:.1e}", relative_difference(m.query_loss, p.query_loss)),
                    format!(
                        "{:.1e}",
                        relative_difference(m.meta_gradient_norm, p.meta_gradient_norm)
                    ),
                ),
                None => ("–".into(), "–".into()),
            };
            let loss = |s: &FirstStep| s.query_loss;
            let norm = |s: &FirstStep| s.meta_gradient_norm;
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {loss_diff} | {} | {} | {norm_diff} |\n",
                super::memory::label(row.method),
                row.k,
                percent(pytorch_share),
                percent(melora_share),
                side(pytorch_step, loss),
                side(melora_step, loss),
                side(pytorch_step, norm),
                side(melora_step, norm),
            ));
        }
        out
    }

    /// For every method measured at two or more K, the seconds one inner step adds:
    /// the slope of seconds per meta-iteration between its smallest and largest K.
    pub fn per_inner_step(&self) -> Vec<InnerStepCost> {
        let mut methods: Vec<Variant> = Vec::new();
        for row in &self.rows {
            if !methods.contains(&row.method) {
                methods.push(row.method);
            }
        }
        methods
            .into_iter()
            .filter_map(|method| {
                let rows: Vec<&SpeedRow> =
                    self.rows.iter().filter(|r| r.method == method).collect();
                let first = *rows.iter().min_by_key(|r| r.k)?;
                let last = *rows.iter().max_by_key(|r| r.k)?;
                if first.k == last.k {
                    return None;
                }
                let steps = (last.k - first.k) as f64;
                let slope = |a: Option<f64>, b: Option<f64>| Some((b? - a?) / steps);
                Some(InnerStepCost {
                    method,
                    from_k: first.k,
                    to_k: last.k,
                    melora: slope(
                        first.melora.as_ref().ok().map(|m| m.seconds_per_iter),
                        last.melora.as_ref().ok().map(|m| m.seconds_per_iter),
                    ),
                    pytorch: slope(
                        first.pytorch.as_ref().ok().map(|p| p.seconds_per_iteration),
                        last.pytorch.as_ref().ok().map(|p| p.seconds_per_iteration),
                    ),
                })
            })
            .collect()
    }

    /// Writes `speed.json` and `speed.md` into `dir`, each atomically; returns their
    /// paths.
    pub fn write(&self, dir: &Path) -> Result<(PathBuf, PathBuf)> {
        let json_path = dir.join("speed.json");
        let json = serde_json::to_string_pretty(self).map_err(|e| Error::Format {
            path: json_path.clone(),
            message: e.to_string(),
        })?;
        crate::io::write_atomic(&json_path, format!("{json}\n").as_bytes())?;
        let md_path = dir.join("speed.md");
        crate::io::write_atomic(&md_path, self.to_markdown().as_bytes())?;
        Ok((json_path, md_path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        let mut c = Config::default();
        c.data.n_way = 3;
        c.data.k_shot = 2;
        c.data.n_query = 1;
        c.meta_learning.meta_batch_size = 2;
        c
    }

    #[test]
    fn episodes_survive_the_file_and_pad_to_each_batch_longest() {
        let config = config();
        let file = EpisodeFile::sample(&config, 3).unwrap();
        assert_eq!(file.meta_batches.len(), 3);
        assert_eq!(file.meta_batch_size(), 2);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("episodes.json");
        file.write(&path).unwrap();
        let back = EpisodeFile::read(&path).unwrap();
        assert_eq!(back, file);
        // Meta-batch 1, task 0 is episode 2 of the source; its support keeps its ids.
        let source = back.source().unwrap();
        let episode = source.episode(2).unwrap();
        let task = &file.meta_batches[1][0];
        assert_eq!(examples_of(&episode.support).unwrap(), task.support);
        let crate::data::Inputs::Tokens(tokens) = &episode.support.inputs else {
            panic!("text")
        };
        let longest = task.support.ids.iter().map(Vec::len).max().unwrap();
        assert_eq!(tokens.input_ids.dims(), [6, longest]);
        // Cycling past the end.
        let wrapped = source.episode(6).unwrap();
        assert_eq!(
            examples_of(&wrapped.query).unwrap(),
            file.meta_batches[0][0].query
        );
        assert_eq!(
            back.tokens(0),
            file.meta_batches[0]
                .iter()
                .flat_map(|t| t.support.ids.iter().chain(&t.query.ids))
                .map(Vec::len)
                .sum::<usize>()
        );
    }

    #[test]
    fn bad_episode_files_are_refused_naming_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("e.json");
        std::fs::write(&path, "{\"format\": 1}").unwrap();
        let err = EpisodeFile::read(&path).unwrap_err().to_string();
        assert!(err.contains("not an episodes file"), "{err}");
        let mut file = EpisodeFile::sample(&config(), 1).unwrap();
        file.meta_batches[0][0].support.labels[0] = 7;
        file.write(&path).unwrap();
        let err = EpisodeFile::read(&path).unwrap_err().to_string();
        assert!(err.contains("labels below n_way = 3"), "{err}");
        let missing = dir.path().join("missing.json");
        assert!(EpisodeFile::read(&missing)
            .unwrap_err()
            .to_string()
            .contains("missing.json"));
    }

    #[test]
    fn per_inner_step_is_the_slope_between_the_smallest_and_largest_k() {
        let melora = |seconds: f64| Measurement {
            peak_bytes: Some(1 << 20),
            baseline_bytes: None,
            model_bytes: None,
            rss_bytes: None,
            seconds: vec![seconds],
            seconds_per_iter: seconds,
            kernel_threads: 2,
            matmul_share: Some(0.25),
            first_step: Some(FirstStep {
                query_loss: 1.0,
                meta_gradient_norm: 2.2,
            }),
        };
        let pytorch = |seconds: f64| PytorchPoint {
            seconds: vec![seconds],
            seconds_per_iteration: seconds,
            tokens_per_second: 1.0,
            rss_after_load_bytes: 0,
            peak_rss_bytes: 0,
            peak_increment_bytes: 0,
            versions: serde_json::Value::Null,
            matmul_share: Some(0.5),
            first_step: Some(FirstStep {
                query_loss: 1.0,
                meta_gradient_norm: 2.0,
            }),
        };
        let row = |method, k, m: f64, p: Option<f64>| SpeedRow {
            method,
            k,
            melora: Ok(melora(m)),
            melora_tokens_per_second: None,
            pytorch: p.map(pytorch).ok_or_else(|| "not run".to_string()),
        };
        let bench = SpeedBench {
            episodes: "e.json".into(),
            model: "m".into(),
            threads: 2,
            iterations: 1,
            machine: crate::bench::machine::Machine::current(),
            rows: vec![
                row(Variant::Fomaml, 1, 1.0, Some(2.0)),
                row(Variant::Maml, 1, 3.0, Some(1.0)),
                row(Variant::Fomaml, 8, 4.5, Some(9.0)),
                row(Variant::Fomaml, 4, 100.0, Some(100.0)),
                row(Variant::Maml, 8, 10.0, None),
                row(Variant::Reptile, 1, 1.0, Some(1.0)),
            ],
        };
        let steps = bench.per_inner_step();
        assert_eq!(steps.len(), 2, "Reptile has one K only");
        assert_eq!(
            (steps[0].method, steps[0].from_k, steps[0].to_k),
            (Variant::Fomaml, 1, 8)
        );
        assert!((steps[0].melora.unwrap() - 0.5).abs() < 1e-12);
        assert!((steps[0].pytorch.unwrap() - 1.0).abs() < 1e-12);
        assert_eq!(steps[1].method, Variant::Maml);
        assert!((steps[1].melora.unwrap() - 1.0).abs() < 1e-12);
        assert_eq!(steps[1].pytorch, None);
        let md = bench.to_markdown();
        assert!(md.contains("| 1 → 8 | 1.000 | 0.500 | 0.50× |"), "{md}");
        assert!(md.contains("| 1 → 8 | – | 1.000 | – |"), "{md}");
        // Shares as percentages, first steps side by side with relative differences;
        // a row PyTorch did not run has melora's side only.
        assert!(
            md.contains(
                "| fomaml | 1 | 50% | 25% | 1.000000 | 1.000000 | 0.0e0 | 2.000000 | \
                 2.200000 | 1.0e-1 |"
            ),
            "{md}"
        );
        assert!(
            md.contains("| 8 | – | 25% | – | 1.000000 | – | – | 2.200000 | – |"),
            "{md}"
        );
    }
}
