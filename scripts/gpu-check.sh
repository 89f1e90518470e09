#!/usr/bin/env bash
# The device check: what a GPU machine verifies of melora's CUDA build, in one go
# and in a few minutes, with a binary built beforehand (the GPU machine may have no
# Rust toolchain and no network). Build it where cargo is:
#
#   eval "$(scripts/setup-cuda.sh)"          # CUDA_COMPUTE_CAP=90 for H100/H200
#   cargo build --release --features cuda
#   mkdir -p gpu-check && cp target/release/melora gpu-check/
#   # optional, for the fixture tests on the device: the library's test binary
#   # (the path `cargo test` prints as "Executable unittests src/lib.rs") and the
#   # fixtures. Stripped, the CUDA binary is still about 61 MiB (candle's kernels
#   # as PTX), so compress both to carry them (64 MiB per device call): the
#   # script unpacks gpu-check/NAME.gz where gpu-check/NAME is missing
#   cargo test --release --features cuda --lib --no-run
#   cp target/release/deps/melora-<hash> gpu-check/melora-tests
#   cp -r ../shared/fixtures gpu-check/fixtures
#   strip gpu-check/melora gpu-check/melora-tests
#   gzip gpu-check/melora gpu-check/melora-tests    # about 17 MiB each
#
# then, on the GPU machine, from the repository root:
#
#   scripts/gpu-check.sh [BINARY] [OUT]      # default gpu-check/melora, gpu-check/out
#
# It runs, on MELORA_GPU_CHECK_DEVICE (default cuda:0):
#   1. `melora check`: every op's first derivatives and Hessian-vector products
#      against finite differences in f64, on the device (there the ops melora
#      fuses on the CPU are their compositions of candle's ops);
#   2. a short meta-training run of exact second-order MAML on the built-in tiny
#      BERT (configs/quickstart.yml), with the device memory it logs;
#   3. the same run on the CPU, and the two runs' losses side by side (the same
#      seeded model and tasks, so they agree to f32 rounding);
#   4. with gpu-check/melora-tests and gpu-check/fixtures, the fixture tests (exact
#      MAML, FOMAML, Reptile, MELoRA, MetaSGD on the BERT, GPT-2 and Conv4 fixtures,
#      FS-CT + VIC) with their tensors on the device, to 1e-8 in f64;
#   5. with gpu-check/melora-tests, the device-memory tests: a real out-of-memory
#      error (a ballast tensor leaves less device memory than a step with whole
#      sets needs), the step redone with smaller micro-batches and the run ending
#      with the unconstrained run's parameters; and a device budget met the same way;
#   6. the planner's predictions of device memory beside the measured device peaks
#      (`melora profile --device`), for MAML on the tiny BERT and on Conv4 images,
#      each within 15%;
#   7. seconds per meta-iteration and device peaks of full-graph and recompute
#      MAML, FOMAML, Reptile and MELoRA at K = 1 and 8, f32 and bf16, on the
#      MiniLM-shaped model, for melora (`melora bench memory --device`) and, where
#      python3 has torch, transformers and peft, for PyTorch + peft
#      (bench/pytorch/meta_bench.py on the same architecture and task shape), each
#      point in its own process, the programs alternating; then the largest K of
#      exact MAML under a 16 GiB budget for both (bench/pytorch/gpu_table.py writes
#      $OUT/table/gpu-table.md). MELORA_GPU_CHECK_MODELS="minilm-shaped
#      bert-base-shaped gpt2-medium-shaped" measures all three shapes.
#
# MELORA_GPU_CHECK_DEVICE=cpu runs the same steps on the CPU (how the script
# itself is tested where no GPU is at hand).
set -euo pipefail
cd "$(dirname "$0")/.."

for packed in gpu-check/*.gz; do
    [[ -e $packed && ! -e ${packed%.gz} ]] || continue
    gunzip -k "$packed" && chmod +x "${packed%.gz}"
done
binary=${1:-gpu-check/melora}
out=${2:-gpu-check/out}
device=${MELORA_GPU_CHECK_DEVICE:-cuda:0}
iterations=${MELORA_GPU_CHECK_ITERATIONS:-6}

if [[ ! -x $binary ]]; then
    echo "gpu-check: no melora binary at $binary; build one with --features cuda (see the top of this script)" >&2
    exit 2
fi
mkdir -p "$out"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv | tee "$out/gpu.csv"
fi

status=0
step() { echo; echo "== $*"; }

step "1. derivative checks on $device"
if "$binary" check --device "$device" --json > "$out/check.json" 2> "$out/check.err"; then
    echo "all passed"
else
    status=1
    echo "FAILED (see $out/check.json, $out/check.err)"
fi
python3 - "$out/check.json" <<'EOF' || true
import json, sys
try:
    report = json.load(open(sys.argv[1]))
except Exception as e:
    sys.exit(f"no readable report: {e}")
print(f"device {report.get('device')}: {report['passed']} passed, {report['failed']} failed in {report['seconds']:.1f} s")
for op in report["ops"]:
    if not op["passed"]:
        print(f"  FAILED {op['name']}: first order {op['first_order']:.1e}, second order {op['second_order']:.1e}")
EOF

runs=("$device")
[[ $device != cpu ]] && runs+=(cpu)
for where in "${runs[@]}"; do
    step "2. $iterations meta-iterations of MAML on tiny-bert, $where"
    name=train-${where//:/-}
    if "$binary" train --config configs/quickstart.yml --device "$where" \
        --num-iterations "$iterations" --output "$out/$name" > "$out/$name.log" 2>&1; then
        echo "ok ($out/$name.log)"
    else
        status=1
        echo "FAILED:"; tail -n 5 "$out/$name.log"
    fi
done

step "3. the two runs side by side (query loss per iteration; device memory on the GPU)"
python3 - "$out" "train-${device//:/-}" <<'EOF' || status=1
import json, pathlib, sys
out, gpu = pathlib.Path(sys.argv[1]), sys.argv[2]
def steps(name):
    files = list((out / name).glob("*/*/metrics.jsonl"))
    if not files:
        sys.exit(f"no metrics.jsonl under {out / name}")
    return [json.loads(line) for line in files[0].read_text().splitlines()]
gpu_steps, cpu_steps = steps(gpu), steps("train-cpu")
worst = 0.0
print(f"{'step':>4} {'loss here':>12} {'loss on cpu':>12} {'device peak':>14}")
for g, c in zip(gpu_steps, cpu_steps):
    a, b = g["train/query_loss"], c["train/query_loss"]
    worst = max(worst, abs(a - b) / max(abs(b), 1e-12))
    peak = g.get("memory/device_peak_bytes")
    peak = f"{peak / 2**20:.1f} MiB" if peak is not None else "-"
    print(f"{g['step']:>4} {a:>12.6f} {b:>12.6f} {peak:>14}")
print(f"largest relative difference of the losses: {worst:.1e}")
if worst > 1e-3:
    sys.exit("the runs disagree by more than f32 rounding explains")
EOF

tests=${MELORA_GPU_CHECK_TESTS:-gpu-check/melora-tests}
fixtures=${MELORA_GPU_CHECK_FIXTURES:-gpu-check/fixtures}
step "4. fixture tests with their tensors on $device"
if [[ -x $tests && -d $fixtures ]]; then
    if MELORA_TEST_DEVICE=$device MELORA_REQUIRE_SHARED=1 MELORA_FIXTURES=$fixtures \
        "$tests" fixture > "$out/fixtures.log" 2>&1; then
        grep "test result" "$out/fixtures.log"
    else
        status=1
        echo "FAILED:"; grep -E "panicked|FAILED|test result" "$out/fixtures.log" | head -n 20
    fi
else
    echo "skipped: no test binary at $tests or no fixtures at $fixtures (see the top of this script)"
fi

step "5. device-memory tests on $device: a provoked out-of-memory error, a device budget"
if [[ -x $tests ]]; then
    if MELORA_TEST_DEVICE=$device "$tests" on_the_device --nocapture > "$out/device-memory.log" 2>&1; then
        grep -E "device peaks|test result" "$out/device-memory.log"
    else
        status=1
        echo "FAILED:"; grep -E "panicked|FAILED|test result" "$out/device-memory.log" | head -n 20
    fi
else
    echo "skipped: no test binary at $tests (see the top of this script)"
fi

step "6. the planner's predictions beside the measured peaks on $device"
for config in configs/quickstart.yml configs/conv4-images-maml.yml; do
    name=profile-$(basename "$config" .yml)
    if "$binary" profile --config "$config" --device "$device" --iterations 3 --json \
        > "$out/$name.json" 2> "$out/$name.err"; then
        python3 - "$out/$name.json" "$config" <<'EOF' || status=1
import json, sys
p = json.load(open(sys.argv[1]))
plan, measured = p["plan"], p["measured_peak_bytes"]
error = p["relative_error"]
print(f"{sys.argv[2]} ({plan['method']}, memory of {plan['device']}): predicted "
      f"{plan['peak_bytes'] / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB, "
      f"error {100 * error:+.1f}%, {p['median_seconds']:.3f} s per meta-iteration")
if abs(error) > 0.15:
    sys.exit("the prediction is more than 15% off")
EOF
    else
        status=1
        echo "FAILED:"; tail -n 5 "$out/$name.err"
    fi
done

step "7. seconds and device memory per meta-iteration on $device, melora against PyTorch + peft"
# Each point in its own process. MELORA_GPU_CHECK_MODELS adds bert-base-shaped and
# gpt2-medium-shaped (longer: their random weights are made on the device too).
models=${MELORA_GPU_CHECK_MODELS:-minilm-shaped}
python=${MELORA_GPU_CHECK_PYTHON:-python3}
if "$python" -c "import torch, transformers, peft" >/dev/null 2>&1; then
    # bench/pytorch/gpu_table.py alternates `melora bench memory --device` and
    # bench/pytorch/meta_bench.py point by point, then searches the largest K under
    # a 16 GiB budget for exact MAML (both modes) and writes gpu-table.md.
    if "$python" bench/pytorch/gpu_table.py --melora "$binary" --python "$python" \
        --device "$device" --models "${models// /,}" --k 1,8 --precision f32,bf16 \
        --methods maml-full_graph,maml,fomaml,reptile,melora-diagonal \
        --fit-methods "${MELORA_GPU_CHECK_FIT_METHODS:-maml-full_graph,maml}" \
        --fit-k-max "${MELORA_GPU_CHECK_FIT_K_MAX:-64}" --budget 16GiB \
        --iterations 3 --out "$out/table" > "$out/table.log" 2>&1; then
        sed -n '/^| method/,$p' "$out/table/gpu-table.md"
    else
        status=1
        echo "FAILED:"; tail -n 15 "$out/table.log"
    fi
else
    echo "no PyTorch with transformers and peft in $python: melora's side only"
    for model in $models; do
        if "$binary" bench memory --device "$device" --model "$model" \
            --methods maml-full_graph,maml,fomaml,reptile,melora-diagonal --k 1,8 \
            --checkpointing off --precision f32,bf16 --iterations 3 \
            --output "$out/bench-$model" > "$out/bench-$model.log" 2>&1; then
            sed -n '/^| method/,/^$/p' "$out/bench-$model/memory.md" | head -n 30
        else
            status=1
            echo "FAILED ($model):"; tail -n 5 "$out/bench-$model.log"
        fi
    done
fi

echo
if [[ $status == 0 ]]; then echo "gpu-check: passed"; else echo "gpu-check: FAILED"; fi
exit "$status"
