//! candle 0.11.1's `Tensor::backward`, replayed on simulated tensors: the same graph
//! walk, the same order, the same rule per op (each allocating what candle's rule
//! allocates, including the zeros that every first contribution is added to), and
//! the same choice of keeping or detaching each gradient's graph.
//!
//! With the graph kept (second order), every gradient holds the gradients and
//! activations it was computed from, so a backward pass leaves a gradient graph of
//! several times the forward graph behind; detached (first order, on melora's
//! worker thread), a gradient is freed once its node is processed.

use std::collections::HashMap;

use super::sim::{Bin, Custom, NodeId, Op, Sim, SimDType, Un, T};

/// candle's `GradStore`: a gradient per node that received one.
pub(crate) type GradStore = HashMap<NodeId, T>;

/// Nodes that lead to a variable, loss first (candle's `sorted_nodes`).
fn sorted_nodes(sim: &Sim, root: NodeId) -> Vec<NodeId> {
    let mut seen: HashMap<NodeId, bool> = HashMap::new();
    let mut out = Vec::new();
    // (node, inputs to walk, next input, track) frames of the recursive walk.
    let mut stack: Vec<(NodeId, Vec<NodeId>, usize, bool)> = Vec::new();
    let visit = |id: NodeId,
                 seen: &mut HashMap<NodeId, bool>,
                 out: &mut Vec<NodeId>,
                 stack: &mut Vec<(NodeId, Vec<NodeId>, usize, bool)>|
     -> Option<bool> {
        if let Some(&tg) = seen.get(&id) {
            return Some(tg);
        }
        if sim.is_variable(id) {
            seen.insert(id, true);
            out.push(id);
            return Some(true);
        }
        if sim.is_int(id) {
            seen.insert(id, false);
            return Some(false);
        }
        let children = match sim.op_of(id) {
            None => {
                seen.insert(id, false);
                return Some(false);
            }
            // candle does not walk into a product by zero.
            Some(Op::Affine(_, 0.0)) => Vec::new(),
            Some(op) => op.walked(),
        };
        stack.push((id, children, 0, false));
        None
    };
    visit(root, &mut seen, &mut out, &mut stack);
    while let Some(frame) = stack.last_mut() {
        if frame.2 < frame.1.len() {
            let child = frame.1[frame.2];
            frame.2 += 1;
            if let Some(tg) = visit(child, &mut seen, &mut out, &mut stack) {
                stack.last_mut().expect("frame").3 |= tg;
            }
        } else {
            let (id, _, _, tg) = stack.pop().expect("frame");
            seen.insert(id, tg);
            if tg {
                out.push(id);
            }
            if let Some(parent) = stack.last_mut() {
                parent.3 |= tg;
            }
        }
    }
    out.reverse();
    out
}

/// Which of `leaves` the graph of `root` reads (the engine's block products find
/// them with candle's `sorted_nodes`).
pub(crate) fn reads(root: &T, leaves: &[T]) -> Vec<bool> {
    let read: std::collections::HashSet<NodeId> = sorted_nodes(&root.sim_of(), root.id())
        .into_iter()
        .collect();
    leaves.iter().map(|l| read.contains(&l.id())).collect()
}

/// Adds (or subtracts) `contribution` to `arg`'s gradient, creating it as zeros first
/// (candle's `or_insert` then `add`).
fn accumulate(sim: &Sim, grads: &mut GradStore, arg: NodeId, contribution: &T, subtract: bool) {
    let sum = grads
        .entry(arg)
        .or_insert_with(|| sim.handle(arg).zeros_like());
    let next = if subtract {
        sum.sub(contribution)
    } else {
        sum.add(contribution)
    };
    *sum = next;
}

/// `fused_norm::light`: a backward result with its graph where it may be
/// differentiated again, detached (its working-type intermediates freed at once) in
/// a pass that detaches every gradient anyway.
fn light(t: T, detach: bool) -> T {
    if detach {
        t.detach()
    } else {
        t
    }
}

/// `fused_softmax::softmax_grad`: `p ⊙ (g − Σ g⊙p)` as one op on contiguous inputs.
fn softmax_grad(p: &T, g: &T) -> T {
    p.contiguous().custom2(&g.contiguous(), Custom::SoftmaxGrad)
}

/// `fused_norm::normalised`: `(x̂, r)` with `r = 1/√(var + eps)` and `x̂ = (x − mean)·r`.
fn normalised(x: &T) -> (T, T) {
    let l = last(x);
    let centered = x.broadcast_binary(&x.mean_keepdim(&[l]), Bin::Sub);
    let rstd = centered
        .unary(Un::Sqr)
        .mean_keepdim(&[l])
        .affine(1.0)
        .unary(Un::Sqrt)
        .unary(Un::Recip);
    (centered.broadcast_binary(&rstd, Bin::Mul), rstd)
}

/// The last dimension's index.
fn last(t: &T) -> usize {
    t.rank() - 1
}

/// `loss.backward()`: with `detach` (first order) each node's gradient loses its graph
/// when the node is processed; without, gradients keep their graph (second order).
pub(crate) fn backward(sim: &Sim, loss: &T, detach: bool) -> GradStore {
    let sorted = sorted_nodes(sim, loss.id());
    // The walk's bookkeeping: the sorted vector and the seen-set (about 17 bytes an
    // entry at a load factor of 7/8), the gradient map (two words and a control byte).
    let bookkeeping = 8 * sorted.len() as u64 + 2 * 20 * sorted.len() as u64;
    let held = sim.hold_bytes(bookkeeping);
    let nodes: Vec<T> = sorted.iter().map(|&id| sim.handle(id)).collect();
    let mut grads = GradStore::new();
    grads.insert(loss.id(), loss.ones_like().contiguous());
    for node in &nodes {
        if sim.is_variable(node.id()) {
            continue;
        }
        let original = grads
            .remove(&node.id())
            .expect("every walked node has a gradient");
        let grad = if detach {
            original.detach()
        } else {
            original.clone()
        };
        let Some(op) = sim.op_of(node.id()) else {
            continue;
        };
        rule(sim, &mut grads, node, &op, &grad, detach);
        drop(grad);
        drop(original);
    }
    drop(nodes);
    sim.free_bytes(held, bookkeeping);
    grads
}

/// One node's rule of candle's backward.
fn rule(sim: &Sim, grads: &mut GradStore, node: &T, op: &Op, grad: &T, detach: bool) {
    let h = |id: NodeId| sim.handle(id);
    match op {
        Op::Binary(lhs, rhs, Bin::Add) => {
            accumulate(sim, grads, *lhs, grad, false);
            accumulate(sim, grads, *rhs, grad, false);
        }
        Op::Binary(lhs, rhs, Bin::Sub) => {
            accumulate(sim, grads, *lhs, grad, false);
            accumulate(sim, grads, *rhs, grad, true);
        }
        Op::Binary(lhs, rhs, Bin::Mul) => {
            let lhs_grad = grad.mul(&h(*rhs));
            accumulate(sim, grads, *lhs, &lhs_grad, false);
            let rhs_grad = grad.mul(&h(*lhs));
            accumulate(sim, grads, *rhs, &rhs_grad, false);
        }
        Op::Binary(lhs, rhs, Bin::Div) => {
            let (l, r) = (h(*lhs), h(*rhs));
            let lhs_grad = grad.div(&r);
            accumulate(sim, grads, *lhs, &lhs_grad, false);
            let rhs_grad = grad.mul(&l).div(&r.unary(Un::Sqr));
            accumulate(sim, grads, *rhs, &rhs_grad, true);
        }
        Op::IndexSelect(arg, ids, dim) => {
            let sum = grads.entry(*arg).or_insert_with(|| h(*arg).zeros_like());
            let next = sum.index_add(&h(*ids), grad, *dim);
            *sum = next;
        }
        Op::IndexAdd(init, ids, src, dim) => {
            accumulate(sim, grads, *init, grad, false);
            let src_grad = grad.index_select(&h(*ids), *dim);
            accumulate(sim, grads, *src, &src_grad, false);
        }
        Op::Matmul(lhs, rhs) => {
            let (l, r) = (h(*lhs), h(*rhs));
            let lhs_grad = grad.matmul(&r.t());
            accumulate(sim, grads, *lhs, &lhs_grad, false);
            let rhs_grad = l.t().matmul(grad);
            accumulate(sim, grads, *rhs, &rhs_grad, false);
        }
        Op::Cat(args, dim) => {
            let mut start = 0;
            for &arg in args {
                let len = h(arg).dims()[*dim];
                let arg_grad = grad.narrow(*dim, start, len);
                accumulate(sim, grads, arg, &arg_grad, false);
                start += len;
            }
        }
        Op::Broadcast(arg) => {
            let a = h(*arg);
            let (arg_dims, node_dims) = (a.dims(), node.dims());
            let left = node_dims.len() - arg_dims.len();
            let mut sum_dims: Vec<usize> = (0..left).collect();
            for (i, (n, d)) in node_dims[left..].iter().zip(&arg_dims).enumerate() {
                if n != d {
                    sum_dims.push(i + left);
                }
            }
            let mut arg_grad = grad.sum_keepdim(&sum_dims);
            for _ in 0..left {
                arg_grad = arg_grad.squeeze(0);
            }
            let arg_grad = arg_grad.broadcast_as(&arg_dims);
            accumulate(sim, grads, *arg, &arg_grad, false);
        }
        Op::Reduce(arg, false) => {
            let g = grad.broadcast_as(&h(*arg).dims());
            accumulate(sim, grads, *arg, &g, false);
        }
        Op::Reduce(arg, true) => {
            let a = h(*arg);
            let dims = a.dims();
            let node_b = node.broadcast_as(&dims);
            let grad_b = grad.broadcast_as(&dims);
            let g = node_b.cmp().to_dtype(grad.dtype()).mul(&grad_b);
            let g = g.broadcast_as(&dims);
            accumulate(sim, grads, *arg, &g, false);
        }
        Op::ToDType(arg) => {
            let g = grad.to_dtype(h(*arg).dtype());
            accumulate(sim, grads, *arg, &g, false);
        }
        Op::Copy(arg) => accumulate(sim, grads, *arg, grad, false),
        Op::Affine(arg, mul) => {
            let g = grad.affine(*mul);
            accumulate(sim, grads, *arg, &g, false);
        }
        Op::Unary(arg, u) => {
            let a = h(*arg);
            match u {
                Un::Log => accumulate(sim, grads, *arg, &grad.div(&a), false),
                Un::Exp => accumulate(sim, grads, *arg, &grad.mul(node), false),
                Un::Neg => accumulate(sim, grads, *arg, grad, true),
                Un::Recip => {
                    let g = grad.div(&a.unary(Un::Sqr));
                    accumulate(sim, grads, *arg, &g, true);
                }
                Un::Sqr => {
                    let g = a.mul(grad).affine(2.0);
                    accumulate(sim, grads, *arg, &g, false);
                }
                Un::Sqrt => {
                    let g = grad.div(node).affine(0.5);
                    accumulate(sim, grads, *arg, &g, false);
                }
                Un::Relu => {
                    let relu_grad = {
                        let zeros = a.zeros_like();
                        let ge = a.cmp();
                        drop(zeros);
                        ge.to_dtype(a.dtype())
                    };
                    let g = grad.mul(&relu_grad);
                    accumulate(sim, grads, *arg, &g, false);
                }
                Un::Abs => {
                    // Only ever taken of detached values (finiteness checks).
                    unreachable!("abs is not differentiated in melora's graphs")
                }
            }
        }
        Op::Cmp(_) => {}
        Op::Narrow(arg, dim, start, len) => {
            let a = h(*arg);
            let dims = a.dims();
            let right = dims[*dim] - start - len;
            let pad = |n: usize| {
                let mut d = dims.clone();
                d[*dim] = n;
                sim.tensor(&d, grad.dtype())
            };
            let arg_grad = match (*start > 0, right > 0) {
                (false, false) => grad.clone(),
                (true, false) => {
                    let l = pad(*start);
                    T::cat(&[&l, grad], *dim)
                }
                (false, true) => {
                    let r = pad(right);
                    T::cat(&[grad, &r], *dim)
                }
                (true, true) => {
                    let (l, r) = (pad(*start), pad(right));
                    T::cat(&[&l, grad, &r], *dim)
                }
            };
            accumulate(sim, grads, *arg, &arg_grad, false);
        }
        Op::Reshape(arg) => {
            let g = grad.reshape(&h(*arg).dims());
            accumulate(sim, grads, *arg, &g, false);
        }
        Op::Transpose(arg, d1, d2) => {
            let g = grad.transpose(*d1, *d2);
            accumulate(sim, grads, *arg, &g, false);
        }
        Op::Permute(arg, order) => {
            let mut inverse = vec![0; order.len()];
            for (i, &d) in order.iter().enumerate() {
                inverse[d] = i;
            }
            let g = grad.permute(&inverse);
            accumulate(sim, grads, *arg, &g, false);
        }
        Op::Conv2d(arg, kernel, params) => {
            let (a, k) = (h(*arg), h(*kernel));
            let grad_arg = grad.conv_transpose2d(&k, *params);
            accumulate(sim, grads, *arg, &grad_arg, false);
            let grad_kernel = a
                .transpose(0, 1)
                .conv2d(&grad.transpose(0, 1), *params)
                .transpose(0, 1);
            accumulate(sim, grads, *kernel, &grad_kernel, false);
        }
        Op::ConvTranspose2d(arg, kernel, params) => {
            let (a, k) = (h(*arg), h(*kernel));
            let grad_arg = grad.conv2d(&k, *params);
            accumulate(sim, grads, *arg, &grad_arg, false);
            let grad_kernel = grad
                .transpose(0, 1)
                .conv2d(&a.transpose(0, 1), *params)
                .transpose(0, 1);
            accumulate(sim, grads, *kernel, &grad_kernel, false);
        }
        Op::Custom1(arg, custom) => {
            let a = h(*arg);
            let g = match custom {
                // The same op with the weight's roles swapped, on the contiguous
                // gradient: no weight gradient, at any order.
                Custom::FrozenLinear {
                    weight,
                    in_out,
                    transposed,
                } => {
                    grad.frozen_linear(&h(*weight), *in_out, !transposed, a.dims()[last(&a)], None)
                }
                // Half precision: one op summing rows in f64.
                Custom::Softmax if node.dtype().is_half() => softmax_grad(node, grad),
                Custom::Softmax => {
                    let weighted = grad.mul(node).sum_keepdim(&[last(node)]);
                    node.mul(&grad.broadcast_binary(&weighted, Bin::Sub))
                }
                Custom::Pointwise { order } => {
                    let next = a.custom1(Custom::Pointwise { order: order + 1 }, &a.dims());
                    grad.mul(&next)
                }
                Custom::LayerNorm | Custom::LayerNormGrad | Custom::SoftmaxGrad => {
                    unreachable!("ops of two or three inputs")
                }
            };
            accumulate(sim, grads, *arg, &g, false);
        }
        Op::Custom2(p, g, Custom::SoftmaxGrad) => {
            // For a cotangent c of d = p ⊙ (g − ⟨g, p⟩): d g = p ⊙ (c − ⟨c, p⟩) (the op
            // again) and d p = c ⊙ (g − ⟨g, p⟩) − g·⟨c, p⟩ in f32, the result made light.
            let (pt, gt) = (h(*p), h(*g));
            let d_g = softmax_grad(&pt, grad).to_dtype(gt.dtype());
            let work = pt.dtype().work();
            let (pw, gw, cw) = (pt.to_dtype(work), gt.to_dtype(work), grad.to_dtype(work));
            let l = last(&pt);
            let s_g = gw.mul(&pw).sum_keepdim(&[l]);
            let s_c = cw.mul(&pw).sum_keepdim(&[l]);
            let d_p = cw
                .mul(&gw.broadcast_binary(&s_g, Bin::Sub))
                .sub(&gw.broadcast_binary(&s_c, Bin::Mul));
            let d_p = light(d_p.to_dtype(pt.dtype()), detach);
            drop((pw, gw, cw, s_g, s_c));
            accumulate(sim, grads, *p, &d_p, false);
            accumulate(sim, grads, *g, &d_g, false);
        }
        Op::Custom2(..) => unreachable!("only the softmax gradient has two inputs"),
        Op::Custom3(x, gamma, beta, Custom::LayerNorm) if node.dtype().is_half() => {
            // `dx` from the fused op; a frozen scale or shift gets no gradient.
            let (xt, gm, bt) = (h(*x), h(*gamma), h(*beta));
            let dx = xt.custom3(&gm, &grad.contiguous(), Custom::LayerNormGrad);
            let l = last(&xt);
            let width = xt.dims()[l];
            let rows = xt.elem_count() / width;
            let work = xt.dtype().work();
            let grad_w = || grad.to_dtype(work).reshape(&[rows, width]);
            accumulate(sim, grads, *x, &dx, false);
            if gm.tracks() {
                let (normed, _) = normalised(&xt.to_dtype(work));
                let sum = grad_w().mul(&normed.reshape(&[rows, width])).sum(&[0]);
                let d_gamma = light(sum.to_dtype(gm.dtype()), detach);
                accumulate(sim, grads, *gamma, &d_gamma, false);
            }
            if bt.tracks() {
                let d_beta = light(grad_w().sum(&[0]).to_dtype(bt.dtype()), detach);
                accumulate(sim, grads, *beta, &d_beta, false);
            }
        }
        Op::Custom3(x, gamma, beta, Custom::LayerNorm) => {
            let (xt, gm) = (h(*x), h(*gamma));
            let l = last(&xt);
            let centered = xt.broadcast_binary(&xt.mean_keepdim(&[l]), Bin::Sub);
            let rstd = centered
                .unary(Un::Sqr)
                .mean_keepdim(&[l])
                .affine(1.0)
                .unary(Un::Sqrt)
                .unary(Un::Recip);
            let normed = centered.broadcast_binary(&rstd, Bin::Mul);
            let g_hat = grad.broadcast_binary(&gm, Bin::Mul);
            let dx = g_hat
                .broadcast_binary(&g_hat.mean_keepdim(&[l]), Bin::Sub)
                .sub(&normed.broadcast_binary(&g_hat.mul(&normed).mean_keepdim(&[l]), Bin::Mul))
                .broadcast_binary(&rstd, Bin::Mul);
            let width = xt.dims()[l];
            let rows = xt.elem_count() / width;
            accumulate(sim, grads, *x, &dx, false);
            // A frozen scale or shift (every transformer's) gets no gradient.
            if gm.tracks() {
                let d_gamma = grad.mul(&normed).reshape(&[rows, width]).sum(&[0]);
                accumulate(sim, grads, *gamma, &d_gamma, false);
            }
            if h(*beta).tracks() {
                let d_beta = grad.reshape(&[rows, width]).sum(&[0]);
                accumulate(sim, grads, *beta, &d_beta, false);
            }
        }
        Op::Custom3(x, gamma, c_in, Custom::LayerNormGrad) => {
            // The second derivative in the working type (`LayerNormGradOp::bwd`), for
            // a cotangent c of dx; its results are made light.
            let (xt, gm, gt) = (h(*x), h(*gamma), h(*c_in));
            let work = xt.dtype().work();
            let (xw, gw, cw, gammaw) = (
                xt.to_dtype(work),
                gt.to_dtype(work),
                grad.to_dtype(work),
                gm.to_dtype(work),
            );
            let l = last(&xt);
            let n = xt.dims()[l] as f64;
            let (x_hat, r) = normalised(&xw);
            let project = |w: &T| -> T {
                w.broadcast_binary(&w.mean_keepdim(&[l]), Bin::Sub)
                    .sub(&x_hat.broadcast_binary(&x_hat.mul(w).mean_keepdim(&[l]), Bin::Mul))
            };
            let g_hat = gw.broadcast_binary(&gammaw, Bin::Mul);
            let b = g_hat.mul(&x_hat).mean_keepdim(&[l]);
            let p_g = project(&g_hat);
            let s = cw.mul(&p_g).sum_keepdim(&[l]);
            let c_x = cw.mul(&x_hat).sum_keepdim(&[l]);
            let w = cw
                .broadcast_binary(&b, Bin::Mul)
                .add(&g_hat.broadcast_binary(&c_x.affine(1.0 / n), Bin::Mul));
            let d_x = x_hat
                .broadcast_binary(&s.affine(1.0 / n), Bin::Mul)
                .add(&project(&w))
                .broadcast_binary(&r.unary(Un::Sqr), Bin::Mul)
                .unary(Un::Neg);
            let r_pc = project(&cw).broadcast_binary(&r, Bin::Mul);
            let d_grad = r_pc.broadcast_binary(&gammaw, Bin::Mul);
            let d_gamma = gm.tracks().then(|| {
                let width = xt.dims()[l];
                let rows = xt.elem_count() / width;
                let sum = gw.mul(&r_pc).reshape(&[rows, width]).sum(&[0]);
                light(sum.to_dtype(gm.dtype()), detach)
            });
            let d_x = light(d_x.to_dtype(xt.dtype()), detach);
            let d_grad = light(d_grad.to_dtype(gt.dtype()), detach);
            drop((xw, gw, cw, gammaw, x_hat, r, g_hat, b, p_g, s, c_x, w, r_pc));
            accumulate(sim, grads, *x, &d_x, false);
            if let Some(d_gamma) = d_gamma {
                accumulate(sim, grads, *gamma, &d_gamma, false);
            }
            accumulate(sim, grads, *c_in, &d_grad, false);
        }
        Op::Custom3(..) => unreachable!("only layer norm has three inputs"),
        Op::Recomputed(args, block) => {
            let inputs: Vec<T> = args.iter().map(|&id| h(id)).collect();
            let gradients = (block.vjp)(&inputs, grad);
            for (&arg, g) in args.iter().zip(&gradients) {
                accumulate(sim, grads, arg, g, false);
            }
        }
    }
}

/// The gradients of `loss` at `leaves` (`ParamSet::gradients`): kept with their graph
/// (`keep`) or detached; a leaf the loss does not reach gets zeros. Under a loss
/// scale the pass runs on the scaled loss and each gradient is unscaled into a copy.
pub(crate) fn gradients(sim: &Sim, loss: &T, leaves: &[T], keep: bool) -> Vec<T> {
    let scaled = sim.loss_scaled();
    let scaled_loss = scaled.then(|| loss.affine(65536.0));
    let store = backward(sim, scaled_loss.as_ref().unwrap_or(loss), !keep);
    let out = leaves
        .iter()
        .map(|leaf| {
            let g = match store.get(&leaf.id()) {
                Some(g) if keep => g.clone(),
                Some(g) => g.detach(),
                None => return leaf.zeros_like(),
            };
            if scaled {
                g.affine(1.0 / 65536.0)
            } else {
                g
            }
        })
        .collect();
    drop(store);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::sim::{Category, DType};

    /// y = sum((x·w)²): a first-order gradient frees its intermediates, a kept one
    /// holds them (and the forward graph) alive.
    #[test]
    fn kept_gradients_hold_their_graph() {
        let sim = Sim::new(1);
        sim.set_category(Category::Activations);
        let x = sim.tensor(&[64, 32], DType::F64);
        let w = sim.variable(&[32, 16], DType::F64);
        let before = sim.live();
        let loss = x.matmul(&w).unary(Un::Sqr).sum_all();
        let first = gradients(&sim, &loss, std::slice::from_ref(&w), false);
        drop(loss);
        let after_first = sim.live() - before;
        // Only the gradient (and its node) survives a first-order pass.
        assert!(after_first < 32 * 16 * 8 + 1024, "{after_first}");
        drop(first);
        let loss = x.matmul(&w).unary(Un::Sqr).sum_all();
        let second = gradients(&sim, &loss, std::slice::from_ref(&w), true);
        drop(loss);
        let after_second = sim.live() - before;
        // The forward product [64, 16] and its square's gradient chain stay.
        assert!(after_second > 3 * 64 * 16 * 8, "{after_second}");
        drop(second);
        assert_eq!(sim.live(), before);
    }
}
