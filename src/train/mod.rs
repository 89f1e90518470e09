//! Meta-training machinery: the outer update (average the tasks' meta-gradients,
//! clip by global norm, step an optimiser along a learning-rate schedule) and the
//! meta-step that feeds it.

pub(crate) mod adapt;
pub mod build;
pub mod checkpoint;
mod evaluate;
mod full;
mod outer;
mod pretrain;
mod run;
mod step;

pub use adapt::{adapt_examples, adapter_params, AdaptOutcome, Prediction};
pub use evaluate::{evaluate, save_evaluation, EvaluateOptions};
pub use full::{
    experiment_dir, load_results, run_full, save_results, AblationPoint, Comparison, FullObserver,
    FullOptions, FullResults, LrTrial, MemoryPoint, MethodSummary, RunRecord, SkippedMethod,
    SplitRecord, TestRecord, RESULTS_FILE,
};
pub use outer::{average, clip_global_norm, OuterUpdate};
pub use pretrain::{pretrain, PretrainOutcome};
pub use run::{
    params_from, run_dir, run_name, train, IterationReport, ProgressFn, TrainOptions, TrainSummary,
};
pub use step::{meta_step, training_mode, StepStats};
