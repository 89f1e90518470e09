//! Values given on the command line, which take precedence over the file.

use std::path::PathBuf;

use super::{Config, Method};

/// Values that replace those of a [`Config`]; `None` leaves a value as it is.
///
/// Each field is set by the `melora` command-line flag named in its
/// documentation, and errors about an overridden value name that flag.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConfigOverrides {
    /// `model.name` (`--model`).
    pub model: Option<String>,
    /// `lora.rank` (`--lora-rank`).
    pub lora_rank: Option<usize>,
    /// `lora.alpha` (`--lora-alpha`).
    pub lora_alpha: Option<f64>,
    /// `meta_learning.meta_batch_size` (`--meta-batch-size`).
    pub meta_batch_size: Option<usize>,
    /// `meta_learning.inner.steps` (`--inner-steps`).
    pub inner_steps: Option<usize>,
    /// `meta_learning.inner.lr` (`--inner-lr`).
    pub inner_lr: Option<f64>,
    /// `meta_learning.outer.lr` (`--outer-lr`).
    pub outer_lr: Option<f64>,
    /// `meta_learning.num_iterations` (`--num-iterations`).
    pub num_iterations: Option<usize>,
    /// `data.n_way` (`--n-way`).
    pub n_way: Option<usize>,
    /// `data.k_shot` (`--k-shot`).
    pub k_shot: Option<usize>,
    /// `data.n_query` (`--n-query`).
    pub n_query: Option<usize>,
    /// `meta_learning.method` (`--method`).
    pub method: Option<Method>,
    /// `seed` (`--seed`).
    pub seed: Option<u64>,
    /// `device` (`--device`).
    pub device: Option<super::ComputeDevice>,
    /// `data.synthetic_only` (`--synthetic-only`).
    pub synthetic_only: Option<bool>,
    /// `tracking.experiment_name` (`--experiment-name`).
    pub experiment_name: Option<String>,
    /// `tracking.output_dir` (`--output`).
    pub output_dir: Option<PathBuf>,
    /// `memory_optimization.budget.limit` (`--memory-budget`).
    pub memory_budget: Option<String>,
}

impl ConfigOverrides {
    /// (is set, config key, command-line flag) for every field.
    fn entries(&self) -> [(bool, &'static str, &'static str); 18] {
        [
            (self.model.is_some(), "model.name", "--model"),
            (self.lora_rank.is_some(), "lora.rank", "--lora-rank"),
            (self.lora_alpha.is_some(), "lora.alpha", "--lora-alpha"),
            (
                self.meta_batch_size.is_some(),
                "meta_learning.meta_batch_size",
                "--meta-batch-size",
            ),
            (
                self.inner_steps.is_some(),
                "meta_learning.inner.steps",
                "--inner-steps",
            ),
            (
                self.inner_lr.is_some(),
                "meta_learning.inner.lr",
                "--inner-lr",
            ),
            (
                self.outer_lr.is_some(),
                "meta_learning.outer.lr",
                "--outer-lr",
            ),
            (
                self.num_iterations.is_some(),
                "meta_learning.num_iterations",
                "--num-iterations",
            ),
            (self.n_way.is_some(), "data.n_way", "--n-way"),
            (self.k_shot.is_some(), "data.k_shot", "--k-shot"),
            (self.n_query.is_some(), "data.n_query", "--n-query"),
            (self.method.is_some(), "meta_learning.method", "--method"),
            (self.seed.is_some(), "seed", "--seed"),
            (self.device.is_some(), "device", "--device"),
            (
                self.synthetic_only.is_some(),
                "data.synthetic_only",
                "--synthetic-only",
            ),
            (
                self.experiment_name.is_some(),
                "tracking.experiment_name",
                "--experiment-name",
            ),
            (self.output_dir.is_some(), "tracking.output_dir", "--output"),
            (
                self.memory_budget.is_some(),
                "memory_optimization.budget.limit",
                "--memory-budget",
            ),
        ]
    }

    /// The flag that set `key`, if an override set it.
    pub(crate) fn flag_for(&self, key: &str) -> Option<&'static str> {
        self.entries()
            .into_iter()
            .find(|&(set, k, _)| set && k == key)
            .map(|(_, _, flag)| flag)
    }

    /// Every flag name, so the command line can be checked against this list.
    #[cfg(test)]
    pub(crate) fn all_flags() -> Vec<&'static str> {
        Self::default()
            .entries()
            .into_iter()
            .map(|(_, _, flag)| flag)
            .collect()
    }

    /// Writes the set values into `config`, without validating.
    pub(crate) fn write_into(&self, config: &mut Config) {
        fn set<T: Clone>(target: &mut T, value: &Option<T>) {
            if let Some(v) = value {
                *target = v.clone();
            }
        }
        let meta = &mut config.meta_learning;
        set(&mut config.model.name, &self.model);
        set(&mut config.lora.rank, &self.lora_rank);
        set(&mut config.lora.alpha, &self.lora_alpha);
        set(&mut meta.meta_batch_size, &self.meta_batch_size);
        set(&mut meta.inner.steps, &self.inner_steps);
        set(&mut meta.inner.lr, &self.inner_lr);
        set(&mut meta.outer.lr, &self.outer_lr);
        set(&mut meta.num_iterations, &self.num_iterations);
        set(&mut meta.method, &self.method);
        set(&mut config.data.n_way, &self.n_way);
        set(&mut config.data.k_shot, &self.k_shot);
        set(&mut config.data.n_query, &self.n_query);
        set(&mut config.seed, &self.seed);
        set(&mut config.device, &self.device);
        set(&mut config.data.synthetic_only, &self.synthetic_only);
        set(&mut config.tracking.experiment_name, &self.experiment_name);
        set(&mut config.tracking.output_dir, &self.output_dir);
        if let Some(limit) = &self.memory_budget {
            config.memory_optimization.budget.limit = Some(limit.clone());
        }
    }
}
