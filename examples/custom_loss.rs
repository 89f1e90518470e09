//! Meta-learning with a loss of one's own. The gradient engine's loss is its
//! parameter, and any closure `Fn(&Tensor, &Batch) -> melora::Result<Tensor>` is a
//! `Loss`, so exact second-order MAML differentiates it like the built-in ones (the
//! closure must be built from differentiable operations: candle's arithmetic, or
//! `melora::tensor::ops`).
//!
//! The tasks are sinusoids whose support sets carry outliers (two of ten targets
//! shifted by +10), as with a faulty sensor; the query sets are clean. MAML is
//! meta-trained twice, with the mean squared error and with the pseudo-Huber loss
//! `δ²(√(1 + (r/δ)²) − 1)`, whose gradient is bounded, and both are scored by the
//! clean query MSE after one step on the corrupted support set.
//!
//! `cargo run --release --example custom_loss` (add `-- --quick` for a smoke test).

use melora::prelude::*;

/// Sinusoid tasks with every fifth support target shifted by `OUTLIER`.
struct WithOutliers(SinusoidTasks);

const OUTLIER: f32 = 10.0;

impl EpisodeSource for WithOutliers {
    fn episode(&self, index: u64) -> melora::Result<Episode> {
        let mut task = self.0.episode(index)?;
        let targets = task.support.regression_targets()?;
        let values = targets.flatten_all()?.to_vec1::<f32>()?;
        let shifted: Vec<f32> = values
            .into_iter()
            .enumerate()
            .map(|(i, y)| if i % 5 == 0 { y + OUTLIER } else { y })
            .collect();
        task.support.targets = Some(Tensor::from_vec(shifted, targets.dims(), targets.device())?);
        Ok(task)
    }
}

/// The pseudo-Huber loss with δ = 1: quadratic near zero, linear for large residuals.
fn pseudo_huber(outputs: &Tensor, batch: &Batch) -> melora::Result<Tensor> {
    let residual = (outputs - batch.regression_targets()?)?;
    Ok(((residual.sqr()? + 1.0)?.sqrt()? - 1.0)?.mean_all()?)
}

fn main() -> melora::Result<()> {
    // First thing: exact second-order gradients depend on it.
    melora::init();
    let quick = std::env::args().any(|a| a == "--quick");
    let (iterations, meta_batch, test_tasks) = if quick { (2, 2, 4) } else { (1000, 10, 200) };

    let model = Mlp::new(1, &[40, 40], 1, DType::F32, &Device::Cpu)?;
    let maml = Maml {
        inner: InnerLoop::new(1, 0.02),
        mode: MamlMode::Recompute,
    };
    let train = WithOutliers(SinusoidTasks {
        k_shot: 10,
        n_query: 10,
        seed: 0,
    });
    let test = WithOutliers(SinusoidTasks {
        k_shot: 10,
        n_query: 10,
        seed: 1,
    });

    let huber = pseudo_huber; // a function with the closure's signature is a Loss too
    let engines = [
        ("mean squared error", WholeGraph::new(&model)),
        ("pseudo-Huber", WholeGraph::with_loss(&model, &huber)),
    ];
    for (name, engine) in &engines {
        let mut params = model.init_params(0)?;
        let before = evaluate_episodes(
            &maml,
            engine,
            &params,
            &test,
            test_tasks,
            0.95,
            None,
            &mut |_| {},
        )?;
        let mut outer = Optimizer::new(OptimizerKind::adamw(0.0));
        for iteration in 0..iterations {
            let mut gradients = Vec::with_capacity(meta_batch);
            for i in 0..meta_batch {
                let task = train.episode((iteration * meta_batch + i) as u64)?;
                gradients.push(
                    maml.meta_gradient(engine, &params, &task, Mode::Eval)?
                        .meta_gradient,
                );
            }
            params = outer.step(&params, &average(&gradients)?, 5e-3)?;
        }
        // Scored by the task's own loss (the query MSE), whatever the engine's loss.
        let after = evaluate_episodes(
            &maml,
            engine,
            &params,
            &test,
            test_tasks,
            0.95,
            None,
            &mut |_| {},
        )?;
        let (before, after) = (before.loss.mean, after.loss);
        println!(
            "MAML with the {name}: clean test MSE {before:.3} before meta-training, {:.3} ± {:.3} after",
            after.mean, after.half_width
        );
    }
    Ok(())
}
