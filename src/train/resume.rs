//! `melora full --resume`: which runs of an earlier comparison in the same
//! experiment folder are kept, and which meta-training continues from its last
//! checkpoint, so that a comparison of many hours can be run in pieces.
//!
//! A run is kept only when its configuration is the one this comparison would run
//! it with (see [`run_identity`]) and the earlier comparison scored the same test
//! tasks; anything else runs again.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::config::{Config, Variant};
use crate::{Error, Result};

use super::full::{load_results, FullResults, RunRecord, RESULTS_FILE};

/// File the earlier `results.json` is copied to before a resumed comparison
/// replaces it, so nothing it held is lost even if the new plan leaves runs out.
pub(crate) const BEFORE_RESUME_FILE: &str = "results.before-resume.json";

/// What decides the result of `variant`'s run in its configuration, as a JSON
/// value: everything but where it is written (`tracking`) and the parts of
/// `comparison` that decide which runs a comparison holds (the other methods, the
/// seeds, the ablation grid, the memory probe).
///
/// Settings only some methods read are left out of the others' identity, so that
/// changing them runs again only the runs they change: the fine-tuning learning-rate
/// sweep (the fine-tuning baselines and the pre-trained model), the pre-training
/// (`pretrain-finetune`), and MELoRA's Hessian approximation (the `melora` method,
/// whose choice as the configured method would otherwise touch every baseline).
pub(crate) fn run_identity(config: &Config, variant: Variant) -> Result<Value> {
    let mut normalised = config.clone();
    normalised.tracking = Default::default();
    let comparison = &mut normalised.comparison;
    comparison.baselines.clear();
    comparison.seeds = 1;
    comparison.ablation = Default::default();
    comparison.memory_inner_steps.clear();
    if !variant.fine_tunes() && variant != Variant::PretrainFinetune {
        comparison.finetune_lr_sweep.clear();
    }
    if variant != Variant::PretrainFinetune {
        comparison.pretrain = Default::default();
    }
    let mut value = serde_json::to_value(&normalised).map_err(|e| {
        Error::InvalidArgument(format!("the configuration does not serialise: {e}"))
    })?;
    if normalised.meta_learning.method != crate::config::Method::Melora {
        if let Some(memory) = value
            .get_mut("memory_optimization")
            .and_then(Value::as_object_mut)
        {
            memory.remove("hessian_approximation");
        }
    }
    Ok(value)
}

/// The dotted path of the first key whose value differs between two identities
/// (for telling the user why a run is not kept), or `None` when they are equal.
pub(crate) fn first_difference(earlier: &Value, now: &Value) -> Option<String> {
    fn walk(a: &Value, b: &Value, path: &str) -> Option<String> {
        match (a, b) {
            (Value::Object(a), Value::Object(b)) => {
                let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
                keys.sort();
                keys.dedup();
                keys.into_iter().find_map(|key| {
                    let child = if path.is_empty() {
                        key.clone()
                    } else {
                        format!("{path}.{key}")
                    };
                    match (a.get(key), b.get(key)) {
                        (Some(x), Some(y)) => walk(x, y, &child),
                        _ => Some(child),
                    }
                })
            }
            _ if a == b => None,
            _ => Some(if path.is_empty() {
                "(the whole configuration)".into()
            } else {
                path.to_string()
            }),
        }
    }
    walk(earlier, now, "")
}

/// The earlier comparison of an experiment folder, read for `--resume`.
pub(crate) struct Earlier {
    results: FullResults,
}

/// Whether an earlier run can stand for one this comparison would run.
pub(crate) enum Reuse {
    /// Kept as it is.
    Keep(Box<RunRecord>),
    /// Run again, for the reason given.
    Rerun(String),
    /// The earlier comparison has no such run.
    Absent,
}

impl Earlier {
    /// Reads `dir`'s `results.json`, if there is one, and checks that it scored the
    /// same test tasks as `current` will (episodes, their seed, the class split);
    /// a copy is kept as [`BEFORE_RESUME_FILE`] before anything replaces it.
    pub(crate) fn load(dir: &Path, current: &FullResults) -> Result<Option<Self>> {
        let path = dir.join(RESULTS_FILE);
        if !path.exists() {
            return Ok(None);
        }
        let results = load_results(dir)?;
        let mismatch = results.test_task_mismatch(current);
        if let Some(what) = mismatch {
            return Err(Error::InvalidArgument(format!(
                "--resume: {} holds a comparison on other test tasks ({what}), whose scores \
                 cannot be paired with this one's; give another --experiment-name, or move \
                 that folder away to start afresh",
                path.display()
            )));
        }
        let backup = dir.join(BEFORE_RESUME_FILE);
        std::fs::copy(&path, &backup).map_err(|e| Error::io(&backup, e))?;
        Ok(Some(Self { results }))
    }

    /// Whether the earlier run `label` with seed `seed` can stand for the one
    /// `config` describes: same identity (recorded with the run, or, for runs
    /// recorded before identities were, read from its folder's `config.yml`), and
    /// its folder still there when it has one.
    pub(crate) fn reuse(
        &self,
        label: &str,
        variant: Variant,
        seed: u64,
        config: &Config,
    ) -> Result<Reuse> {
        let Some(record) = self
            .results
            .runs
            .iter()
            .find(|r| r.label == label && r.seed == seed)
        else {
            return Ok(Reuse::Absent);
        };
        if let Some(dir) = &record.run_dir {
            if !dir.is_dir() {
                return Ok(Reuse::Rerun(format!(
                    "its folder {} is gone",
                    dir.display()
                )));
            }
        }
        let earlier = match (&record.config, &record.run_dir) {
            (Some(identity), _) => identity.clone(),
            (None, Some(dir)) => match saved_identity(dir, variant)? {
                Some(identity) => identity,
                None => return Ok(Reuse::Rerun(format!("{} has no config.yml", dir.display()))),
            },
            (None, None) => {
                return Ok(Reuse::Rerun(
                    "the earlier results do not record its configuration".into(),
                ))
            }
        };
        let now = run_identity(config, variant)?;
        Ok(match first_difference(&earlier, &now) {
            None => {
                let mut record = record.clone();
                record.config = Some(now);
                Reuse::Keep(Box::new(record))
            }
            Some(key) => Reuse::Rerun(format!("its configuration differs at {key}")),
        })
    }
}

/// The checkpoint an interrupted meta-training of `config` continues from: its
/// folder's `last`, when that folder's `config.yml` has the same identity; `None`
/// when there is none (or another configuration wrote it).
pub(crate) fn unfinished_training(config: &Config, variant: Variant) -> Result<Option<PathBuf>> {
    let dir = super::run::run_dir(config);
    let last = dir.join("last");
    if !last.is_dir() {
        return Ok(None);
    }
    Ok(match saved_identity(&dir, variant)? {
        Some(identity) if identity == run_identity(config, variant)? => Some(last),
        _ => None,
    })
}

/// The identity of the configuration a run folder's `config.yml` records, `None`
/// when it has none or it no longer parses (a configuration of another version).
fn saved_identity(dir: &Path, variant: Variant) -> Result<Option<Value>> {
    let path = dir.join("config.yml");
    if !path.is_file() {
        return Ok(None);
    }
    match Config::from_file(&path) {
        Ok(config) => Ok(Some(run_identity(&config, variant)?)),
        Err(_) => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::full::{experiment_dir, run_full, FullObserver, FullOptions};
    use crate::train::TrainOptions;

    /// Counts the runs a comparison trains or evaluates afresh, and those it keeps.
    #[derive(Default)]
    struct Counts {
        started: Vec<String>,
        kept: Vec<String>,
        notes: Vec<String>,
        /// Stop each training after this many iterations, as Ctrl-C would.
        stop_after: Option<usize>,
    }

    impl FullObserver for Counts {
        fn run_started(&mut self, label: &str, _seed: u64, _index: usize, _total: usize) {
            self.started.push(label.to_string());
        }
        fn run_kept(&mut self, record: &RunRecord, _index: usize, _total: usize) {
            self.kept.push(record.label.clone());
        }
        fn note(&mut self, text: &str) {
            self.notes.push(text.to_string());
        }
        fn train_options(&mut self, _label: &str, _iterations: usize) -> TrainOptions {
            TrainOptions {
                max_iterations: self.stop_after,
                ..TrainOptions::default()
            }
        }
    }

    fn config(dir: &Path) -> Config {
        let yaml = "seed: 5\nmodel:\n  name: tiny-bert\n  max_length: 8\nlora:\n  rank: 2\n\
             meta_learning:\n  method: fomaml\n  meta_batch_size: 1\n  num_iterations: 4\n  \
             inner:\n    lr: 0.5\n\
             data:\n  synthetic_task: domains\n  n_way: 2\n  k_shot: 1\n  n_query: 1\n\
             evaluation:\n  episodes: 3\n  eval_every: 2\n  val_episodes: 2\n  \
             finetune_steps: 2\n\
             comparison:\n  baselines: [prototype, lora-finetune, meta-init-finetune]\n  \
             memory_inner_steps: []\n  finetune_lr_sweep: [0.001, 0.1]\n";
        let mut config = Config::from_yaml_str(yaml).unwrap();
        config.tracking.output_dir = dir.to_path_buf();
        config
    }

    fn resume() -> FullOptions {
        FullOptions {
            resume: true,
            ..FullOptions::default()
        }
    }

    /// A resumed comparison keeps every run whose configuration is unchanged, with
    /// the same scores, and runs again exactly those a change touches: a new
    /// learning-rate sweep re-runs the two fine-tuning runs, not the meta-training
    /// nor the prototype; and the meta-initialisation baseline is run again when the
    /// checkpoint it adapts is trained again.
    #[test]
    fn a_resumed_comparison_keeps_unchanged_runs_and_reruns_changed_ones() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path());
        let first = run_full(&config, &FullOptions::default(), &mut Counts::default()).unwrap();
        assert!(first.runs.iter().all(|r| r.config.is_some()));

        let mut counts = Counts::default();
        let again = run_full(&config, &resume(), &mut counts).unwrap();
        assert!(counts.started.is_empty(), "{:?}", counts.started);
        assert_eq!(counts.kept.len(), 4);
        assert_eq!(again.methods, first.methods);
        assert_eq!(again.comparisons, first.comparisons);
        let exp = experiment_dir(&config);
        assert!(exp.join(BEFORE_RESUME_FILE).is_file());

        let mut swept = config.clone();
        swept.comparison.finetune_lr_sweep = vec![0.01, 0.1];
        let mut counts = Counts::default();
        run_full(&swept, &resume(), &mut counts).unwrap();
        assert_eq!(counts.started, ["lora-finetune", "meta-init-finetune"]);
        assert_eq!(counts.kept, ["fomaml", "prototype"]);
        assert!(
            counts
                .notes
                .iter()
                .any(|n| n.contains("comparison.finetune_lr_sweep")),
            "{:?}",
            counts.notes
        );

        // The main run's folder removed: it trains again, and the baseline that
        // adapts its checkpoint with it.
        std::fs::remove_dir_all(exp.join("fomaml-seed5")).unwrap();
        let mut counts = Counts::default();
        run_full(&swept, &resume(), &mut counts).unwrap();
        assert_eq!(counts.started, ["fomaml", "meta-init-finetune"]);
        assert_eq!(counts.kept, ["prototype", "lora-finetune"]);

        // Without --resume everything runs again.
        let mut counts = Counts::default();
        run_full(&swept, &FullOptions::default(), &mut counts).unwrap();
        assert_eq!(counts.started.len(), 4);
    }

    /// A comparison on other test tasks cannot be resumed into: its scores would
    /// be paired with scores of different tasks.
    #[test]
    fn resuming_into_a_comparison_of_other_test_tasks_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path());
        let mut small = config.clone();
        small.comparison.baselines = vec![crate::config::Variant::Prototype];
        run_full(&small, &FullOptions::default(), &mut Counts::default()).unwrap();
        let mut other = small.clone();
        other.evaluation.episodes = 4;
        let err = run_full(&other, &resume(), &mut Counts::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("3 test episodes against 4"), "{err}");
        assert!(err.contains("--experiment-name"), "{err}");
        let mut reseeded = small.clone();
        reseeded.seed = 6;
        let err = run_full(&reseeded, &resume(), &mut Counts::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("seed 5 against 6"), "{err}");
    }

    /// Results written before runs recorded their configuration: a meta-trained run
    /// is kept when its folder's config.yml matches, a baseline without a folder runs
    /// again; and a meta-training an earlier comparison left unfinished continues
    /// from its last checkpoint instead of starting over.
    #[test]
    fn older_results_and_unfinished_trainings_are_resumed() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = config(dir.path());
        config.comparison.baselines = vec![crate::config::Variant::Prototype];
        run_full(&config, &FullOptions::default(), &mut Counts::default()).unwrap();
        let exp = experiment_dir(&config);
        let path = exp.join(RESULTS_FILE);
        let mut json: Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        for run in json["runs"].as_array_mut().unwrap() {
            run.as_object_mut().unwrap().remove("config");
        }
        std::fs::write(&path, serde_json::to_string(&json).unwrap()).unwrap();
        let mut counts = Counts::default();
        run_full(&config, &resume(), &mut counts).unwrap();
        assert_eq!(counts.kept, ["fomaml"]);
        assert_eq!(counts.started, ["prototype"]);

        // The meta-training trained again (its folder removed) and stopped after 2 of
        // its 4 iterations, as Ctrl-C stops it: the kept baseline stays in
        // results.json, and the resumed training continues from the checkpoint.
        let run = exp.join("fomaml-seed5");
        std::fs::remove_dir_all(&run).unwrap();
        let mut stopper = Counts {
            stop_after: Some(2),
            ..Counts::default()
        };
        let stopped = run_full(&config, &resume(), &mut stopper).unwrap();
        assert!(stopped.interrupted);
        let saved = crate::train::load_results(&exp).unwrap();
        let labels: Vec<&str> = saved.runs.iter().map(|r| r.label.as_str()).collect();
        assert_eq!(
            labels,
            ["prototype"],
            "the kept run survives the interruption"
        );
        let mut counts = Counts::default();
        let results = run_full(&config, &resume(), &mut counts).unwrap();
        assert_eq!(counts.started, ["fomaml"]);
        assert!(
            counts
                .notes
                .iter()
                .any(|n| n.starts_with("continuing from")),
            "{:?}",
            counts.notes
        );
        let fomaml = results.runs.iter().find(|r| r.label == "fomaml").unwrap();
        assert_eq!(fomaml.iterations, 4);
        let steps = std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .filter(|l| l.contains("train/query_loss"))
            .count();
        assert_eq!(
            steps, 4,
            "the two iterations before the checkpoint are not redone"
        );
    }

    #[test]
    fn the_first_difference_names_the_key() {
        let a = serde_json::json!({"a": {"b": 1, "c": [1, 2]}, "d": true});
        let mut b = a.clone();
        assert_eq!(first_difference(&a, &b), None);
        b["a"]["c"] = serde_json::json!([1, 3]);
        assert_eq!(first_difference(&a, &b).as_deref(), Some("a.c"));
        b["e"] = serde_json::json!(0);
        b["a"]["c"] = a["a"]["c"].clone();
        assert_eq!(first_difference(&a, &b).as_deref(), Some("e"));
    }
}
