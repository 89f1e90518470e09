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

Usage: python meta_bench.py --model-dir DIR --episodes FILE --method fomaml --k 1
       [--initial-adapter DIR] [--threads 2] [--iterations 5] [--warmup 1]
       [--json OUT]
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


class Learner:
    """The functional model: frozen base (peft-wrapped) + trainable dict θ."""

    def __init__(self, model_dir, n_way, rank, alpha, targets):
        from transformers import AutoModel
        from peft import LoraConfig, get_peft_model

        base = AutoModel.from_pretrained(model_dir, attn_implementation="eager")
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets,
                            lora_dropout=0.0, bias="none")
        self.model = get_peft_model(base, config)
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        width = base.config.hidden_size
        self.theta0 = {
            name: p.detach().clone()
            for name, p in self.model.named_parameters()
            if "lora_" in name
        }
        self.theta0["head.weight"] = torch.zeros(n_way, width)
        self.theta0["head.bias"] = torch.zeros(n_way)
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
        out = functional_call(
            self.model, lora, args=(),
            kwargs={"input_ids": batch["input_ids"],
                    "attention_mask": batch["attention_mask"]},
            strict=False,
        ).last_hidden_state
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
    probes = [torch.randint(0, 2, p.shape, generator=generator).to(p.dtype) * 2 - 1
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--episodes", required=True)
    parser.add_argument("--method", required=True, choices=METHODS)
    parser.add_argument("--k", type=int, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--inner-lr", type=float, default=0.01)
    parser.add_argument("--initial-adapter")
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.k < 1 or args.iterations < 1 or args.warmup < 0:
        sys.exit("--k and --iterations must be at least 1, --warmup at least 0")

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data, meta_batches = read_episodes(args.episodes)
    needed = args.warmup + args.iterations
    if len(meta_batches) < needed:
        sys.exit(f"{args.episodes} holds {len(meta_batches)} meta-batches; "
                 f"{needed} are needed (write more with `melora bench episodes`)")
    learner = Learner(args.model_dir, data["n_way"], data["lora_rank"],
                      data["lora_alpha"], data["lora_targets"])
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
                                    args.inner_lr, generator)
            total = g if total is None else [a + b for a, b in zip(total, g)]
            query_loss += loss
        params = list(learner.theta0.values())
        for p, g in zip(params, total):
            p.grad = g / len(meta_batch)
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimiser.step()
        optimiser.zero_grad(set_to_none=True)
        return {"query_loss": query_loss / len(meta_batch),
                "meta_gradient_norm": float(norm)}

    rss_after_load = resident_bytes("VmRSS")
    reset_peak_resident()
    first_step = None
    for index in range(args.warmup):
        stats = iteration(meta_batches[index])
        first_step = first_step or stats
    seconds, tokens = [], []
    for index in range(args.warmup, needed):
        started = time.perf_counter()
        stats = iteration(meta_batches[index])
        seconds.append(time.perf_counter() - started)
        first_step = first_step or stats
        tokens.append(sum(s["tokens"] + q["tokens"] for s, q in meta_batches[index]))
    peak = resident_bytes("VmHWM")
    share = matmul_share(lambda: iteration(meta_batches[args.warmup]))
    per_iteration = statistics.median(seconds)
    result = {
        "tool": "pytorch",
        "versions": {"torch": torch.__version__,
                     "transformers": __import__("transformers").__version__,
                     "peft": __import__("peft").__version__},
        "method": args.method,
        "k": args.k,
        "threads": torch.get_num_threads(),
        "seconds": seconds,
        "seconds_per_iteration": per_iteration,
        "tokens_per_second": statistics.median(t / s for t, s in zip(tokens, seconds)),
        "rss_after_load_bytes": rss_after_load,
        "peak_rss_bytes": peak,
        "peak_increment_bytes": max(0, peak - rss_after_load),
        "matmul_share": share,
        "first_step": first_step,
    }
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            f.write(json.dumps(result, indent=2) + "\n")
        os.replace(args.json + ".tmp", args.json)
    # One line: `melora bench speed` reads the last line of standard output.
    print(json.dumps(result))
    if not all(math.isfinite(s) for s in seconds):
        sys.exit("non-finite timing")


if __name__ == "__main__":
    main()
