//! `melora compare`: the runs of several `melora full` experiments scored on the
//! same test tasks, put together as one comparison, so that methods configured in
//! different files (ProtoNets beside MAML, say) are paired by episode too.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

use super::full::{load_results, summarise, FullResults};

/// The experiments in `dirs` as one comparison whose configured method is the
/// first experiment's. Every experiment must have scored the same test tasks
/// (episodes, their seed, the class split); a run of a later experiment that
/// repeats one already taken (same method and seed, the same score on every
/// episode) is taken once, and one that differs is labelled `method@experiment`.
/// Ablation points and memory curves are not carried over.
pub fn merge_results(dirs: &[PathBuf]) -> Result<FullResults> {
    let (first, rest) = dirs.split_first().ok_or_else(|| {
        Error::InvalidArgument("give at least one experiment folder to compare".into())
    })?;
    let mut merged = load_results(first)?;
    merged.runs.retain(|r| !r.label.starts_with("ablation-"));
    merged.ablation.clear();
    merged.memory_vs_k.clear();
    let mut names = vec![merged.experiment.clone()];
    for dir in rest {
        let other = load_results(dir)?;
        check_same_tasks(&merged, &other, first, dir)?;
        names.push(other.experiment.clone());
        merged.interrupted |= other.interrupted;
        for skipped in other.skipped {
            if !merged.skipped.iter().any(|s| s.label == skipped.label) {
                merged.skipped.push(skipped);
            }
        }
        for mut run in other.runs {
            if run.label.starts_with("ablation-") {
                continue;
            }
            let same = merged
                .runs
                .iter()
                .find(|r| r.label == run.label && r.seed == run.seed);
            match same {
                Some(r) if r.evaluation.headline_values() == run.evaluation.headline_values() => {
                    continue
                }
                Some(_) => run.label = format!("{}@{}", run.label, other.experiment),
                None => {}
            }
            merged.runs.push(run);
        }
    }
    merged.experiment = names.join(" + ");
    summarise(&mut merged)?;
    Ok(merged)
}

fn check_same_tasks(a: &FullResults, b: &FullResults, a_dir: &Path, b_dir: &Path) -> Result<()> {
    let mismatch = a.test_task_mismatch(b);
    match mismatch {
        Some(what) => Err(Error::InvalidArgument(format!(
            "{} and {} were scored on different test tasks ({what}), so their scores cannot \
             be paired; compare experiments run with the same seed, data.split_seed and \
             evaluation.episodes",
            a_dir.display(),
            b_dir.display()
        ))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Variant};
    use crate::train::full::{experiment_dir, run_full, FullObserver, FullOptions};

    struct Quiet;
    impl FullObserver for Quiet {}

    fn config(dir: &Path, method: &str, baselines: &str, name: &str) -> Config {
        let yaml = format!(
            "seed: 3\nmodel:\n  name: tiny-bert\n  max_length: 8\nlora:\n  rank: 2\n\
             meta_learning:\n  method: {method}\n  meta_batch_size: 1\n  num_iterations: 2\n  \
             inner:\n    lr: 0.5\n\
             data:\n  synthetic_task: domains\n  n_way: 2\n  k_shot: 1\n  n_query: 2\n\
             evaluation:\n  episodes: 4\n  eval_every: 2\n  val_episodes: 1\n\
             comparison:\n  baselines: [{baselines}]\n  memory_inner_steps: []\n\
             tracking:\n  experiment_name: {name}\n"
        );
        let mut config = Config::from_yaml_str(&yaml).unwrap();
        config.tracking.output_dir = dir.to_path_buf();
        config
    }

    /// Two experiments on the same tasks become one comparison: the shared
    /// baseline once, every method paired by episode with the first experiment's
    /// method and with the best baseline; experiments on other tasks are refused.
    #[test]
    fn experiments_on_the_same_tasks_merge_into_one_comparison() {
        let dir = tempfile::tempdir().unwrap();
        let a = config(dir.path(), "fomaml", "prototype", "a");
        let b = config(dir.path(), "protonet", "prototype, no-adaptation", "b");
        run_full(&a, &FullOptions::default(), &mut Quiet).unwrap();
        run_full(&b, &FullOptions::default(), &mut Quiet).unwrap();
        let merged = merge_results(&[experiment_dir(&a), experiment_dir(&b)]).unwrap();
        let labels: Vec<&str> = merged.methods.iter().map(|m| m.label.as_str()).collect();
        assert_eq!(labels, ["fomaml", "prototype", "protonet", "no-adaptation"]);
        assert_eq!(merged.experiment, "a + b");
        assert_eq!(merged.comparisons.len(), 3);
        assert!(merged.comparisons.iter().all(|c| c.method == "fomaml"));
        let best = &merged.against_best_baseline;
        assert_eq!(best.len(), 2);
        assert!(best
            .iter()
            .all(|c| c.baseline == "prototype" || c.baseline == "no-adaptation"));
        assert!("protonet".parse::<Variant>().unwrap().meta_trains());

        let mut other = config(dir.path(), "fomaml", "prototype", "c");
        other.evaluation.episodes = 5;
        run_full(&other, &FullOptions::default(), &mut Quiet).unwrap();
        let err = merge_results(&[experiment_dir(&a), experiment_dir(&other)])
            .unwrap_err()
            .to_string();
        assert!(err.contains("4 test episodes against 5"), "{err}");
        assert!(merge_results(&[]).is_err());
    }
}
