//! MAML of LoRA adapters: exact second-order meta-training of the rank-4 adapters
//! (on the attention's query and value projections) and the classification head of
//! the built-in tiny BERT (2 layers, width 64, random frozen weights; no download),
//! on synthetic 5-way 2-shot text tasks where every task is a new domain with the
//! same five intents (`SyntheticDomains`: a few cue words of each intent recur in
//! every domain, and meta-training can learn them into the initialisation).
//!
//! `cargo run --release --example lora_bert_maml` (add `-- --quick` for a smoke test).
//! With a local Hugging Face BERT directory, `models::load::from_directory` builds
//! the same model from pre-trained weights.

use melora::prelude::*;

fn main() -> melora::Result<()> {
    // First thing: exact second-order gradients depend on it.
    melora::init();
    let quick = std::env::args().any(|a| a == "--quick");
    let (iterations, meta_batch, test_tasks) = if quick { (2, 2, 3) } else { (100, 4, 100) };

    let lora = LoraSettings {
        spec: LoraSpec {
            rank: 4,
            alpha: 8.0,
            dropout: 0.0,
        },
        target_modules: None, // BERT's default, as in PEFT: query and value
        init: LoraInit::Peft { seed: 42 },
    };
    let n_way = 5;
    let model = builtin("tiny-bert", 42, DType::F32, Some(lora), n_way)?;
    let engine = WholeGraph::new(model.as_ref());
    let maml = Maml {
        inner: InnerLoop::new(1, 0.5),
        mode: MamlMode::Recompute, // memory constant in the number of inner steps
    };
    // Meta-training and test tasks: new domains of one world of intents.
    let train = SyntheticDomains {
        n_way,
        k_shot: 2,
        n_query: 3,
        world_seed: 42,
        seed: 0,
        ..Default::default()
    };
    let test = SyntheticDomains {
        seed: 1,
        ..train.clone()
    };

    // Only the adapters and the head are trainable: the ParamSet holds nothing else.
    let mut params = model.init_params(42)?;
    println!(
        "{} trainable tensors, {} entries",
        params.len(),
        params.numel()
    );
    let before = evaluate_episodes(
        &maml,
        &engine,
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
        let mut accuracy = 0.0;
        for i in 0..meta_batch {
            let task = train.episode((iteration * meta_batch + i) as u64)?;
            let outcome = maml.meta_gradient(&engine, &params, &task, Mode::Eval)?;
            accuracy += outcome.query_accuracy / meta_batch as f64;
            gradients.push(outcome.meta_gradient);
        }
        params = outer.step(&params, &average(&gradients)?, 0.02)?;
        if iteration % 10 == 0 || iteration + 1 == iterations {
            println!("iteration {iteration:>3}: query accuracy after adaptation {accuracy:.3}");
        }
    }
    let after = evaluate_episodes(
        &maml,
        &engine,
        &params,
        &test,
        test_tasks,
        0.95,
        None,
        &mut |_| {},
    )?;
    println!(
        "test accuracy over {test_tasks} new domains ({n_way}-way 2-shot, one inner step): {} before meta-training, {} after",
        before.headline(),
        after.headline()
    );
    Ok(())
}
