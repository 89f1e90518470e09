//! `melora bench data`: how long real data takes to decode once and to batch into
//! episodes, so that data loading is known not to dominate a meta-iteration.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use candle_core::Device;
use serde::Serialize;

use super::args::{BenchDataArgs, GlobalArgs};
use super::{write_stdout, UserError};
use crate::data::readers::{read_omniglot, read_wordnet, OmniglotOptions};
use crate::data::{
    DatasetEpisodes, EncodeText, EncodedDataset, EpisodeSampler, EpisodeSource, SmallClassPolicy,
    TextTokenizer, WordHashTokenizer,
};

/// Tokens per WordNet definition (the built-in tiny models have 128 positions).
const MAX_LENGTH: usize = 64;

/// One data set's figures.
#[derive(Debug, Serialize)]
struct DataBench {
    dataset: String,
    source: String,
    tokenizer: Option<String>,
    classes: usize,
    examples: usize,
    n_way: usize,
    k_shot: usize,
    n_query: usize,
    /// Reading, decoding (and tokenising) the whole set once.
    decode_seconds: f64,
    episodes: usize,
    /// Sampling and batching `episodes` episodes into tensors.
    batch_seconds: f64,
    episodes_per_second: f64,
    ms_per_episode: f64,
}

pub(crate) fn run_data(global: &GlobalArgs, args: &BenchDataArgs) -> anyhow::Result<()> {
    if args.episodes == 0 {
        return Err(UserError::Usage("--episodes must be at least 1".into()).into());
    }
    let output = global
        .output
        .clone()
        .unwrap_or_else(|| PathBuf::from("bench-results"));
    missing(
        &args.omniglot,
        "Omniglot",
        "give the Omniglot zips or folder with --omniglot PATH",
    )?;
    missing(
        &args.wordnet.join("data.noun"),
        "WordNet",
        "install it with scripts/fetch-data.sh, or give its folder with --wordnet DIR",
    )?;

    let rows = vec![bench_omniglot(args)?, bench_wordnet(args)?];

    let json = serde_json::to_string_pretty(&serde_json::json!({ "data": rows }))?;
    let table = markdown(&rows);
    crate::io::write_atomic(&output.join("data.json"), format!("{json}\n").as_bytes())?;
    crate::io::write_atomic(&output.join("data.md"), table.as_bytes())?;
    write_stdout(&format!(
        "{table}\nwritten: {} and {}\n",
        output.join("data.json").display(),
        output.join("data.md").display()
    ))
}

fn missing(path: &Path, what: &str, fix: &str) -> anyhow::Result<()> {
    if path.exists() {
        Ok(())
    } else {
        Err(UserError::Usage(format!("{what} not found at {}: {fix}", path.display())).into())
    }
}

fn bench_omniglot(args: &BenchDataArgs) -> anyhow::Result<DataBench> {
    let started = Instant::now();
    let dataset = read_omniglot(&args.omniglot, &OmniglotOptions::default())?;
    let data = EncodedDataset::Images {
        dataset,
        channels: 1,
        height: 28,
        width: 28,
    };
    let decode_seconds = started.elapsed().as_secs_f64();
    episodes(
        "Omniglot",
        &args.omniglot,
        None,
        data,
        decode_seconds,
        (20, 1, 5),
        args.episodes,
    )
}

fn bench_wordnet(args: &BenchDataArgs) -> anyhow::Result<DataBench> {
    let started = Instant::now();
    let texts = read_wordnet(&args.wordnet)?;
    let (data, tokenizer) = match &args.tokenizer {
        Some(path) => {
            let tokenizer = TextTokenizer::from_file(path, MAX_LENGTH)?;
            (
                EncodedDataset::from_texts(texts, &tokenizer as &dyn EncodeText)?,
                path.display().to_string(),
            )
        }
        None => (
            EncodedDataset::from_texts(texts, &WordHashTokenizer::tiny(MAX_LENGTH))?,
            "built-in word hash (vocab 1000)".to_string(),
        ),
    };
    let decode_seconds = started.elapsed().as_secs_f64();
    episodes(
        "WordNet",
        &args.wordnet,
        Some(tokenizer),
        data,
        decode_seconds,
        (5, 5, 5),
        args.episodes,
    )
}

fn episodes(
    name: &str,
    source: &Path,
    tokenizer: Option<String>,
    data: EncodedDataset,
    decode_seconds: f64,
    (n_way, k_shot, n_query): (usize, usize, usize),
    count: usize,
) -> anyhow::Result<DataBench> {
    let (classes, examples) = (
        data.class_sizes().len(),
        data.class_sizes().iter().sum::<usize>(),
    );
    let sampler = EpisodeSampler::new(
        data.class_sizes(),
        &data.class_names(),
        n_way,
        k_shot,
        n_query,
        SmallClassPolicy::Skip,
    )?;
    let episodes = DatasetEpisodes::new(Arc::new(data), sampler, 0, Device::Cpu)?;
    let started = Instant::now();
    for i in 0..count as u64 {
        let episode = episodes
            .episode(i)
            .with_context(|| format!("{name} episode {i}"))?;
        std::hint::black_box(episode);
    }
    let batch_seconds = started.elapsed().as_secs_f64();
    Ok(DataBench {
        dataset: name.into(),
        source: source.display().to_string(),
        tokenizer,
        classes,
        examples,
        n_way,
        k_shot,
        n_query,
        decode_seconds,
        episodes: count,
        batch_seconds,
        episodes_per_second: count as f64 / batch_seconds.max(1e-9),
        ms_per_episode: 1e3 * batch_seconds / count as f64,
    })
}

fn markdown(rows: &[DataBench]) -> String {
    let mut out = String::from(
        "| data set | classes | examples | episode | decode once (s) | episodes | batching (s) | episodes/s | ms/episode |\n\
         |---|---:|---:|---|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        // Writing to a String cannot fail.
        let _ = writeln!(
            out,
            "| {} | {} | {} | {}-way {}-shot, {} queries | {:.2} | {} | {:.2} | {:.0} | {:.2} |",
            r.dataset,
            r.classes,
            r.examples,
            r.n_way,
            r.k_shot,
            r.n_query,
            r.decode_seconds,
            r.episodes,
            r.batch_seconds,
            r.episodes_per_second,
            r.ms_per_episode
        );
    }
    out
}
