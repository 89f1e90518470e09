"""melora against PyTorch + peft on a GPU: the table of issue 21.

For each built-in random-weight model shape (`minilm-shaped`, `bert-base-shaped`,
`gpt2-medium-shaped`), each method, inner steps K and precision, it measures one
meta-iteration's seconds and peak device memory with both programs, each point in
its own process, the two programs alternating:

- melora: `melora bench memory --device D --model M` for that one point (added to
  DIR/melora-M/memory.json with `--resume`); its figure is the CUDA memory pool's
  peak over the timed iterations, the model's weights included;
- PyTorch: `meta_bench.py --shape-of DIR/melora-M/memory.json --device D`, the same
  architecture with seeded random weights, the same LoRA settings and task shape
  (5-way 5-shot 5-query, 32 tokens, meta-batch 4); its figure is
  `torch.cuda.max_memory_allocated` over the timed iterations, weights included.

melora's `maml-full_graph` (the inner graph kept, as PyTorch's `create_graph=True`
keeps it) and `maml` (recompute: Hessian-vector products instead of the kept graph)
are both compared with PyTorch's one exact MAML.

Then, with `--budget` (default 16GiB), the largest K that fits: for each method of
`--fit-methods`, K doubles from 1 up to `--fit-k-max` (one timed iteration per point,
f32) until the measured peak passes the budget or the device runs out of memory.
Tasks of a meta-batch run one after another in both programs (each task's
meta-gradient is added up and its graph freed), so the peak does not grow with the
meta-batch: the largest meta-batch is not bounded by memory, which the table says.

Writes DIR/gpu-table.json and DIR/gpu-table.md (default DIR: gpu-check/out/table).

Usage (on the GPU machine, from the repository root; scripts/gpu-check.sh runs it):

    python3 bench/pytorch/gpu_table.py --melora gpu-check/melora --device cuda:0 \\
        [--models minilm-shaped,bert-base-shaped,gpt2-medium-shaped] \\
        [--methods maml-full_graph,maml,fomaml,reptile,melora-diagonal] [--k 1,8] \\
        [--precision f32,bf16] [--iterations 3] [--budget 16GiB] [--out DIR]

`--device cpu` runs the same on the CPU (how the script is tested without a GPU);
there PyTorch's figure is its peak resident set and melora's its heap peak, which
do not compare.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
META_BENCH = os.path.join(HERE, "meta_bench.py")

# melora's variants (as `bench memory --methods` names them) and meta_bench.py's
# method for each.
PYTORCH_METHOD = {
    "maml-full_graph": "maml",
    "maml": "maml",
    "fomaml": "fomaml",
    "reptile": "reptile",
    "melora-diagonal": "melora-diagonal",
    "melora-gauss_newton": "melora-gauss_newton",
}
LABEL = {
    "maml-full_graph": "MAML (full graph)",
    "maml": "MAML (recompute)",
    "fomaml": "FOMAML",
    "reptile": "Reptile",
    "melora-diagonal": "MELoRA (diagonal)",
    "melora-gauss_newton": "MELoRA (Gauss-Newton)",
}
UNITS = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3,
         "mb": 10**6, "gb": 10**9}


def parse_bytes(text):
    match = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in UNITS:
        raise argparse.ArgumentTypeError(f"`{text}` is not a size such as 16GiB")
    return int(float(match.group(1)) * UNITS[match.group(2).lower()])


def listed(text):
    return [item for item in text.split(",") if item]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--melora", required=True, help="the melora binary (built with --features cuda)")
    parser.add_argument("--python", default=sys.executable, help="Python with torch, transformers, peft")
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--models", type=listed, default=["minilm-shaped"])
    parser.add_argument("--methods", type=listed,
                        default=["maml-full_graph", "maml", "fomaml", "reptile", "melora-diagonal"])
    parser.add_argument("--k", type=lambda t: [int(k) for k in listed(t)], default=[1, 8])
    parser.add_argument("--precision", type=listed, default=["f32", "bf16"])
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--budget", type=parse_bytes, default=parse_bytes("16GiB"),
                        help="memory budget of the largest-K search; 0 skips the search")
    parser.add_argument("--fit-methods", type=listed, default=["maml-full_graph", "maml", "fomaml"])
    parser.add_argument("--fit-k-max", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=600, help="seconds per point")
    parser.add_argument("--out", default="gpu-check/out/table")
    args = parser.parse_args()
    for method in args.methods + args.fit_methods:
        if method not in PYTORCH_METHOD:
            parser.error(f"--methods: `{method}` has no PyTorch counterpart; "
                         f"choose from {', '.join(PYTORCH_METHOD)}")
    for precision in args.precision:
        if precision not in ("f32", "bf16"):
            parser.error(f"--precision: `{precision}` is not f32 or bf16")
    if not os.access(args.melora, os.X_OK):
        parser.error(f"--melora {args.melora}: not an executable melora binary")
    if args.iterations < 1 or min(args.k) < 1 or args.fit_k_max < 1:
        parser.error("--iterations, --k and --fit-k-max must be at least 1")
    return args


def run(command, timeout):
    """Runs one point; returns (exit status, standard output, standard error)."""
    started = time.monotonic()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, "", f"timed out after {timeout:.0f} s"
    print(f"  {time.monotonic() - started:6.1f} s  {' '.join(os.path.basename(c) if i == 0 else c for i, c in enumerate(command))}",
          flush=True)
    return done.returncode, done.stdout, done.stderr


def melora_point(args, folder, model, variant, k, precision, iterations):
    """One point of `melora bench memory`, added to folder/memory.json; its row."""
    command = [args.melora, "bench", "memory", "--device", args.device, "--model", model,
               "--methods", variant, "--k", str(k), "--checkpointing", "off",
               "--precision", precision, "--iterations", str(iterations),
               "--output", folder]
    if os.path.isfile(os.path.join(folder, "memory.json")):
        command.append("--resume")
    status, _, stderr = run(command, args.timeout)
    path = os.path.join(folder, "memory.json")
    if not os.path.isfile(path):
        return {"error": f"melora wrote no memory.json (status {status}): {stderr.strip()[-300:]}"}
    with open(path) as f:
        bench = json.load(f)
    for row in bench["rows"]:
        if (row["variant"] == variant and row["k"] == k and row["precision"] == precision
                and not row["checkpointing"]):
            return row
    return {"error": f"no row for the point in {path} (status {status}): {stderr.strip()[-300:]}"}


def pytorch_point(args, shape_of, method, k, precision, iterations, json_path):
    """One point of meta_bench.py; its result (with `error` when it failed)."""
    command = [args.python, META_BENCH, "--shape-of", shape_of, "--device", args.device,
               "--method", method, "--k", str(k), "--precision", precision,
               "--iterations", str(iterations), "--json", json_path]
    status, stdout, stderr = run(command, args.timeout)
    lines = stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        result = None
    if result is None:
        return {"error": f"meta_bench.py printed no result (status {status}): {stderr.strip()[-300:]}"}
    return result


def pytorch_peak(result):
    return result.get("peak_device_bytes", result.get("peak_rss_bytes"))


def measure_table(args, model, folder):
    """The alternating grid for one model: a list of row dicts."""
    rows, pytorch_done = [], {}
    os.makedirs(os.path.join(args.out, f"pytorch-{model}"), exist_ok=True)
    for precision in args.precision:
        for k in args.k:
            for variant in args.methods:
                print(f"{model}: {LABEL[variant]}, K={k}, {precision}", flush=True)
                ours = melora_point(args, folder, model, variant, k, precision, args.iterations)
                shape_of = os.path.join(folder, "memory.json")
                method = PYTORCH_METHOD[variant]
                key = (method, k, precision)
                if key not in pytorch_done and os.path.isfile(shape_of):
                    json_path = os.path.join(args.out, f"pytorch-{model}",
                                             f"{method}-k{k}-{precision}.json")
                    pytorch_done[key] = pytorch_point(args, shape_of, method, k, precision,
                                                      args.iterations, json_path)
                theirs = pytorch_done.get(key, {"error": "melora's point wrote no memory.json"})
                rows.append({"model": model, "variant": variant, "k": k, "precision": precision,
                             "melora": ours, "pytorch": theirs})
    return rows


def largest_k(args, model, folder):
    """For each fit method: the largest K whose f32 peak stays under the budget, for
    each program, with the peaks seen on the way."""
    fits = []
    precision = "f32"
    fit_folder = os.path.join(args.out, f"fit-melora-{model}")
    json_folder = os.path.join(args.out, f"fit-pytorch-{model}")
    os.makedirs(json_folder, exist_ok=True)
    shape_of = os.path.join(folder, "memory.json")
    for variant in args.fit_methods:
        entry = {"model": model, "variant": variant, "melora": {}, "pytorch": {}}
        for program in ("melora", "pytorch"):
            best, peaks, stopped = None, {}, None
            k = 1
            while k <= args.fit_k_max:
                print(f"{model}: largest K under the budget, {program}, {LABEL[variant]}, K={k}",
                      flush=True)
                if program == "melora":
                    row = melora_point(args, fit_folder, model, variant, k, precision, 1)
                    peak, error = row.get("peak_bytes"), row.get("error")
                else:
                    method = PYTORCH_METHOD[variant]
                    result = pytorch_point(args, shape_of, method, k, precision, 1,
                                           os.path.join(json_folder, f"{method}-k{k}.json"))
                    peak = pytorch_peak(result)
                    error = "out of memory" if result.get("out_of_memory") else result.get("error")
                if error or peak is None:
                    stopped = error or "no peak measured"
                    break
                peaks[k] = peak
                if peak > args.budget:
                    stopped = f"K={k} peaks at {peak / 2**30:.2f} GiB"
                    break
                best = k
                k *= 2
            if stopped is None:
                stopped = f"--fit-k-max {args.fit_k_max} reached"
            entry[program] = {"largest_k": best, "peaks": peaks, "stopped": stopped}
        fits.append(entry)
    return fits


def one_line(text, limit=80):
    text = " ".join(str(text or "?").split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def gib(value):
    return "–" if value is None else f"{value / 2**30:.2f} GiB" if value >= 2**30 \
        else f"{value / 2**20:.0f} MiB"


def ratio(a, b):
    return "–" if a is None or b in (None, 0) else f"{a / b:.2f}"


def markdown(report):
    lines = [f"# melora against PyTorch + peft on {report['gpu'] or report['device']}", "",
             f"Device `{report['device']}`; PyTorch {report['versions'].get('torch', '?')}, "
             f"transformers {report['versions'].get('transformers', '?')}, "
             f"peft {report['versions'].get('peft', '?')}; {report['date']}. "
             "Each point in its own process, the programs alternating. Seconds: median "
             f"of {report['iterations']} timed meta-iterations after one warm-up. Memory: "
             "the peak of the device memory over the timed iterations, weights included "
             "(melora: its CUDA pool's high-water mark; PyTorch: "
             "`torch.cuda.max_memory_allocated`). PyTorch's MAML keeps the inner graph "
             "(`create_graph=True`); both melora rows compare with it.", ""]
    for model, description in report["models"].items():
        lines += [f"## {model}", "", description, "",
                  "| method | K | precision | melora s/iter | PyTorch s/iter | melora ÷ PyTorch (time) "
                  "| melora peak | PyTorch peak | melora ÷ PyTorch (memory) |",
                  "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
        for row in report["rows"]:
            if row["model"] != model:
                continue
            ours, theirs = row["melora"], row["pytorch"]
            ours_s, theirs_s = ours.get("seconds_per_iter"), theirs.get("seconds_per_iteration")
            ours_b, theirs_b = ours.get("peak_bytes"), pytorch_peak(theirs)
            if theirs.get("out_of_memory"):
                theirs_s, theirs_b = None, None
            cells = [LABEL[row["variant"]], str(row["k"]), row["precision"],
                     f"{ours_s:.3f}" if ours_s else f"failed: {one_line(ours.get('error'))}",
                     "out of memory" if theirs.get("out_of_memory")
                     else f"{theirs_s:.3f}" if theirs_s else f"failed: {one_line(theirs.get('error'))}",
                     ratio(ours_s, theirs_s), gib(ours_b), gib(theirs_b), ratio(ours_b, theirs_b)]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        fits = [f for f in report["fits"] if f["model"] == model]
        if fits:
            lines += [f"Largest K under {gib(report['budget'])} (f32, one task's meta-step; "
                      "the meta-batch does not raise the peak in either program, so it is not "
                      "bounded by memory):", "",
                      "| method | melora | PyTorch |", "|---|---|---|"]
            for fit in fits:
                cells = []
                for program in ("melora", "pytorch"):
                    f = fit[program]
                    top = f["largest_k"]
                    cells.append(f"{'none' if top is None else top} ({one_line(f['stopped'])})")
                lines.append(f"| {LABEL[fit['variant']]} | {cells[0]} | {cells[1]} |")
            lines.append("")
    return "\n".join(lines)


def main():
    args = parse_args()
    os.makedirs(args.out, exist_ok=True)
    report = {"device": args.device, "gpu": None, "versions": {}, "iterations": args.iterations,
              "budget": args.budget, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "models": {}, "rows": [], "fits": []}
    for model in args.models:
        folder = os.path.join(args.out, f"melora-{model}")
        report["rows"] += measure_table(args, model, folder)
        path = os.path.join(folder, "memory.json")
        if os.path.isfile(path):
            with open(path) as f:
                info = json.load(f)["model"]
            report["models"][model] = (
                f"{info.get('family')} {json.dumps(info.get('architecture'))}; LoRA r="
                f"{info['lora_rank']} on {', '.join(info.get('lora_targets') or [])} + head; "
                f"{info['n_way']}-way {info['k_shot']}-shot {info['n_query']}-query, "
                f"{info['sequence_length']} tokens, meta-batch {info['meta_batch_size']}")
        else:
            report["models"][model] = "(melora measured nothing)"
        if args.budget > 0:
            report["fits"] += largest_k(args, model, folder)
    for row in report["rows"]:
        theirs = row["pytorch"]
        report["versions"] = report["versions"] or theirs.get("versions", {})
        report["gpu"] = report["gpu"] or theirs.get("gpu")
    json_path = os.path.join(args.out, "gpu-table.json")
    with open(json_path + ".tmp", "w") as f:
        json.dump(report, f, indent=2)
    os.replace(json_path + ".tmp", json_path)
    md_path = os.path.join(args.out, "gpu-table.md")
    with open(md_path + ".tmp", "w") as f:
        f.write(markdown(report) + "\n")
    os.replace(md_path + ".tmp", md_path)
    print(markdown(report))
    print(f"written: {json_path}, {md_path}")
    failed = [r for r in report["rows"]
              if r["melora"].get("error")
              or (r["pytorch"].get("error") and not r["pytorch"].get("out_of_memory"))]
    if failed:
        sys.exit(f"{len(failed)} point(s) failed; see {json_path}")


if __name__ == "__main__":
    main()
