//! Meta-training and what is done with its results: the training loop with
//! validation, checkpoints and resume ([`train`]), evaluation on test episodes,
//! `full` (training, baselines, statistics), pre-training, and adaptation to a
//! user's own examples. Runs are built by [`crate::run`].

pub(crate) mod adapt;
pub mod checkpoint;
mod curve;
mod evaluate;
mod full;
mod merge;
mod pretrain;
mod resume;
mod run;

pub use adapt::{adapt_examples, adapter_params, AdaptOutcome, Prediction};
pub use curve::{CurvePoint, FitPrediction, SinusoidFit};
pub use evaluate::{evaluate, save_evaluation, save_evaluation_as, EvaluateOptions};
pub use full::{
    experiment_dir, load_results, run_full, save_results, AblationPoint, Comparison, FullObserver,
    FullOptions, FullResults, LrTrial, MemoryPoint, MethodSummary, RunRecord, SkippedMethod,
    SplitRecord, TestRecord, RESULTS_FILE,
};
pub use merge::merge_results;
pub use pretrain::{pretrain, PretrainOutcome};
pub use run::{
    params_from, run_dir, run_name, train, IterationReport, ProgressFn, TrainOptions, TrainSummary,
};
