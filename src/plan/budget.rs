//! Memory budgets: choosing a configuration that fits before a run, and holding
//! the run to the budget while it runs.
//!
//! - [`fit_to_budget`] walks the settings of `memory_optimization.budget.order`
//!   (checkpointing, micro-batch, precision), each from its current value to its
//!   most frugal one, and returns the first configuration whose predicted peak fits.
//!   Earlier candidates change less and so run faster: the given configuration is
//!   tried first, checkpointing costs about one extra forward pass, micro-batches
//!   smaller GEMMs, bf16 some accuracy. The method is never changed.
//! - [`crate::memory::BudgetGuard`] holds the run to the budget while it runs.

use crate::config::{BudgetLever, BudgetLimit, Config, Precision};
use crate::memory::format_bytes;
use crate::{Error, Result};

/// The outcome of a budget search: the configuration chosen, and why.
#[derive(Debug, Clone)]
pub struct BudgetChoice {
    /// The budget, in bytes.
    pub budget: u64,
    /// Whether a configuration fits; if not, the fields below describe the one with
    /// the smallest prediction.
    pub fits: bool,
    /// The configuration to run.
    pub config: Config,
    /// Its predicted peak heap bytes.
    pub predicted_bytes: u64,
    /// The settings changed from the given configuration, in words (empty: none).
    pub changes: Vec<String>,
    /// Every configuration considered, in order: its changes in words, and its
    /// predicted peak or why it could not be predicted.
    pub tried: Vec<(String, std::result::Result<u64, String>)>,
}

impl BudgetChoice {
    /// A few lines for people: the budget, what was tried, what was chosen.
    pub fn explain(&self) -> String {
        let budget = self.budget;
        let mut text = format!("memory budget {}:\n", format_bytes(budget));
        for (label, outcome) in &self.tried {
            let verdict = match outcome {
                Ok(bytes) if *bytes <= budget => format!("predicted {} fits", format_bytes(*bytes)),
                Ok(bytes) => format!("predicted {} too large", format_bytes(*bytes)),
                Err(why) => format!("not possible: {why}"),
            };
            text.push_str(&format!("  {label}: {verdict}\n"));
        }
        let changes = if self.changes.is_empty() {
            "the configuration as given".to_owned()
        } else {
            self.changes.join(", ")
        };
        if self.fits {
            text.push_str(&format!(
                "chosen: {changes} (predicted peak {})",
                format_bytes(self.predicted_bytes)
            ));
        } else {
            text.push_str(&format!(
                "nothing fits; the smallest predicted peak is {} ({changes}): the smallest \
                 feasible budget",
                format_bytes(self.predicted_bytes)
            ));
        }
        text
    }

    /// The choice, or an [`Error::MemoryBudget`] naming the smallest feasible budget
    /// when nothing fits.
    pub fn into_fitting(self) -> Result<Self> {
        if self.fits {
            return Ok(self);
        }
        let changes = if self.changes.is_empty() {
            "as given".to_owned()
        } else {
            self.changes.join(", ")
        };
        Err(Error::MemoryBudget(format!(
            "no configuration of {} fits in {}: the smallest predicted peak is {} ({changes}); \
             give --memory-budget {} or more, or add settings to \
             memory_optimization.budget.order (`melora plan --memory-budget SIZE` lists what \
             was tried)",
            crate::config::Variant::of(&self.config),
            format_bytes(self.budget),
            format_bytes(self.predicted_bytes),
            format_bytes(round_up_mib(self.predicted_bytes)),
        )))
    }
}

/// The first configuration along `config.memory_optimization.budget.order` whose
/// prediction (`predict`, the planner) is at most `budget` bytes; if none is, the
/// one with the smallest prediction, marked as not fitting.
///
/// The given configuration must be predictable: its prediction error is returned.
/// Later candidates that are invalid or cannot be predicted are skipped (and listed
/// in [`BudgetChoice::tried`]).
pub fn search_budget(
    config: &Config,
    budget: u64,
    predict: &dyn Fn(&Config) -> Result<u64>,
) -> Result<BudgetChoice> {
    let mut tried = Vec::new();
    let mut smallest: Option<(u64, Vec<String>, Config)> = None;
    for (index, (changes, candidate)) in candidates(config).into_iter().enumerate() {
        let label = if changes.is_empty() {
            "as given".to_owned()
        } else {
            changes.join(", ")
        };
        let outcome = candidate.validate().and_then(|()| predict(&candidate));
        let bytes = match outcome {
            Ok(bytes) => bytes,
            Err(e) if index == 0 => return Err(e),
            Err(e) => {
                tried.push((label, Err(e.to_string())));
                continue;
            }
        };
        tried.push((label, Ok(bytes)));
        if bytes <= budget {
            return Ok(BudgetChoice {
                budget,
                fits: true,
                config: candidate,
                predicted_bytes: bytes,
                changes,
                tried,
            });
        }
        if smallest.as_ref().is_none_or(|(b, _, _)| bytes < *b) {
            smallest = Some((bytes, changes, candidate));
        }
    }
    let (bytes, changes, candidate) =
        smallest.expect("the given configuration is always predicted");
    Ok(BudgetChoice {
        budget,
        fits: false,
        config: candidate,
        predicted_bytes: bytes,
        changes,
        tried,
    })
}

/// [`search_budget`], with an [`Error::MemoryBudget`] naming the smallest feasible
/// budget when nothing fits.
pub fn fit_to_budget(
    config: &Config,
    budget: u64,
    predict: &dyn Fn(&Config) -> Result<u64>,
) -> Result<BudgetChoice> {
    search_budget(config, budget, predict)?.into_fitting()
}

/// The budget `memory_optimization.budget.limit` sets, in bytes (`None`: no
/// budget). `auto` is the memory free now where the run keeps its tensors: on a
/// GPU the driver's free memory plus what melora's memory pool holds unused, on
/// the CPU the memory the kernel reports available.
pub fn configured_budget(config: &Config) -> Result<Option<u64>> {
    match config.memory_optimization.budget.limit()? {
        None => Ok(None),
        Some(BudgetLimit::Bytes(bytes)) => Ok(Some(bytes)),
        Some(BudgetLimit::Free) => {
            let device = crate::run::build::device(config)?;
            crate::memory::free_memory_bytes(&device)?
                .map(Some)
                .ok_or_else(|| Error::Config {
                    key: "memory_optimization.budget.limit".into(),
                    message: format!(
                        "is auto, and the free memory of `{}` cannot be read here; give a                          size such as 4GiB",
                        config.device
                    ),
                })
        }
    }
}

/// [`search_budget`] with `memory_optimization.budget.limit` and the memory
/// planner's predictions; `None` when no budget is set. The chosen configuration's
/// limit is the budget in bytes (an `auto` budget is read once, here).
pub fn search_configured(config: &Config) -> Result<Option<BudgetChoice>> {
    let Some(budget) = configured_budget(config)? else {
        return Ok(None);
    };
    let mut config = config.clone();
    config.memory_optimization.budget.limit = Some(budget.to_string());
    search_budget(&config, budget, &|c| {
        super::plan(c).map(|plan| plan.peak_bytes)
    })
    .map(Some)
}

/// [`fit_to_budget`] with `memory_optimization.budget.limit` and the memory
/// planner's predictions; `None` when no budget is set.
pub fn fit_configured(config: &Config) -> Result<Option<BudgetChoice>> {
    search_configured(config)?
        .map(BudgetChoice::into_fitting)
        .transpose()
}

/// `bytes` rounded up to a whole MiB, so that a suggested budget is easy to type and
/// never below the prediction.
fn round_up_mib(bytes: u64) -> u64 {
    bytes.div_ceil(1 << 20) << 20
}

/// The configurations to try, in order, each with its changes from `config`: the
/// given one, then every level of each lever of the budget order, a lever staying
/// at its most frugal valid level while the next ones change (a level the model
/// refuses, such as selective recomputation on a vision backbone, is listed but
/// not carried on).
fn candidates(config: &Config) -> Vec<(Vec<String>, Config)> {
    let mut out = vec![(Vec::new(), config.clone())];
    let (mut current, mut changes) = (config.clone(), Vec::<String>::new());
    for lever in &config.memory_optimization.budget.order {
        let mut last = None;
        for (label, apply) in lever_levels(*lever, &current) {
            let mut candidate = current.clone();
            apply(&mut candidate);
            let mut described = changes.clone();
            described.push(label);
            out.push((described.clone(), candidate.clone()));
            if candidate.validate().is_ok() {
                last = Some((described, candidate));
            }
        }
        if let Some((described, candidate)) = last {
            (changes, current) = (described, candidate);
        }
    }
    out
}

type Apply = Box<dyn Fn(&mut Config)>;

/// The levels of `lever` beyond `config`'s, from the least to the most frugal.
fn lever_levels(lever: BudgetLever, config: &Config) -> Vec<(String, Apply)> {
    let memory = &config.memory_optimization;
    match lever {
        BudgetLever::Checkpointing => {
            let checkpointing = &memory.checkpointing;
            let mut levels: Vec<(String, Apply)> = Vec::new();
            if !checkpointing.enabled && !checkpointing.selective {
                // The cheapest in time: only the attention cores and feed-forward
                // blocks are recomputed.
                levels.push((
                    "selective recomputation".into(),
                    Box::new(|c: &mut Config| {
                        c.memory_optimization.checkpointing.selective = true;
                    }),
                ));
            }
            if !checkpointing.enabled {
                levels.push((
                    "checkpointing every 2 layers".into(),
                    Box::new(|c: &mut Config| {
                        let checkpointing = &mut c.memory_optimization.checkpointing;
                        checkpointing.enabled = true;
                        checkpointing.every = 2;
                        checkpointing.layers = None;
                    }),
                ));
            }
            if !checkpointing.enabled || checkpointing.every > 1 || checkpointing.layers.is_some() {
                levels.push((
                    "checkpointing every layer".into(),
                    Box::new(|c: &mut Config| {
                        let checkpointing = &mut c.memory_optimization.checkpointing;
                        checkpointing.enabled = true;
                        checkpointing.every = 1;
                        checkpointing.layers = None;
                    }),
                ));
            }
            if !checkpointing.selective {
                levels.push((
                    "checkpointing every layer with selective recomputation".into(),
                    Box::new(|c: &mut Config| {
                        let checkpointing = &mut c.memory_optimization.checkpointing;
                        checkpointing.enabled = true;
                        checkpointing.every = 1;
                        checkpointing.layers = None;
                        checkpointing.selective = true;
                    }),
                ));
            }
            levels
        }
        BudgetLever::MicroBatch => {
            let data = &config.data;
            let largest_set = data.n_way * data.k_shot.max(data.n_query);
            let mut size = memory
                .gradient_accumulation
                .micro_batch
                .unwrap_or(largest_set)
                .min(largest_set);
            let mut levels: Vec<(String, Apply)> = Vec::new();
            while size > 1 {
                size = size.div_ceil(2);
                let chosen = size;
                levels.push((
                    format!("micro-batch {chosen}"),
                    Box::new(move |c: &mut Config| {
                        c.memory_optimization.gradient_accumulation.micro_batch = Some(chosen);
                    }),
                ));
            }
            levels
        }
        BudgetLever::Precision if memory.precision == Precision::F32 => vec![(
            "bf16 mixed precision".into(),
            Box::new(|c: &mut Config| c.memory_optimization.precision = Precision::Bf16),
        )],
        BudgetLever::Precision => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A predictor of known figures: 100 MB, halved by checkpointing every layer
    /// (75 every 2), times 0.8 with selective recomputation alone (0.95 on top of
    /// checkpointing), minus 5 MB per halving of the micro-batch, times 0.6 in bf16.
    fn predict(c: &Config) -> Result<u64> {
        let memory = &c.memory_optimization;
        let mut mb: f64 = 100.0;
        if memory.checkpointing.enabled {
            mb *= if memory.checkpointing.every == 1 {
                0.5
            } else {
                0.75
            };
        }
        if memory.checkpointing.selective {
            mb *= if memory.checkpointing.enabled {
                0.95
            } else {
                0.8
            };
        }
        let largest = (c.data.n_way * c.data.k_shot.max(c.data.n_query)) as f64;
        let micro = memory
            .gradient_accumulation
            .micro_batch
            .map_or(largest, |m| m as f64);
        mb -= 5.0 * (largest / micro).log2();
        if memory.precision == Precision::Bf16 {
            mb *= 0.6;
        }
        Ok((mb * 1e6).round() as u64)
    }

    fn config() -> Config {
        // 5-way 2-shot 3-query: largest set 15 examples.
        Config::from_yaml_str("data:\n  n_way: 5\n  k_shot: 2\n  n_query: 3\n").unwrap()
    }

    #[test]
    fn a_configuration_that_fits_is_kept_as_given() {
        let choice = fit_to_budget(&config(), 200_000_000, &predict).unwrap();
        assert!(choice.changes.is_empty());
        assert_eq!(choice.config, config());
        assert_eq!(choice.predicted_bytes, 100_000_000);
    }

    #[test]
    fn levers_are_taken_in_order_each_to_its_end() {
        // Checkpointing every layer with selective recomputation gives 47.5 MB;
        // micro-batch 8 brings it to 43 MB.
        let both = "checkpointing every layer with selective recomputation";
        let choice = fit_to_budget(&config(), 46_000_000, &predict).unwrap();
        assert_eq!(
            choice.changes,
            [both, "micro-batch 8"],
            "{}",
            choice.explain()
        );
        let memory = &choice.config.memory_optimization;
        assert!(memory.checkpointing.enabled && memory.checkpointing.every == 1);
        assert!(memory.checkpointing.selective);
        assert_eq!(memory.gradient_accumulation.micro_batch, Some(8));
        assert_eq!(memory.precision, Precision::F32);
        let labels: Vec<_> = choice.tried.iter().map(|(l, _)| l.as_str()).collect();
        assert_eq!(
            labels,
            [
                "as given".to_string(),
                "selective recomputation".into(),
                "checkpointing every 2 layers".into(),
                "checkpointing every layer".into(),
                both.into(),
                format!("{both}, micro-batch 8")
            ]
        );
        // Selective recomputation alone is the first try: 80 MB.
        let choice = fit_to_budget(&config(), 85_000_000, &predict).unwrap();
        assert_eq!(choice.changes, ["selective recomputation"]);
        assert!(!choice.config.memory_optimization.checkpointing.enabled);
        // Past micro-batch 1 (47.5 − 5·log2(15) ≈ 28 MB) only bf16 helps.
        let choice = fit_to_budget(&config(), 25_000_000, &predict).unwrap();
        assert_eq!(
            choice.changes.last().map(String::as_str),
            Some("bf16 mixed precision")
        );
        assert_eq!(
            choice
                .config
                .memory_optimization
                .gradient_accumulation
                .micro_batch,
            Some(1)
        );
    }

    #[test]
    fn the_order_is_configurable() {
        let mut c = config();
        c.memory_optimization.budget.order = vec![BudgetLever::Precision];
        let choice = fit_to_budget(&c, 70_000_000, &predict).unwrap();
        assert_eq!(choice.changes, ["bf16 mixed precision"]);
        assert!(!choice.config.memory_optimization.checkpointing.enabled);
    }

    #[test]
    fn nothing_fitting_names_the_smallest_feasible_budget() {
        let err = fit_to_budget(&config(), 1_000_000, &predict)
            .unwrap_err()
            .to_string();
        // Most frugal: every layer with selective recomputation, micro-batch 1, bf16:
        // (47.5 − 5·log2 15)·0.6 MB.
        let smallest = ((47.5 - 5.0 * 15f64.log2()) * 0.6 * 1e6).round() as u64;
        assert!(
            err.contains(&format!(
                "smallest predicted peak is {}",
                format_bytes(smallest)
            )) && err.contains(&format!(
                "--memory-budget {} or more",
                format_bytes(round_up_mib(smallest))
            )),
            "{err}"
        );
    }

    #[test]
    fn invalid_candidates_are_skipped_and_listed() {
        // The mlp has no frozen base and no bf16 path: bf16 is refused by validation,
        // so it is skipped.
        let mut c = config();
        c.model.name = "mlp".into();
        c.data.synthetic_task = crate::config::SyntheticTask::Sinusoid;
        c.memory_optimization.budget.order = vec![BudgetLever::Precision];
        let search = search_budget(&c, 1_000_000, &predict).unwrap();
        assert!(!search.fits);
        let text = search.explain();
        assert!(
            text.contains("not possible") && text.contains("mlp") && text.contains("nothing fits"),
            "{text}"
        );
        assert!(fit_to_budget(&c, 1_000_000, &predict).is_err());
        // A prediction error of the given configuration is the caller's to see.
        let failing = |_: &Config| -> Result<u64> { Err(Error::Model("no planner".into())) };
        assert!(fit_to_budget(&c, 1, &failing)
            .unwrap_err()
            .to_string()
            .contains("no planner"));
    }

    /// Vision backbones take bf16 activations (f32 master weights) as a lever, after
    /// the default order's levels they refuse (selective recomputation, micro-batches)
    /// are listed and passed over rather than carried on to it.
    #[test]
    fn vision_backbones_reach_bf16_past_the_levers_they_refuse() {
        let mut c = config();
        c.model.name = "conv4".into();
        c.data.synthetic_task = crate::config::SyntheticTask::Images;
        c.meta_learning.method = crate::config::Method::Protonet;
        // Checkpointing every layer gives 50 MB, bf16 on top 30 MB.
        let choice = fit_to_budget(&c, 40_000_000, &predict).unwrap();
        assert_eq!(
            choice.changes,
            ["checkpointing every layer", "bf16 mixed precision"]
        );
        assert_eq!(choice.config.memory_optimization.precision, Precision::Bf16);
        assert!(!choice.config.memory_optimization.checkpointing.selective);
        assert!(choice
            .config
            .memory_optimization
            .gradient_accumulation
            .micro_batch
            .is_none());
        let text = search_budget(&c, 40_000_000, &predict).unwrap().explain();
        assert!(
            text.contains("selective recomputation: not possible"),
            "{text}"
        );
    }
}
