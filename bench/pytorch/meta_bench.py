"""The PyTorch + peft side of `melora bench speed`: the same learners on the same
model and the same episodes, timed and measured as a PyTorch user would write them.

One point per process (a method and a number of inner steps K), so that peak memory
is the point's own. The episodes come from `melora bench episodes` (a JSON file of
meta-batches of token ids); every batch is padded on the right to its longest
sequence, as melora does.

What is computed, per task, with the trainable parameters θ (LoRA A/B on the
configured modules and a zero-initialised linear head on masked mean pooling):

- fomaml: K SGD steps on the support loss, then ∇θ_K of the query loss.
- reptile: the same K steps; θ₀ − θ_K (the query loss only reported, without grad).
- maml: the K steps with `create_graph=True` (exact second order through
  `torch.func.functional_call`), then the query loss back-propagated to θ₀.
- melora-diagonal: first-order steps storing θ₀…θ_{K-1}, then g ← g − α·diag(H)·g
  backwards over the steps, diag(H) estimated by Hutchinson with one Rademacher probe
  (a double backward per step).
- melora-gauss_newton: the same recursion with the generalised Gauss-Newton product
  Jᵀ·H_ℓ·J·g (J·g by the double-backward trick: two backwards and one double
  backward per step).

The meta-gradients of the meta-batch are averaged, clipped to norm 1 and applied by
AdamW (lr 1e-3), as melora's defaults do. Seconds per meta-iteration are the median
of the timed iterations after the warm-ups; memory is the peak resident set of the
warm-up and timed iterations above the resident set after loading the model
(/proc/self/clear_refs resets the peak there).

With --initial-adapter (a PEFT adapter folder melora wrote: LoRA tensors and the
head as `base_model.model.classifier.*`) θ starts from melora's parameters, so that
the first meta-iteration's mean query loss and meta-gradient norm (reported as
`first_step`) can be compared with melora's. After the timed iterations one more
runs under torch.profiler: `matmul_share` is the own CPU time of the matrix-product
ops over that iteration's wall time.

On a GPU (`--device cuda`, what `bench/pytorch/gpu_table.py` runs beside
`melora bench memory --device cuda`), the model can instead be one of melora's
built-in random-weight shapes: `--shape-of MEMORY_JSON` reads the model, LoRA
settings and task shape that melora's benchmark recorded (`model` in its
memory.json), builds the same architecture with seeded random weights
(`AutoModel.from_config`), and feeds synthetic tasks of the same shape: every
sequence `sequence_length` tokens, ids below 1000, as melora's benchmark does.
There, peak memory is the device's: `torch.cuda.max_memory_allocated` over the
timed iterations (the peak is reset after the warm-up), which counts the model's
weights, as melora's pool peak does; `--precision bf16` stores the frozen base in
bf16 and runs the forward passes under `torch.autocast` in bf16, with LoRA and
the head kept in f32 (melora's bf16: frozen weights and activations in bf16, f32
trainable parameters). Attention is the eager implementation for the methods that
differentiate twice (MAML, MELoRA: PyTorch's fused attention kernels have no
double backward) and, on a GPU, PyTorch's fused `sdpa` for FOMAML and Reptile, the
fastest each method can use; `--attention` overrides it. An out-of-memory error
is reported as `{"out_of_memory": true, ...}` on the last line, exit status 3.

Usage: python meta_bench.py --model-dir DIR --episodes FILE --method fomaml --k 1
       [--initial-adapter DIR] [--threads 2] [--iterations 5] [--warmup 1]
       [--json OUT]
       python meta_bench.py --shape-of MEMORY_JSON --device cuda --method maml --k 8
       [--precision bf16] [--iterations 3] [--json OUT]
"""

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.func import functional_call

METHODS = ("fomaml", "reptile", "maml", "melora-diagonal", "melora-gauss_newton")


def resident_bytes(field):
    """VmRSS or VmHWM of this process, in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak_resident():
    """Resets VmHWM to the current resident set (Linux ≥ 4.0)."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def read_episodes(path):
    with open(path) as f:
        data = json.load(f)
    if data.get("format") != "melora-episodes":
        sys.exit(f"{path}: not an episodes file of `melora bench episodes`")
    pad = data["pad_id"]

    def batch(examples):
        ids = examples["ids"]
        longest = max(len(s) for s in ids)
        input_ids = torch.full((len(ids), longest), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), longest), dtype=torch.long)
        for row, seq in enumerate(ids):
            input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
        labels = torch.tensor(examples["labels"], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels,
                "tokens": int(mask.sum())}

    meta_batches = [
        [(batch(task["support"]), batch(task["query"])) for task in meta_batch]
        for meta_batch in data["meta_batches"]
    ]
    return data, meta_batches


def synthetic_episodes(info, count, seed):
    """`count` meta-batches of synthetic tasks of the shape melora's benchmark used
    (`info` is the `model` of its memory.json): every sequence exactly
    `sequence_length` tokens, ids below 1000, labels 0…N−1 in class order."""
    generator = torch.Generator().manual_seed(seed)
    n_way, length = info["n_way"], info["sequence_length"]

    def batch(per_class):
        rows = n_way * per_class
        ids = torch.randint(0, 1000, (rows, length), generator=generator)
        labels = torch.arange(n_way).repeat_interleave(per_class)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "labels": labels, "tokens": rows * length}

    return [[(batch(info["k_shot"]), batch(info["n_query"]))
             for _ in range(info["meta_batch_size"])] for _ in range(count)]


def to_device(batch, device):
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def shaped_model(info, attention):
    """The architecture melora's benchmark recorded, with seeded random weights."""
    from transformers import AutoModel, BertConfig, DistilBertConfig, GPT2Config

    configs = {"bert": BertConfig, "distilbert": DistilBertConfig, "gpt2": GPT2Config}
    family = info.get("family")
    if family not in configs or not info.get("architecture"):
        sys.exit(f"--shape-of: no architecture of a supported family (bert, distilbert, "
                 f"gpt2) recorded, got family {family!r}")
    config = configs[family](**info["architecture"])
    return AutoModel.from_config(config, attn_implementation=attention)


class Learner:
    """The functional model: frozen base (peft-wrapped) + trainable dict θ."""

    def __init__(self, base, n_way, rank, alpha, targets, device="cpu", dtype=None):
        from peft import LoraConfig, get_peft_model

        family = getattr(base.config, "model_type", "")
        # GPT-2's projections are Conv1D layers (weights stored transposed).
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets,
                            lora_dropout=0.0, bias="none",
                            fan_in_fan_out=family == "gpt2")
        if dtype is not None:
            base = base.to(dtype)
        self.model = get_peft_model(base, config).to(device)
        # melora pools BERT-like encoders by the masked mean, GPT-2 by its last token.
        self.last_token = family == "gpt2"
        self.autocast = dtype
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        width = base.config.hidden_size
        self.theta0 = {
            name: p.detach().clone().float()
            for name, p in self.model.named_parameters()
            if "lora_" in name
        }
        self.theta0["head.weight"] = torch.zeros(n_way, width, device=device)
        self.theta0["head.bias"] = torch.zeros(n_way, device=device)
        for t in self.theta0.values():
            t.requires_grad_(True)

    def start_from(self, adapter_dir):
        """θ₀ from a PEFT adapter folder: every tensor of θ must be there, by name and
        shape (PEFT's saved names lack the adapter's name, `default`)."""
        from safetensors.torch import load_file

        path = os.path.join(adapter_dir, "adapter_model.safetensors")
        if not os.path.isfile(path):
            sys.exit(f"--initial-adapter {adapter_dir}: no adapter_model.safetensors there")
        saved = load_file(path)
        used = set()
        for name, tensor in self.theta0.items():
            if name.startswith("head."):
                key = "base_model.model.classifier." + name[len("head."):]
            else:
                key = name.replace(".default.", ".")
            if key not in saved or saved[key].shape != tensor.shape:
                sys.exit(f"--initial-adapter {adapter_dir}: no tensor `{key}` of shape "
                         f"{tuple(tensor.shape)} for {name}")
            with torch.no_grad():
                tensor.copy_(saved[key].to(tensor.dtype))
            used.add(key)
        unused = sorted(set(saved) - used)
        if unused:
            sys.exit(f"--initial-adapter {adapter_dir}: tensors the model does not have: "
                     f"{', '.join(unused[:3])}")

    def logits(self, theta, batch):
        lora = {k: v for k, v in theta.items() if not k.startswith("head.")}
        device_type = batch["input_ids"].device.type
        with torch.autocast(device_type, dtype=self.autocast or torch.float32,
                            enabled=self.autocast is not None):
            out = functional_call(
                self.model, lora, args=(),
                kwargs={"input_ids": batch["input_ids"],
                        "attention_mask": batch["attention_mask"]},
                strict=False,
            ).last_hidden_state
        out = out.float()
        if self.last_token:
            last = batch["attention_mask"].sum(1) - 1
            pooled = out[torch.arange(out.shape[0], device=out.device), last]
        else:
            mask = batch["attention_mask"].unsqueeze(-1).to(out.dtype)
            pooled = (out * mask).sum(1) / mask.sum(1)
        return F.linear(pooled, theta["head.weight"], theta["head.bias"])

    def loss(self, theta, batch):
        return F.cross_entropy(self.logits(theta, batch), batch["labels"])


def sgd_step(theta, grads, lr):
    return {k: theta[k] - lr * g for (k, g) in zip(theta, grads)}


def first_order_steps(learner, theta0, support, k, lr):
    """K plain SGD steps; returns θ₀…θ_K (each a leaf requiring grad)."""
    thetas = [theta0]
    theta = theta0
    for _ in range(k):
        loss = learner.loss(theta, support)
        grads = torch.autograd.grad(loss, list(theta.values()))
        theta = {n: (t - lr * g).detach().requires_grad_(True)
                 for (n, t), g in zip(theta.items(), grads)}
        thetas.append(theta)
    return thetas


def hutchinson_diagonal(learner, theta, support, generator):
    params = list(theta.values())
    grads = torch.autograd.grad(learner.loss(theta, support), params, create_graph=True)
    probes = [torch.randint(0, 2, p.shape, generator=generator).to(p.device, p.dtype) * 2 - 1
              for p in params]
    dot = sum((g * z).sum() for g, z in zip(grads, probes))
    hz = torch.autograd.grad(dot, params)
    return [z * h for z, h in zip(probes, hz)]


def gauss_newton_product(learner, theta, support, vector):
    params = list(theta.values())
    logits = learner.logits(theta, support)
    # J·v by the double-backward trick: u ↦ Jᵀu is linear in u, so d(Jᵀu·v)/du = J·v.
    u = torch.zeros_like(logits, requires_grad=True)
    jt_u = torch.autograd.grad(logits, params, u, create_graph=True)
    jv = torch.autograd.grad(jt_u, u, vector)[0]
    # The Hessian of the mean softmax cross-entropy in the logits, per example.
    p = torch.softmax(logits.detach(), dim=-1)
    h_jv = (p * jv - p * (p * jv).sum(-1, keepdim=True)) / logits.shape[0]
    return torch.autograd.grad(logits, params, h_jv)


def meta_gradient(learner, method, support, query, k, lr, generator):
    """The task's meta-gradient and its query loss after adaptation."""
    theta0 = learner.theta0
    params0 = list(theta0.values())
    if method == "maml":
        theta = theta0
        for _ in range(k):
            loss = learner.loss(theta, support)
            grads = torch.autograd.grad(loss, list(theta.values()), create_graph=True)
            theta = sgd_step(theta, grads, lr)
        query_loss = learner.loss(theta, query)
        return list(torch.autograd.grad(query_loss, params0)), query_loss.item()
    thetas = first_order_steps(learner, theta0, support, k, lr)
    adapted = thetas[-1]
    if method == "reptile":
        with torch.no_grad():
            query_loss = learner.loss(adapted, query)
        return ([(a - b).detach() for a, b in zip(params0, adapted.values())],
                query_loss.item())
    query_loss = learner.loss(adapted, query)
    g = list(torch.autograd.grad(query_loss, list(adapted.values())))
    if method == "fomaml":
        return g, query_loss.item()
    for theta_k in reversed(thetas[:-1]):
        if method == "melora-diagonal":
            diagonal = hutchinson_diagonal(learner, theta_k, support, generator)
            h = [d * gi for d, gi in zip(diagonal, g)]
        else:
            h = gauss_newton_product(learner, theta_k, support, g)
        g = [gi - lr * hi for gi, hi in zip(g, h)]
    return g, query_loss.item()


MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm",
              "aten::mv", "aten::addmv", "aten::dot", "aten::vdot",
              "aten::_addmm_activation"}


def matmul_share(run):
    """Own CPU time of the matrix-product ops over the wall time of `run()`, under
    torch.profiler (its overhead counts as other time)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        started = time.perf_counter()
        run()
        wall = time.perf_counter() - started
    own_us = sum(e.self_cpu_time_total for e in profiler.key_averages()
                 if e.key in MATMUL_OPS)
    return own_us * 1e-6 / wall


SECOND_ORDER = ("maml", "melora-diagonal", "melora-gauss_newton")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model-dir", help="a Hugging Face model folder (with --episodes)")
    source.add_argument("--shape-of", metavar="MEMORY_JSON",
                        help="melora bench memory's memory.json: its model's architecture "
                             "with random weights, on synthetic tasks of its shape")
    parser.add_argument("--episodes", help="episodes.json of `melora bench speed`")
    parser.add_argument("--method", required=True, choices=METHODS)
    parser.add_argument("--k", type=int, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--inner-lr", type=float,
                        help="default: the memory.json's with --shape-of, else 0.01")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--precision", default="f32", choices=("f32", "bf16"))
    parser.add_argument("--attention", choices=("eager", "sdpa"),
                        help="default: eager for MAML and MELoRA (double backward) and "
                             "on the CPU, sdpa for FOMAML and Reptile on a GPU")
    parser.add_argument("--initial-adapter")
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.k < 1 or args.iterations < 1 or args.warmup < 0:
        sys.exit("--k and --iterations must be at least 1, --warmup at least 0")
    if args.model_dir and not args.episodes:
        sys.exit("--model-dir needs --episodes (written by `melora bench speed`)")
    if args.episodes and args.shape_of:
        sys.exit("--shape-of makes its own synthetic tasks; drop --episodes")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit(f"--device {args.device}: this PyTorch sees no CUDA device")
    if args.attention is None:
        on_gpu = args.device.startswith("cuda")
        args.attention = "sdpa" if on_gpu and args.method not in SECOND_ORDER else "eager"
    elif args.attention == "sdpa" and args.method in SECOND_ORDER:
        sys.exit(f"--attention sdpa: {args.method} differentiates twice, and PyTorch's "
                 f"fused attention has no double backward; use --attention eager")
    return args


def write_result(args, result):
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            f.write(json.dumps(result, indent=2) + "\n")
        os.replace(args.json + ".tmp", args.json)
    # One line: `melora bench speed` and gpu_table.py read the last line of standard
    # output.
    print(json.dumps(result))


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if args.precision == "bf16" else None
    needed = args.warmup + args.iterations
    if args.shape_of:
        with open(args.shape_of) as f:
            info = json.load(f)["model"]
        meta_batches = synthetic_episodes(info, needed, info.get("seed", 0))
        base = shaped_model(info, args.attention)
        inner_lr = args.inner_lr if args.inner_lr is not None else info["inner_lr"]
        n_way, rank, alpha, targets = (info["n_way"], info["lora_rank"],
                                       info["lora_alpha"], info["lora_targets"])
    else:
        from transformers import AutoModel

        data, meta_batches = read_episodes(args.episodes)
        if len(meta_batches) < needed:
            sys.exit(f"{args.episodes} holds {len(meta_batches)} meta-batches; "
                     f"{needed} are needed (write more with `melora bench episodes`)")
        base = AutoModel.from_pretrained(args.model_dir, attn_implementation=args.attention)
        inner_lr = args.inner_lr if args.inner_lr is not None else 0.01
        n_way, rank, alpha, targets = (data["n_way"], data["lora_rank"],
                                       data["lora_alpha"], data["lora_targets"])
    meta_batches = [[(to_device(s, device), to_device(q, device)) for s, q in mb]
                    for mb in meta_batches[:needed]]
    learner = Learner(base, n_way, rank, alpha, targets, device, dtype)
    del base
    if args.initial_adapter:
        learner.start_from(args.initial_adapter)
    optimiser = torch.optim.AdamW(list(learner.theta0.values()), lr=1e-3,
                                  weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)

    def iteration(meta_batch):
        """One meta-step; returns its mean query loss and meta-gradient norm."""
        total, query_loss = None, 0.0
        for support, query in meta_batch:
            g, loss = meta_gradient(learner, args.method, support, query, args.k,
                                    inner_lr, generator)
            total = g if total is None else [a + b for a, b in zip(total, g)]
            query_loss += loss
        params = list(learner.theta0.values())
        for p, g in zip(params, total):
            p.grad = g / len(meta_batch)
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimiser.step()
        optimiser.zero_grad(set_to_none=True)
        if on_gpu:
            torch.cuda.synchronize(device)
        return {"query_loss": query_loss / len(meta_batch),
                "meta_gradient_norm": float(norm)}

    result = {
        "tool": "pytorch",
        "versions": {"torch": torch.__version__,
                     "transformers": __import__("transformers").__version__,
                     "peft": __import__("peft").__version__},
        "method": args.method,
        "k": args.k,
        "device": str(device),
        "precision": args.precision,
        "attention": args.attention,
        "threads": torch.get_num_threads(),
    }
    if on_gpu:
        result["gpu"] = torch.cuda.get_device_name(device)
    rss_after_load = resident_bytes("VmRSS")
    reset_peak_resident()
    first_step = None
    seconds, tokens = [], []
    try:
        for index in range(args.warmup):
            stats = iteration(meta_batches[index])
            first_step = first_step or stats
        if on_gpu:
            # As melora's device figure: the pool's peak over the timed iterations,
            # weights included.
            torch.cuda.reset_peak_memory_stats(device)
        for index in range(args.warmup, needed):
            started = time.perf_counter()
            stats = iteration(meta_batches[index])
            seconds.append(time.perf_counter() - started)
            first_step = first_step or stats
            tokens.append(sum(s["tokens"] + q["tokens"] for s, q in meta_batches[index]))
    except torch.OutOfMemoryError as e:
        result.update({"out_of_memory": True, "error": str(e).splitlines()[0]})
        if on_gpu:
            result["peak_device_bytes"] = torch.cuda.max_memory_allocated(device)
        write_result(args, result)
        sys.exit(3)
    peak = resident_bytes("VmHWM")
    per_iteration = statistics.median(seconds)
    result.update({
        "seconds": seconds,
        "seconds_per_iteration": per_iteration,
        "tokens_per_second": statistics.median(t / s for t, s in zip(tokens, seconds)),
        "rss_after_load_bytes": rss_after_load,
        "peak_rss_bytes": peak,
        "peak_increment_bytes": max(0, peak - rss_after_load),
        "first_step": first_step,
    })
    if on_gpu:
        result["peak_device_bytes"] = torch.cuda.max_memory_allocated(device)
        result["peak_device_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
        result["matmul_share"] = None
    else:
        result["matmul_share"] = matmul_share(lambda: iteration(meta_batches[args.warmup]))
    write_result(args, result)
    if not all(math.isfinite(s) for s in seconds):
        sys.exit("non-finite timing")


if __name__ == "__main__":
    main()
