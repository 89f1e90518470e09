//! A shape-level replay of candle's tensors: which buffers exist, who holds them, and
//! when they are freed. No numbers are computed, only sizes.
//!
//! Every simulated tensor ([`T`]) is a node with a layout (dims, strides), an element
//! size, a storage (shared by views) and, when it tracks gradients, the op that made it
//! with references to the op's inputs — exactly what candle's `Tensor_` holds. A [`T`]
//! handle is reference-counted like candle's `Arc`: dropping the last handle and the
//! last op reference to a node frees it, and a storage is freed with its last node. So
//! the simulation's live bytes follow the real process's, allocation by allocation,
//! as long as the replayed code creates and drops tensors where the real code does.
//!
//! Besides the data buffers, each node and storage costs candle's bookkeeping (the
//! `Arc<Tensor_>` with its shape and stride vectors, the `Arc<Op>`, the
//! `Arc<RwLock<Storage>>`): see [`Overheads`]. Buffers that a kernel allocates and
//! frees within one call (im2col tiles, input copies) are counted as a
//! [`spike`](Sim::spike) above the live bytes.

use std::cell::RefCell;
use std::rc::Rc;

/// What a buffer is, for the breakdown of the peak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Category {
    /// Frozen weights of the base model.
    Weights,
    /// Trainable parameters and their per-step copies (θ₀…θ_K, leaves).
    Trainable,
    /// Gradients: every tensor a backward pass creates.
    Gradients,
    /// Outer optimiser state (AdamW moments).
    Optimizer,
    /// Forward activations (and what they keep for backward).
    Activations,
    /// The tasks' examples.
    Data,
    /// Kernel scratch and other short-lived buffers.
    Temporaries,
}

impl Category {
    /// Every category, in report order.
    pub(crate) const ALL: [Category; 7] = [
        Category::Weights,
        Category::Trainable,
        Category::Gradients,
        Category::Optimizer,
        Category::Activations,
        Category::Data,
        Category::Temporaries,
    ];

    fn index(self) -> usize {
        self as usize
    }
}

/// Bytes per category.
pub(crate) type Breakdown = [u64; 7];

/// candle's per-tensor bookkeeping on the heap, in bytes (64-bit targets).
///
/// A `Tensor` is an `Arc<Tensor_>` (id, storage `Arc`, the op inline with its input
/// handles, flags, dtype, device) with a layout of shape and stride vectors; a view
/// clones the layout, a fresh result also allocates an `Arc<RwLock<Storage>>` around
/// its data vector; a custom op adds an `Arc<Box<dyn CustomOp>>` around its struct.
/// The figures are what the counting allocator sees for candle 0.11.1 on x86-64; the
/// integration test `tests/planner_grid.rs` checks them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overheads {
    /// A view's node (`Tensor_` and its layout) without the per-dim part.
    pub view: u64,
    /// A view's node per dimension.
    pub view_per_dim: u64,
    /// A fresh result (node, layout, storage) without its data and per-dim part.
    pub fresh: u64,
    /// A fresh result per dimension.
    pub fresh_per_dim: u64,
    /// A custom op's `Arc<Box<dyn CustomOp>>` header (its struct comes on top).
    pub custom_op: u64,
}

/// Figures of candle 0.11.1 on x86-64 (see [`Overheads`]).
pub const CANDLE_OVERHEADS: Overheads = Overheads {
    view: 152,
    view_per_dim: 16,
    fresh: 240,
    fresh_per_dim: 8,
    custom_op: 32,
};

/// A binary element-wise op.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Bin {
    Add,
    Sub,
    Mul,
    Div,
}

/// A unary element-wise op (candle's own, differentiated by its rules).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Un {
    Exp,
    Log,
    Sqr,
    Sqrt,
    Neg,
    Recip,
    Relu,
    Abs,
}

/// melora's custom ops (`tensor::ops`), with the backward each one builds.
#[derive(Debug, Clone)]
pub(crate) enum Custom {
    /// `frozen_linear`: `x·Wᵀ` (or, `transposed`, `g·W`) for a frozen `W` held by the
    /// op struct; its backward is the same op with the roles swapped.
    FrozenLinear {
        weight: NodeId,
        in_out: bool,
        transposed: bool,
    },
    /// Fused layer norm (inputs x, γ, β); backward rebuilds the statistics (f32/f64)
    /// or is [`Custom::LayerNormGrad`] (half precision).
    LayerNorm,
    /// The layer norm's input gradient as one op (inputs x, γ, grad), in half
    /// precision; its own backward is tensor ops in f32.
    LayerNormGrad,
    /// Fused (masked) softmax; backward from its output.
    Softmax,
    /// The softmax's input gradient as one op (inputs p, g), in half precision.
    SoftmaxGrad,
    /// Element-wise function of the given derivative order (GELU, SiLU, sigmoid).
    Pointwise { order: u8 },
}

/// Convolution settings (stride and dilation are 1 in every model here).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConvParams {
    pub(crate) padding: usize,
}

/// The op that produced a tracked node, holding its inputs as candle's `Op` does.
#[derive(Debug, Clone)]
pub(crate) enum Op {
    Binary(NodeId, NodeId, Bin),
    Unary(NodeId, Un),
    Affine(NodeId, f64),
    Matmul(NodeId, NodeId),
    Broadcast(NodeId),
    /// Sum (`false`) or max (`true`) over some dims.
    Reduce(NodeId, bool),
    Reshape(NodeId),
    Copy(NodeId),
    Transpose(NodeId, usize, usize),
    Permute(NodeId, Vec<usize>),
    Narrow(NodeId, usize, usize, usize),
    ToDType(NodeId),
    Cmp(NodeId),
    IndexSelect(NodeId, NodeId, usize),
    IndexAdd(NodeId, NodeId, NodeId, usize),
    Cat(Vec<NodeId>, usize),
    Conv2d(NodeId, NodeId, ConvParams),
    ConvTranspose2d(NodeId, NodeId, ConvParams),
    Custom1(NodeId, Custom),
    Custom2(NodeId, NodeId, Custom),
    Custom3(NodeId, NodeId, NodeId, Custom),
    /// A block recomputed in its backward pass (`ops::Recomputed`), on its inputs.
    Recomputed(Vec<NodeId>, Rc<SimBlock>),
}

/// A recomputed block's forward on detached copies of its inputs.
pub(crate) type SimForward = Box<dyn Fn(&[T]) -> T>;
/// A recomputed block's gradients of `⟨forward(x), g⟩` in each input.
pub(crate) type SimVjp = Box<dyn Fn(&[T], &T) -> Vec<T>>;

/// A recomputed block's forward and vector-Jacobian product, replayed on simulated
/// tensors (`tensor::ops::Recomputed`).
pub(crate) struct SimBlock {
    /// The forward.
    pub(crate) forward: SimForward,
    /// The vector-Jacobian product.
    pub(crate) vjp: SimVjp,
    /// Heap bytes of the op struct and its closures' captures.
    pub(crate) struct_bytes: u64,
}

impl std::fmt::Debug for SimBlock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SimBlock")
    }
}

impl Custom {
    /// Bytes of the op struct (`FrozenLinearOp`, `SoftmaxOp` without its mask,
    /// `PointwiseOp`, `LayerNormOp`, `LayerNormGradOp`; `SoftmaxGradOp` has no field,
    /// so its box allocates nothing).
    fn struct_bytes(&self) -> u64 {
        match self {
            Custom::FrozenLinear { .. } => 48,
            Custom::Softmax => 48,
            Custom::SoftmaxGrad => 0,
            Custom::Pointwise { .. } => 2,
            Custom::LayerNorm | Custom::LayerNormGrad => 8,
        }
    }
}

impl Op {
    /// Inputs the op keeps alive, in candle's order (also the order of its graph walk).
    pub(crate) fn inputs(&self) -> Vec<NodeId> {
        match self {
            Op::Binary(a, b, _)
            | Op::Matmul(a, b)
            | Op::Custom2(a, b, _)
            | Op::IndexSelect(a, b, _)
            | Op::Conv2d(a, b, _)
            | Op::ConvTranspose2d(a, b, _) => vec![*a, *b],
            Op::Unary(a, _)
            | Op::Affine(a, _)
            | Op::Broadcast(a)
            | Op::Reduce(a, _)
            | Op::Reshape(a)
            | Op::Copy(a)
            | Op::Transpose(a, _, _)
            | Op::Permute(a, _)
            | Op::Narrow(a, _, _, _)
            | Op::ToDType(a)
            | Op::Cmp(a) => vec![*a],
            Op::IndexAdd(a, b, c, _) | Op::Custom3(a, b, c, _) => vec![*a, *b, *c],
            Op::Cat(args, _) | Op::Recomputed(args, _) => args.clone(),
            Op::Custom1(a, c) => match c {
                // The op struct holds the frozen weight (cloned, so not freed with it).
                Custom::FrozenLinear { weight, .. } => vec![*a, *weight],
                _ => vec![*a],
            },
        }
    }

    /// The inputs candle's `sorted_nodes` walks into (it skips a frozen linear's weight,
    /// held by the op struct, not by the op's arguments).
    pub(crate) fn walked(&self) -> Vec<NodeId> {
        match self {
            Op::Custom1(a, _) => vec![*a],
            other => other.inputs(),
        }
    }
}

/// Index of a node in the simulation.
pub(crate) type NodeId = usize;

/// Element type of a simulated tensor: candle's own.
pub(crate) use candle_core::DType;

/// What the simulation asks of an element type.
pub(crate) trait SimDType: Copy {
    /// Bytes per element.
    fn bytes(self) -> u64;
    /// Integer types are never differentiated (candle's walk stops at them).
    fn is_int(self) -> bool;
    /// The type's name (floats; `int` for the integer types).
    fn name(self) -> &'static str;
    /// bf16 or f16.
    fn is_half(self) -> bool;
    /// The type products and the fused ops' second derivatives are computed in: f64
    /// for f64, f32 otherwise (`fused_norm::work_dtype`, the frozen linear's
    /// accumulator).
    fn work(self) -> DType;
}

impl SimDType for DType {
    fn bytes(self) -> u64 {
        self.size_in_bytes() as u64
    }

    fn is_int(self) -> bool {
        !self.is_float()
    }

    fn name(self) -> &'static str {
        match self {
            DType::F64 => "f64",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            _ if self.is_int() => "int",
            _ => "f32",
        }
    }

    fn is_half(self) -> bool {
        matches!(self, DType::BF16 | DType::F16)
    }

    fn work(self) -> DType {
        if self == DType::F64 {
            DType::F64
        } else {
            DType::F32
        }
    }
}

#[derive(Debug, Clone)]
struct Node {
    dims: Vec<usize>,
    strides: Vec<usize>,
    dtype: DType,
    storage: usize,
    op: Option<Op>,
    variable: bool,
    refs: u32,
    /// Bookkeeping bytes of this node (tensor struct, vectors, op).
    overhead: u64,
    category: Category,
}

#[derive(Debug, Clone)]
struct Storage {
    bytes: u64,
    /// Bookkeeping beyond the node's (see [`Overheads`]).
    overhead: u64,
    refs: u32,
    category: Category,
}

/// The state behind every handle.
#[derive(Debug)]
pub(crate) struct Inner {
    nodes: Vec<Option<Node>>,
    storages: Vec<Option<Storage>>,
    /// Slots of freed nodes and storages, reused so that the simulation's own memory
    /// follows the live tensors, not every tensor ever made. A slot is only reused
    /// once nothing refers to its node: handles and ops count references, and the
    /// gradient stores are only asked about nodes that are alive.
    free_nodes: Vec<NodeId>,
    free_storages: Vec<usize>,
    live: Breakdown,
    live_total: u64,
    peak_total: u64,
    peak_breakdown: Breakdown,
    /// Category given to new buffers.
    pub(crate) category: Category,
    overheads: Overheads,
    /// Threads that run kernel tiles at once (rayon's pool).
    pub(crate) threads: u64,
    /// Whether backward passes run under a loss scale (f16 activations).
    loss_scaled: bool,
    /// Recomputed blocks of freed nodes, dropped once the borrow of the simulation
    /// ends (their closures hold tensors, whose drop borrows it again).
    released_blocks: Vec<Rc<SimBlock>>,
}

/// A simulation: the live bytes and their peak.
#[derive(Debug, Clone)]
pub(crate) struct Sim(Rc<RefCell<Inner>>);

/// A handle on a simulated tensor (candle's `Tensor`): cloning and dropping it count
/// references as the real `Arc` does.
#[derive(Debug)]
pub(crate) struct T {
    sim: Rc<RefCell<Inner>>,
    id: NodeId,
}

impl Clone for T {
    fn clone(&self) -> Self {
        self.sim.borrow_mut().incref(self.id);
        T {
            sim: self.sim.clone(),
            id: self.id,
        }
    }
}

impl Drop for T {
    fn drop(&mut self) {
        let released = {
            let mut inner = self.sim.borrow_mut();
            inner.decref(self.id);
            std::mem::take(&mut inner.released_blocks)
        };
        drop(released);
    }
}

fn contiguous_strides(dims: &[usize]) -> Vec<usize> {
    let mut strides = vec![1; dims.len()];
    for i in (0..dims.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * dims[i + 1];
    }
    strides
}

/// candle's `Shape::is_contiguous`: row-major strides, dimensions of size 1 ignored.
fn is_contiguous(dims: &[usize], strides: &[usize]) -> bool {
    let mut acc = 1;
    for (&d, &s) in dims.iter().zip(strides).rev() {
        if d > 1 && s != acc {
            return false;
        }
        acc *= d;
    }
    true
}

impl Inner {
    fn node(&self, id: NodeId) -> &Node {
        self.nodes[id]
            .as_ref()
            .expect("simulated tensor used after free")
    }

    fn incref(&mut self, id: NodeId) {
        self.nodes[id].as_mut().expect("live node").refs += 1;
    }

    fn account(&mut self, category: Category, bytes: u64) {
        self.live[category.index()] += bytes;
        self.live_total += bytes;
        if self.live_total > self.peak_total {
            self.peak_total = self.live_total;
            self.peak_breakdown = self.live;
        }
    }

    fn release(&mut self, category: Category, bytes: u64) {
        self.live[category.index()] -= bytes;
        self.live_total -= bytes;
    }

    /// Drops one reference; frees the node (and what only it held) at zero.
    fn decref(&mut self, id: NodeId) {
        let mut pending = vec![id];
        while let Some(id) = pending.pop() {
            let node = self.nodes[id].as_mut().expect("live node");
            node.refs -= 1;
            if node.refs > 0 {
                continue;
            }
            let node = self.nodes[id].take().expect("live node");
            self.free_nodes.push(id);
            self.release(node.category, node.overhead);
            let storage = self.storages[node.storage].as_mut().expect("live storage");
            storage.refs -= 1;
            if storage.refs == 0 {
                let storage = self.storages[node.storage].take().expect("live storage");
                self.free_storages.push(node.storage);
                self.release(storage.category, storage.bytes + storage.overhead);
            }
            if let Some(op) = node.op {
                pending.extend(op.inputs());
                if let Op::Recomputed(_, block) = op {
                    self.released_blocks.push(block);
                }
            }
        }
    }

    fn new_storage(&mut self, bytes: u64, rank: usize) -> usize {
        let category = self.category;
        // A fresh tensor costs `fresh + fresh_per_dim·rank` in all; its node is
        // counted as a view's, the rest here.
        let o = self.overheads;
        let overhead = (o.fresh + o.fresh_per_dim * rank as u64)
            .saturating_sub(o.view + o.view_per_dim * rank as u64);
        self.account(category, bytes + overhead);
        let storage = Some(Storage {
            bytes,
            overhead,
            refs: 0,
            category,
        });
        match self.free_storages.pop() {
            Some(slot) => {
                self.storages[slot] = storage;
                slot
            }
            None => {
                self.storages.push(storage);
                self.storages.len() - 1
            }
        }
    }

    /// A node on `storage` (which gains a reference); `op` is kept only when one of
    /// its inputs tracks gradients (candle's `BackpropOp::new`).
    fn new_node(
        &mut self,
        dims: Vec<usize>,
        strides: Vec<usize>,
        dtype: DType,
        storage: usize,
        op: Option<Op>,
        variable: bool,
    ) -> NodeId {
        let op = op.filter(|op| op.walked().iter().any(|&i| self.tracks(i)));
        if let Some(op) = &op {
            for i in op.inputs() {
                self.incref(i);
            }
        }
        let custom = match &op {
            Some(Op::Custom1(_, c) | Op::Custom2(_, _, c) | Op::Custom3(_, _, _, c)) => {
                self.overheads.custom_op + c.struct_bytes()
            }
            Some(Op::Recomputed(_, block)) => self.overheads.custom_op + block.struct_bytes,
            _ => 0,
        };
        let overhead =
            self.overheads.view + self.overheads.view_per_dim * dims.len() as u64 + custom;
        let category = self.category;
        self.account(category, overhead);
        self.storages[storage].as_mut().expect("live storage").refs += 1;
        let node = Some(Node {
            dims,
            strides,
            dtype,
            storage,
            op,
            variable,
            refs: 1,
            overhead,
            category,
        });
        match self.free_nodes.pop() {
            Some(slot) => {
                self.nodes[slot] = node;
                slot
            }
            None => {
                self.nodes.push(node);
                self.nodes.len() - 1
            }
        }
    }

    fn tracks(&self, id: NodeId) -> bool {
        let n = self.node(id);
        n.variable || n.op.is_some()
    }
}

impl Sim {
    /// An empty simulation; kernels that split work over threads use `threads`.
    pub(crate) fn new(threads: usize) -> Self {
        Sim(Rc::new(RefCell::new(Inner {
            nodes: Vec::new(),
            storages: Vec::new(),
            free_nodes: Vec::new(),
            free_storages: Vec::new(),
            live: [0; 7],
            live_total: 0,
            peak_total: 0,
            peak_breakdown: [0; 7],
            category: Category::Temporaries,
            overheads: CANDLE_OVERHEADS,
            threads: threads.max(1) as u64,
            loss_scaled: false,
            released_blocks: Vec::new(),
        })))
    }

    /// Sets the category of buffers created from now on; returns the previous one.
    pub(crate) fn set_category(&self, category: Category) -> Category {
        std::mem::replace(&mut self.0.borrow_mut().category, category)
    }

    /// Bytes live now.
    pub(crate) fn live(&self) -> u64 {
        self.0.borrow().live_total
    }

    /// The highest live bytes so far, and their breakdown at that moment.
    pub(crate) fn peak(&self) -> (u64, Breakdown) {
        let inner = self.0.borrow();
        (inner.peak_total, inner.peak_breakdown)
    }

    /// Bytes of live tensor data (without candle's bookkeeping).
    pub(crate) fn data_bytes(&self) -> u64 {
        self.0
            .borrow()
            .storages
            .iter()
            .flatten()
            .map(|s| s.bytes)
            .sum()
    }

    /// Restarts the peak from the live bytes (as a new `MemoryMeter` does).
    pub(crate) fn reset_peak(&self) {
        let mut inner = self.0.borrow_mut();
        inner.peak_total = inner.live_total;
        inner.peak_breakdown = inner.live;
    }

    /// Counts `bytes` allocated and freed within one call, above what is live.
    pub(crate) fn spike(&self, bytes: u64) {
        let mut inner = self.0.borrow_mut();
        let category = Category::Temporaries;
        inner.account(category, bytes);
        inner.release(category, bytes);
    }

    /// Counts a buffer that lives until [`Sim::free_bytes`] (non-tensor data such as
    /// the custom ops' masks).
    pub(crate) fn hold_bytes(&self, bytes: u64) -> Category {
        let mut inner = self.0.borrow_mut();
        let category = inner.category;
        inner.account(category, bytes);
        category
    }

    /// Counts `bytes` of scratch (in the temporaries) until [`Sim::free_temporary`].
    pub(crate) fn hold_temporary(&self, bytes: u64) -> u64 {
        self.0.borrow_mut().account(Category::Temporaries, bytes);
        bytes
    }

    /// Releases scratch counted by [`Sim::hold_temporary`].
    pub(crate) fn free_temporary(&self, bytes: u64) {
        self.0.borrow_mut().release(Category::Temporaries, bytes);
    }

    /// Releases bytes counted by [`Sim::hold_bytes`] in `category`.
    pub(crate) fn free_bytes(&self, category: Category, bytes: u64) {
        self.0.borrow_mut().release(category, bytes);
    }

    /// Runs later backward passes under a loss scale (`tensor::loss_scale`), or not.
    pub(crate) fn set_loss_scaled(&self, scaled: bool) {
        self.0.borrow_mut().loss_scaled = scaled;
    }

    /// Whether backward passes run under a loss scale.
    pub(crate) fn loss_scaled(&self) -> bool {
        self.0.borrow().loss_scaled
    }

    /// Kernel threads.
    pub(crate) fn threads(&self) -> u64 {
        self.0.borrow().threads
    }

    fn wrap(&self, id: NodeId) -> T {
        T {
            sim: self.0.clone(),
            id,
        }
    }

    /// A fresh contiguous tensor (zeros, ones, data): not tracked.
    pub(crate) fn tensor(&self, dims: &[usize], dtype: DType) -> T {
        self.alloc(dims, dtype, None, false)
    }

    /// A leaf variable (a trainable tensor at which gradients are taken).
    pub(crate) fn variable(&self, dims: &[usize], dtype: DType) -> T {
        self.alloc(dims, dtype, None, true)
    }

    /// A fresh contiguous tensor whose buffer holds `bytes` (a vector grown past its
    /// length keeps its capacity): not tracked.
    pub(crate) fn tensor_with_capacity(&self, dims: &[usize], dtype: DType, bytes: u64) -> T {
        self.alloc_bytes(dims, dtype, None, false, bytes)
    }

    /// A new contiguous buffer for the result of `op`.
    fn alloc(&self, dims: &[usize], dtype: DType, op: Option<Op>, variable: bool) -> T {
        let elems: usize = dims.iter().product();
        self.alloc_bytes(dims, dtype, op, variable, elems as u64 * dtype.bytes())
    }

    fn alloc_bytes(
        &self,
        dims: &[usize],
        dtype: DType,
        op: Option<Op>,
        variable: bool,
        bytes: u64,
    ) -> T {
        let mut inner = self.0.borrow_mut();
        let storage = inner.new_storage(bytes, dims.len());
        let id = inner.new_node(
            dims.to_vec(),
            contiguous_strides(dims),
            dtype,
            storage,
            op,
            variable,
        );
        drop(inner);
        self.wrap(id)
    }

    /// A view of `of`'s storage with another layout, made by `op`.
    fn view(&self, of: &T, dims: Vec<usize>, strides: Vec<usize>, op: Op) -> T {
        let mut inner = self.0.borrow_mut();
        let (storage, dtype) = {
            let n = inner.node(of.id);
            (n.storage, n.dtype)
        };
        let id = inner.new_node(dims, strides, dtype, storage, Some(op), false);
        drop(inner);
        self.wrap(id)
    }

    /// A handle on an existing node.
    pub(crate) fn handle(&self, id: NodeId) -> T {
        self.0.borrow_mut().incref(id);
        self.wrap(id)
    }

    fn with_node<R>(&self, id: NodeId, f: impl FnOnce(&Node) -> R) -> R {
        f(self.0.borrow().node(id))
    }

    /// The op of a node, if it tracks one.
    pub(crate) fn op_of(&self, id: NodeId) -> Option<Op> {
        self.with_node(id, |n| n.op.clone())
    }

    /// Whether a node is a leaf variable.
    pub(crate) fn is_variable(&self, id: NodeId) -> bool {
        self.with_node(id, |n| n.variable)
    }

    /// Whether a node's type is an integer type.
    pub(crate) fn is_int(&self, id: NodeId) -> bool {
        self.with_node(id, |n| n.dtype.is_int())
    }
}

impl T {
    fn sim(&self) -> Sim {
        Sim(self.sim.clone())
    }

    /// The simulation this tensor belongs to.
    pub(crate) fn sim_of(&self) -> Sim {
        self.sim()
    }

    /// The node's index.
    pub(crate) fn id(&self) -> NodeId {
        self.id
    }

    /// Dimensions.
    pub(crate) fn dims(&self) -> Vec<usize> {
        self.sim.borrow().node(self.id).dims.clone()
    }

    fn strides(&self) -> Vec<usize> {
        self.sim.borrow().node(self.id).strides.clone()
    }

    /// Element type.
    pub(crate) fn dtype(&self) -> DType {
        self.sim.borrow().node(self.id).dtype
    }

    /// Number of elements.
    pub(crate) fn elem_count(&self) -> usize {
        self.dims().iter().product()
    }

    /// Rank.
    pub(crate) fn rank(&self) -> usize {
        self.dims().len()
    }

    /// Whether the tensor tracks gradients (a variable, or made by an op on one):
    /// candle's `track_op`.
    pub(crate) fn tracks(&self) -> bool {
        self.sim.borrow().tracks(self.id)
    }

    /// Whether the layout is row-major contiguous.
    pub(crate) fn is_contiguous(&self) -> bool {
        let n = self.sim.borrow();
        let node = n.node(self.id);
        is_contiguous(&node.dims, &node.strides)
    }

    fn op_output(&self, dims: &[usize], dtype: DType, op: Op) -> T {
        self.sim().alloc(dims, dtype, Some(op), false)
    }

    /// Same-shape element-wise op.
    pub(crate) fn binary(&self, rhs: &T, op: Bin) -> T {
        debug_assert_eq!(self.dims(), rhs.dims(), "binary op on different shapes");
        self.op_output(&self.dims(), self.dtype(), Op::Binary(self.id, rhs.id, op))
    }

    /// `self + rhs`.
    pub(crate) fn add(&self, rhs: &T) -> T {
        self.binary(rhs, Bin::Add)
    }

    /// `self − rhs`.
    pub(crate) fn sub(&self, rhs: &T) -> T {
        self.binary(rhs, Bin::Sub)
    }

    /// `self ⊙ rhs`.
    pub(crate) fn mul(&self, rhs: &T) -> T {
        self.binary(rhs, Bin::Mul)
    }

    /// `self / rhs`.
    pub(crate) fn div(&self, rhs: &T) -> T {
        self.binary(rhs, Bin::Div)
    }

    /// candle's `broadcast_*`: broadcasts whichever side needs it, then the op.
    pub(crate) fn broadcast_binary(&self, rhs: &T, op: Bin) -> T {
        let (a, b) = (self.dims(), rhs.dims());
        let rank = a.len().max(b.len());
        let pad = |d: &[usize]| {
            let mut v = vec![1; rank - d.len()];
            v.extend_from_slice(d);
            v
        };
        let (pa, pb) = (pad(&a), pad(&b));
        let shape: Vec<usize> = pa.iter().zip(&pb).map(|(x, y)| *x.max(y)).collect();
        let lhs = if shape != a {
            self.broadcast_as(&shape)
        } else {
            self.clone()
        };
        let r = if shape != b {
            rhs.broadcast_as(&shape)
        } else {
            rhs.clone()
        };
        lhs.binary(&r, op)
    }

    /// Element-wise unary op.
    pub(crate) fn unary(&self, op: Un) -> T {
        self.op_output(&self.dims(), self.dtype(), Op::Unary(self.id, op))
    }

    /// `mul·self + add` (also `self * f64`, `self + f64`).
    pub(crate) fn affine(&self, mul: f64) -> T {
        self.op_output(&self.dims(), self.dtype(), Op::Affine(self.id, mul))
    }

    /// Matrix product over the last two dims (batch dims equal).
    ///
    /// candle 0.11.1 has no bf16 kernel: it widens both operands' whole storages to
    /// f32, multiplies into an f32 result and narrows that into the bf16 one. The f16
    /// kernel packs the right operand (and a small left one) into f32 panels on each
    /// call.
    pub(crate) fn matmul(&self, rhs: &T) -> T {
        let (a, b) = (self.dims(), rhs.dims());
        let mut dims = a.clone();
        let n = dims.len();
        dims[n - 1] = b[b.len() - 1];
        let out = self.op_output(&dims, self.dtype(), Op::Matmul(self.id, rhs.id));
        let dtype = self.dtype();
        if dtype == DType::BF16 {
            let widened = self.storage_elems() + rhs.storage_elems() + out.elem_count() as u64;
            self.sim().spike(4 * widened);
        } else if dtype.is_half() {
            let (m, k, cols) = (a[n - 2] as u64, a[n - 1] as u64, b[b.len() - 1] as u64);
            self.sim().spike(4 * (m * k + k * cols));
        }
        out
    }

    /// Elements of the storage this tensor views.
    pub(crate) fn storage_elems(&self) -> u64 {
        let inner = self.sim.borrow();
        let node = inner.node(self.id);
        let storage = inner.storages[node.storage].as_ref().expect("live storage");
        storage.bytes / node.dtype.bytes()
    }

    /// A broadcast view (always a new node, as in candle).
    pub(crate) fn broadcast_as(&self, shape: &[usize]) -> T {
        let (dims, strides) = (self.dims(), self.strides());
        let added = shape.len() - dims.len();
        let mut out_strides = vec![0; shape.len()];
        for i in 0..dims.len() {
            out_strides[added + i] = if dims[i] == shape[added + i] {
                strides[i]
            } else {
                0
            };
        }
        self.sim()
            .view(self, shape.to_vec(), out_strides, Op::Broadcast(self.id))
    }

    /// Swaps two dims (a view).
    pub(crate) fn transpose(&self, d1: usize, d2: usize) -> T {
        if d1 == d2 {
            return self.clone();
        }
        let (mut dims, mut strides) = (self.dims(), self.strides());
        dims.swap(d1, d2);
        strides.swap(d1, d2);
        self.sim()
            .view(self, dims, strides, Op::Transpose(self.id, d1, d2))
    }

    /// Reorders the dims (a view).
    pub(crate) fn permute(&self, order: &[usize]) -> T {
        let (dims, strides) = (self.dims(), self.strides());
        let new_dims = order.iter().map(|&i| dims[i]).collect();
        let new_strides = order.iter().map(|&i| strides[i]).collect();
        self.sim().view(
            self,
            new_dims,
            new_strides,
            Op::Permute(self.id, order.to_vec()),
        )
    }

    /// Transpose of the last two dims.
    pub(crate) fn t(&self) -> T {
        let r = self.rank();
        self.transpose(r - 2, r - 1)
    }

    /// Reshape: a view of a contiguous tensor, otherwise a copy.
    pub(crate) fn reshape(&self, dims: &[usize]) -> T {
        if self.is_contiguous() {
            self.sim().view(
                self,
                dims.to_vec(),
                contiguous_strides(dims),
                Op::Reshape(self.id),
            )
        } else {
            self.op_output(dims, self.dtype(), Op::Reshape(self.id))
        }
    }

    /// Inserts a dim of size 1 (a view).
    pub(crate) fn unsqueeze(&self, dim: usize) -> T {
        let (mut dims, mut strides) = (self.dims(), self.strides());
        let stride = if dim < strides.len() { strides[dim] } else { 1 };
        dims.insert(dim, 1);
        strides.insert(dim, stride);
        self.sim().view(self, dims, strides, Op::Reshape(self.id))
    }

    /// Removes a dim of size 1 (a view; unchanged if the dim is not 1).
    pub(crate) fn squeeze(&self, dim: usize) -> T {
        let (mut dims, mut strides) = (self.dims(), self.strides());
        if dims[dim] != 1 {
            return self.clone();
        }
        dims.remove(dim);
        strides.remove(dim);
        self.sim().view(self, dims, strides, Op::Reshape(self.id))
    }

    /// A copy when not contiguous, else the same tensor.
    pub(crate) fn contiguous(&self) -> T {
        if self.is_contiguous() {
            self.clone()
        } else {
            self.op_output(&self.dims(), self.dtype(), Op::Copy(self.id))
        }
    }

    /// A slice along `dim` (a view; the same tensor when it covers the dim).
    pub(crate) fn narrow(&self, dim: usize, start: usize, len: usize) -> T {
        let (mut dims, strides) = (self.dims(), self.strides());
        if start == 0 && dims[dim] == len {
            return self.clone();
        }
        dims[dim] = len;
        self.sim()
            .view(self, dims, strides, Op::Narrow(self.id, dim, start, len))
    }

    fn reduce(&self, dims: &[usize], max: bool, keepdim: bool) -> T {
        let mut out = self.dims();
        for &d in dims {
            out[d] = 1;
        }
        let r = self.op_output(&out, self.dtype(), Op::Reduce(self.id, max));
        if keepdim {
            r
        } else {
            // candle's squeeze_dims: one reshape-view node.
            let kept: Vec<usize> = out
                .iter()
                .enumerate()
                .filter(|(i, _)| !dims.contains(i))
                .map(|(_, d)| *d)
                .collect();
            let strides = contiguous_strides(&kept);
            r.sim().view(&r, kept, strides, Op::Reshape(r.id))
        }
    }

    /// Sum over `dims`, kept as size 1.
    pub(crate) fn sum_keepdim(&self, dims: &[usize]) -> T {
        self.reduce(dims, false, true)
    }

    /// Sum over `dims`, removed.
    pub(crate) fn sum(&self, dims: &[usize]) -> T {
        self.reduce(dims, false, false)
    }

    /// Mean over `dims` (sum then scale), kept.
    pub(crate) fn mean_keepdim(&self, dims: &[usize]) -> T {
        let d = self.dims();
        let count: usize = dims.iter().map(|&i| d[i]).product();
        self.sum_keepdim(dims).affine(1.0 / count as f64)
    }

    /// Max over `dim`, kept.
    pub(crate) fn max_keepdim(&self, dim: usize) -> T {
        self.reduce(&[dim], true, true)
    }

    /// Max over `dim`, removed.
    pub(crate) fn max(&self, dim: usize) -> T {
        self.reduce(&[dim], true, false)
    }

    /// Sum of every element (a 0-d tensor).
    pub(crate) fn sum_all(&self) -> T {
        let all: Vec<usize> = (0..self.rank()).collect();
        self.sum(&all)
    }

    /// A comparison (u8 result; tracked if the input is, as in candle).
    pub(crate) fn cmp(&self) -> T {
        self.op_output(&self.dims(), DType::U8, Op::Cmp(self.id))
    }

    /// Conversion to another type (the same tensor if already of that type).
    pub(crate) fn to_dtype(&self, dtype: DType) -> T {
        if self.dtype() == dtype {
            self.clone()
        } else {
            self.op_output(&self.dims(), dtype, Op::ToDType(self.id))
        }
    }

    /// The same storage without history (the same tensor if it has none).
    pub(crate) fn detach(&self) -> T {
        let (op, variable) = {
            let inner = self.sim.borrow();
            let n = inner.node(self.id);
            (n.op.is_some(), n.variable)
        };
        if !op && !variable {
            return self.clone();
        }
        let mut inner = self.sim.borrow_mut();
        let (dims, strides, dtype, storage) = {
            let n = inner.node(self.id);
            (n.dims.clone(), n.strides.clone(), n.dtype, n.storage)
        };
        let id = inner.new_node(dims, strides, dtype, storage, None, false);
        drop(inner);
        self.sim().wrap(id)
    }

    /// A fresh leaf variable holding a copy (`Var::from_tensor`).
    pub(crate) fn to_leaf(&self) -> T {
        self.sim().variable(&self.dims(), self.dtype())
    }

    /// Zeros of the same shape and type.
    pub(crate) fn zeros_like(&self) -> T {
        self.sim().tensor(&self.dims(), self.dtype())
    }

    /// Ones of the same shape and type.
    pub(crate) fn ones_like(&self) -> T {
        self.zeros_like()
    }

    /// `ops::frozen_linear_matrix`: the frozen map of `weight` (dense of any float
    /// type, or int8 values) applied to `self` made contiguous, `[.., k_in]` →
    /// `[.., k_out]`, or with `transposed` its input gradient (the same op with the
    /// weight's roles swapped); `bias` is added to the forward map only.
    ///
    /// The product accumulates in the working type (f32, f64 for f64 inputs): an input
    /// of another type is converted for the call, as is a weight (dequantized for
    /// int8), and a result of another type is narrowed from an f32 buffer, so the call
    /// holds up to an input, a weight and a result in f32 beside its output.
    pub(crate) fn frozen_linear(
        &self,
        weight: &T,
        in_out: bool,
        transposed: bool,
        k_out: usize,
        bias: Option<&T>,
    ) -> T {
        let x = self.contiguous();
        let mut dims = x.dims();
        let k_in = *dims.last().expect("rank ≥ 1");
        *dims.last_mut().expect("rank ≥ 1") = k_out;
        let (x_dtype, w_dtype) = (x.dtype(), weight.dtype());
        let work = x_dtype.work();
        let rows = (x.elem_count() / k_in.max(1)) as u64;
        let converted = |elems: u64, dtype: DType| {
            if dtype == work {
                0
            } else {
                elems * work.bytes()
            }
        };
        let x_work = converted(rows * k_in as u64, x_dtype);
        let w_work = converted(weight.elem_count() as u64, w_dtype);
        let bias_work = match bias {
            Some(b) if !transposed => converted(b.elem_count() as u64, b.dtype()),
            _ => 0,
        };
        let sim = self.sim();
        let held = sim.hold_temporary(x_work);
        let op = Op::Custom1(
            x.id,
            Custom::FrozenLinear {
                weight: weight.id,
                in_out,
                transposed,
            },
        );
        let out = if x_dtype == work {
            // The product is written into the output itself.
            let out = x.op_output(&dims, x_dtype, op);
            sim.spike(w_work.max(bias_work));
            out
        } else {
            let product = rows * k_out as u64 * work.bytes();
            sim.spike(product + w_work.max(bias_work));
            let out = x.op_output(&dims, x_dtype, op);
            sim.spike(product);
            out
        };
        sim.free_temporary(held);
        out
    }

    /// A custom op of one input with an output shaped like it.
    pub(crate) fn custom1(&self, custom: Custom, out_dims: &[usize]) -> T {
        self.op_output(out_dims, self.dtype(), Op::Custom1(self.id, custom))
    }

    /// A custom op whose op struct also holds `extra` bytes for as long as the node
    /// lives (the softmax's copy of its mask).
    pub(crate) fn custom1_keeping(&self, custom: Custom, out_dims: &[usize], extra: u64) -> T {
        let out = self.custom1(custom, out_dims);
        let mut inner = self.sim.borrow_mut();
        let node = inner.nodes[out.id].as_mut().expect("live node");
        node.overhead += extra;
        let category = node.category;
        inner.account(category, extra);
        drop(inner);
        out
    }

    /// `ops::Recomputed::apply1/apply3`: the block's forward runs on detached copies of
    /// the (contiguous) inputs, its output is copied into the op's result, and the
    /// graph keeps the inputs and the result only.
    pub(crate) fn recomputed(inputs: &[&T], block: SimBlock) -> T {
        let inputs: Vec<T> = inputs.iter().map(|x| x.contiguous()).collect();
        let sim = inputs[0].sim();
        let copies: Vec<T> = inputs
            .iter()
            .map(|x| sim.tensor(&x.dims(), x.dtype()))
            .collect();
        let out = (block.forward)(&copies);
        let result = if inputs.iter().any(T::tracks) {
            let ids = inputs.iter().map(|x| x.id).collect();
            inputs[0].op_output(
                &out.dims(),
                out.dtype(),
                Op::Recomputed(ids, Rc::new(block)),
            )
        } else {
            // No graph: the op is not recorded (and the block is dropped here, outside
            // the simulation's borrow).
            sim.tensor(&out.dims(), out.dtype())
        };
        drop(out);
        drop(copies);
        result
    }

    /// A custom op of two inputs with an output shaped like the first.
    pub(crate) fn custom2(&self, b: &T, custom: Custom) -> T {
        self.op_output(
            &self.dims(),
            self.dtype(),
            Op::Custom2(self.id, b.id, custom),
        )
    }

    /// A custom op of three inputs with an output shaped like the first.
    pub(crate) fn custom3(&self, b: &T, c: &T, custom: Custom) -> T {
        self.op_output(
            &self.dims(),
            self.dtype(),
            Op::Custom3(self.id, b.id, c.id, custom),
        )
    }

    /// Rows of `self` along `dim` picked by `ids` (a 1-d index tensor).
    pub(crate) fn index_select(&self, ids: &T, dim: usize) -> T {
        let mut dims = self.dims();
        dims[dim] = ids.elem_count();
        self.op_output(&dims, self.dtype(), Op::IndexSelect(self.id, ids.id, dim))
    }

    /// `self` with `src`'s rows added at `ids` along `dim`.
    pub(crate) fn index_add(&self, ids: &T, src: &T, dim: usize) -> T {
        self.op_output(
            &self.dims(),
            self.dtype(),
            Op::IndexAdd(self.id, ids.id, src.id, dim),
        )
    }

    /// Concatenation along `dim`.
    pub(crate) fn cat(parts: &[&T], dim: usize) -> T {
        let mut dims = parts[0].dims();
        dims[dim] = parts.iter().map(|p| p.dims()[dim]).sum();
        parts[0].op_output(
            &dims,
            parts[0].dtype(),
            Op::Cat(parts.iter().map(|p| p.id).collect(), dim),
        )
    }

    /// candle's CPU `conv2d` (stride and dilation 1) with its tiled im2col scratch:
    /// an NHWC copy of the input, the flattened kernel, and per running thread one
    /// im2col tile and its product.
    pub(crate) fn conv2d(&self, kernel: &T, params: ConvParams) -> T {
        let (b, c_in, h, w) = dims4(&self.dims());
        let (c_out, _, kh, kw) = dims4(&kernel.dims());
        let (oh, ow) = (
            h + 2 * params.padding + 1 - kh,
            w + 2 * params.padding + 1 - kw,
        );
        let bytes = self.dtype().bytes();
        let out = self.op_output(
            &[b, c_out, oh, ow],
            self.dtype(),
            Op::Conv2d(self.id, kernel.id, params),
        );
        let k_size = (c_in * kh * kw) as u64;
        let tile = (oh * ow).min(512) as u64;
        let tiles = self
            .sim()
            .threads()
            .min((b * (oh * ow).div_ceil(512)) as u64);
        let scratch = (b * c_in * h * w) as u64 * bytes
            + c_out as u64 * k_size * bytes
            + tiles * ((k_size + c_out as u64) * tile * bytes + 16 * tile);
        self.sim().spike(scratch);
        out
    }

    /// candle's CPU `conv_transpose2d` (stride and dilation 1): the output and an
    /// input copy.
    pub(crate) fn conv_transpose2d(&self, kernel: &T, params: ConvParams) -> T {
        let (b, c_in, h, w) = dims4(&self.dims());
        let (_, c_out, kh, kw) = dims4(&kernel.dims());
        let (oh, ow) = (
            h + kh - 1 - 2 * params.padding,
            w + kw - 1 - 2 * params.padding,
        );
        let out = self.op_output(
            &[b, c_out, oh, ow],
            self.dtype(),
            Op::ConvTranspose2d(self.id, kernel.id, params),
        );
        self.sim()
            .spike((b * c_in * h * w) as u64 * self.dtype().bytes());
        out
    }
}

pub(crate) fn dims4(d: &[usize]) -> (usize, usize, usize, usize) {
    (d[0], d[1], d[2], d[3])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(sim: &Sim) -> u64 {
        sim.live()
    }

    #[test]
    fn views_share_storage_and_graphs_keep_inputs() {
        let sim = Sim::new(1);
        let base = data(&sim);
        let x = sim.variable(&[4, 8], DType::F32);
        let after_x = data(&sim);
        let o = CANDLE_OVERHEADS;
        assert_eq!(after_x - base, 128 + o.fresh + 2 * o.fresh_per_dim);
        let v = x.t();
        // A view costs only its node (with an op: x tracks).
        assert_eq!(data(&sim) - after_x, o.view + 2 * o.view_per_dim);
        assert!(!v.is_contiguous());
        let c = v.contiguous();
        drop(v);
        // The copy's op keeps the transpose alive.
        let y = c.sqr_for_test();
        drop(c);
        let with_y = data(&sim);
        drop(y);
        assert!(data(&sim) < with_y);
        drop(x);
        assert_eq!(data(&sim), base);
    }

    #[test]
    fn untracked_ops_do_not_keep_inputs() {
        let sim = Sim::new(1);
        let a = sim.tensor(&[10], DType::F32);
        let _b = a.affine(2.0);
        let with_both = sim.live();
        drop(a);
        // `b` does not track, so `a` is freed.
        assert!(sim.live() < with_both);
        let (peak, _) = sim.peak();
        assert_eq!(peak, with_both);
    }

    impl T {
        fn sqr_for_test(&self) -> T {
            self.unary(Un::Sqr)
        }
    }
}
