//! MAML on sinusoid regression (Finn et al., 2017), the counterpart of learn2learn's
//! `examples/maml.py`: meta-train the initialisation of a 1 → 40 → 40 → 1 MLP so that
//! one gradient step on 10 points of a new sine wave fits it.
//!
//! `cargo run --release --example maml_sinusoid` (add `-- --quick` for a smoke test).

use melora::prelude::*;

fn main() -> melora::Result<()> {
    // First thing: exact second-order gradients depend on it.
    melora::init();
    let quick = std::env::args().any(|a| a == "--quick");
    let (iterations, meta_batch, test_tasks) = if quick { (3, 2, 4) } else { (1000, 10, 200) };

    let model = Mlp::new(1, &[40, 40], 1, DType::F32, &Device::Cpu)?;
    // The task's own loss: mean squared error on regression batches.
    let engine = WholeGraph::new(&model);
    let maml = Maml {
        inner: InnerLoop::new(1, 0.01),
        mode: MamlMode::Recompute,
    };
    let train = SinusoidTasks {
        k_shot: 10,
        n_query: 10,
        seed: 0,
    };
    // Test waves from another seed: amplitudes and phases not seen in training.
    let test = SinusoidTasks { seed: 1, ..train };

    let mut params = model.init_params(0)?;
    let before = test_mse(&maml, &engine, &params, &test, test_tasks)?;
    let mut outer = Optimizer::new(OptimizerKind::adamw(0.0));
    for iteration in 0..iterations {
        let mut gradients = Vec::with_capacity(meta_batch);
        let mut query_mse = 0.0;
        for i in 0..meta_batch {
            let task = train.episode((iteration * meta_batch + i) as u64)?;
            let outcome = maml.meta_gradient(&engine, &params, &task, Mode::Eval)?;
            query_mse += outcome.query_loss / meta_batch as f64;
            gradients.push(outcome.meta_gradient);
        }
        params = outer.step(&params, &average(&gradients)?, 5e-3)?;
        if iteration % 100 == 0 || iteration + 1 == iterations {
            println!("iteration {iteration:>4}: query MSE after adaptation {query_mse:.3}");
        }
    }
    let after = test_mse(&maml, &engine, &params, &test, test_tasks)?;
    println!(
        "test MSE after one step on 10 points: {before:.3} before meta-training, {after:.3} after"
    );
    Ok(())
}

/// Mean query MSE over the first `count` test tasks, each adapted on its support set.
fn test_mse(
    maml: &Maml,
    engine: &WholeGraph,
    params: &ParamSet,
    tasks: &SinusoidTasks,
    count: usize,
) -> melora::Result<f64> {
    let scores = evaluate_episodes(maml, engine, params, tasks, count, 0.95, None, &mut |_| {})?;
    Ok(scores.loss.mean)
}
