//! Making sure candle keeps the graph of gradients, which second-order
//! meta-learning (MAML, Hessian-vector products) differentiates again.

use std::cell::Cell;

use candle_core::{Device, Var};

use crate::{Error, Result};

/// The environment variable candle reads, once per thread, at its first backward pass.
pub const GRAD_GRAPH_ENV: &str = "CANDLE_GRAD_DO_NOT_DETACH";

/// Turns on differentiable gradients for the whole process.
///
/// Call it at the start of `main`, before any other thread starts and before
/// any backward pass: candle reads the variable once per thread. The `melora`
/// binary does this itself; `cargo test` gets it from `.cargo/config.toml`.
pub fn init() {
    if std::env::var(GRAD_GRAPH_ENV)
        .map(|v| v.is_empty() || v == "0")
        .unwrap_or(true)
    {
        // Setting the environment is only sound while no other thread reads it,
        // which is why this must run first thing in `main`.
        std::env::set_var(GRAD_GRAPH_ENV, "1");
    }
}

thread_local! {
    static SECOND_ORDER_OK: Cell<Option<bool>> = const { Cell::new(None) };
}

/// Checks, once per thread, that gradients returned by candle on this thread
/// still carry their graph, so that they can be differentiated again.
///
/// Returns [`Error::SecondOrder`] with the fix when they do not.
pub fn ensure_second_order() -> Result<()> {
    let ok = match SECOND_ORDER_OK.with(Cell::get) {
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

/// d/dx (d/dx x³) at x = 2 is 12 when gradients keep their graph; a detached
/// gradient has no graph, so its own gradient is absent.
fn probe() -> Result<bool> {
    let x = Var::new(2.0f64, &Device::Cpu)?;
    let y = x.as_tensor().powf(3.0)?;
    let grads = y.backward()?;
    let Some(dy) = grads.get(x.as_tensor()) else {
        return Ok(false);
    };
    if !dy.track_op() {
        return Ok(false);
    }
    let second = dy.backward()?;
    let d2y = match second.get(x.as_tensor()) {
        Some(t) => t.to_scalar::<f64>()?,
        None => return Ok(false),
    };
    Ok((d2y - 12.0).abs() < 1e-9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_order_is_enabled_in_tests() {
        ensure_second_order().unwrap();
    }

    #[test]
    fn probe_agrees_with_explicit_tensor_check() {
        let _ = candle_core::Tensor::new(1.0f64, &Device::Cpu).unwrap();
        assert!(probe().unwrap());
    }
}
