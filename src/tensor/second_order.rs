//! Making sure candle keeps the graph of gradients where second-order meta-learning
//! (MAML, Hessian-vector products) differentiates them again, and drops it where
//! nobody will.
//!
//! candle decides once per thread, at the thread's first backward pass, from the
//! environment variable `CANDLE_GRAD_DO_NOT_DETACH`. With it on, every intermediate
//! gradient of a backward pass keeps its graph alive until the pass's results are
//! dropped: needed for gradients that are differentiated again, pure waste (memory
//! and allocation time) for first-order ones. So [`init`] turns it on for the process
//! and starts one worker thread that initialised with it off; first-order backward
//! passes (`first_order_backward`) run there and free intermediate gradients as
//! they go.

use std::sync::mpsc::{channel, sync_channel, Sender, SyncSender};
use std::sync::{Mutex, Once, OnceLock};

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};

use crate::{Error, Result};

/// The environment variable candle reads, once per thread, at its first backward pass.
pub const GRAD_GRAPH_ENV: &str = "CANDLE_GRAD_DO_NOT_DETACH";

type Job = (Tensor, SyncSender<candle_core::Result<GradStore>>);

/// The thread whose backward passes detach intermediate gradients.
struct FirstOrderWorker {
    jobs: Mutex<Sender<Job>>,
}

static INIT: Once = Once::new();
static WORKER: OnceLock<Option<FirstOrderWorker>> = OnceLock::new();

/// Turns on differentiable gradients for the process and starts the first-order
/// worker. Idempotent.
///
/// Call it at the start of `main`, before any other thread starts and before any
/// backward pass: candle reads the variable once per thread. The `melora` binary does
/// this itself; library entry points that differentiate call it too, but a thread that
/// ran a backward pass before it keeps whatever candle read then.
pub fn init() {
    INIT.call_once(|| {
        // Setting the environment is only sound while no other thread reads it, which
        // is why this must run first thing in `main`; every melora entry point that
        // runs a backward pass waits on this `Once` before doing so.
        std::env::remove_var(GRAD_GRAPH_ENV);
        let worker = start_worker();
        std::env::set_var(GRAD_GRAPH_ENV, "1");
        let _ = WORKER.set(worker);
        // After the environment is set: this starts rayon's pool.
        super::subnormals::flush_on_compute_threads();
        super::freed_buffers::keep_freed_buffers();
    });
}

/// Starts the worker and waits for its first backward pass, which fixes candle's
/// per-thread choice; `None` if that pass still kept the graph (then first-order
/// passes run on the caller's thread, correct but heavier).
fn start_worker() -> Option<FirstOrderWorker> {
    let (jobs, incoming) = channel::<Job>();
    let (ready, is_ready) = sync_channel::<bool>(1);
    std::thread::Builder::new()
        .name("melora-first-order".into())
        .spawn(move || {
            super::kernel_workspace::reserve_on_this_thread();
            super::subnormals::flush_on_this_thread();
            let detaches = probe_detaches().unwrap_or(false);
            ON_FIRST_ORDER_WORKER.with(|w| w.set(detaches));
            let _ = ready.send(detaches);
            for (loss, reply) in incoming {
                let grads = loss.backward();
                // The loss owns the forward graph: release it before answering, so
                // nothing is freed behind the caller's back (or its memory meter's).
                drop(loss);
                let _ = reply.send(grads);
            }
        })
        .ok()?;
    match is_ready.recv() {
        Ok(true) => Some(FirstOrderWorker {
            jobs: Mutex::new(jobs),
        }),
        _ => None,
    }
}

/// d²/dx² of (x²)³ at x = 2 as this thread's backward passes compute it: 30·x⁴ = 480
/// when gradients keep their graph; a detaching pass cuts the chain at x² and gives
/// 96 (or no second gradient at all). A single op such as x³ cannot tell the two
/// apart: its local derivative 3x² is built from x either way.
fn second_derivative_probe() -> candle_core::Result<Option<f64>> {
    let x = Var::new(2.0f64, &Device::Cpu)?;
    let y = x.as_tensor().sqr()?.powf(3.0)?;
    let grads = y.backward()?;
    let Some(dy) = grads.get(x.as_tensor()) else {
        return Ok(None);
    };
    if !dy.track_op() {
        return Ok(None);
    }
    Ok(match dy.backward()?.get(x.as_tensor()) {
        Some(t) => Some(t.to_scalar::<f64>()?),
        None => None,
    })
}

fn keeps_graph(second: Option<f64>) -> bool {
    second.is_some_and(|d2y| (d2y - 480.0).abs() < 1e-9)
}

/// Whether this thread's backward passes detach gradients.
fn probe_detaches() -> candle_core::Result<bool> {
    Ok(!keeps_graph(second_derivative_probe()?))
}

/// `loss.backward()` with intermediate gradients freed as the pass goes: for
/// gradients that will not be differentiated again.
pub(crate) fn first_order_backward(loss: &Tensor) -> Result<GradStore> {
    init();
    let Some(Some(worker)) = WORKER.get() else {
        return Ok(loss.backward()?);
    };
    let (reply, answer) = sync_channel(1);
    let sent = worker
        .jobs
        .lock()
        .map_err(|_| Error::SecondOrder("the first-order worker's queue is poisoned".into()))?
        .send((loss.clone(), reply));
    if sent.is_err() {
        return Ok(loss.backward()?);
    }
    answer
        .recv()
        .map_err(|_| Error::SecondOrder("the first-order worker stopped".into()))?
        .map_err(Error::from)
}

thread_local! {
    /// Set on the first-order worker once its passes are known to detach.
    static ON_FIRST_ORDER_WORKER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether what an op's backward returns on this thread may be differentiated again.
/// `false` on the first-order worker, whose passes detach every gradient before using
/// it: a custom op's backward can then drop the graph of its result at once, instead
/// of keeping its intermediates alive until the pass consumes the result.
pub(crate) fn backward_keeps_graph() -> bool {
    !ON_FIRST_ORDER_WORKER.with(std::cell::Cell::get)
}

thread_local! {
    static SECOND_ORDER_OK: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
}

/// Checks, once per thread, that gradients returned by candle on this thread
/// still carry their graph, so that they can be differentiated again.
///
/// Returns [`Error::SecondOrder`] with the fix when they do not.
pub fn ensure_second_order() -> Result<()> {
    init();
    let ok = match SECOND_ORDER_OK.with(std::cell::Cell::get) {
        Some(ok) => ok,
        None => {
            let ok = probe()?;
            SECOND_ORDER_OK.with(|c| c.set(Some(ok)));
            ok
        }
    };
    if ok {
        Ok(())
    } else {
        Err(Error::SecondOrder(format!(
            "candle detached the gradient graph on this thread; set {GRAD_GRAPH_ENV}=1 in the \
             environment, or call melora::init() at the start of main before any thread or \
             backward pass starts"
        )))
    }
}

/// Whether this thread's backward passes keep the graph of gradients.
fn probe() -> Result<bool> {
    Ok(keeps_graph(second_derivative_probe()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_order_is_enabled_in_tests() {
        ensure_second_order().unwrap();
    }

    #[test]
    fn first_order_passes_run_on_a_detaching_worker() {
        init();
        assert!(
            matches!(WORKER.get(), Some(Some(_))),
            "the first-order worker did not start detaching"
        );
        let x = Var::new(&[1.0f64, 2.0], &Device::Cpu).unwrap();
        let loss = x.as_tensor().sqr().unwrap().sum_all().unwrap();
        let grads = first_order_backward(&loss).unwrap();
        let g = grads.get(x.as_tensor()).unwrap();
        assert_eq!(g.to_vec1::<f64>().unwrap(), vec![2.0, 4.0]);
        // This thread still keeps graphs for second order.
        assert!(probe().unwrap());
    }
}
