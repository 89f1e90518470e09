#!/usr/bin/env bash
# Where one melora benchmark point's CPU time goes, by perf sampling (Debian's
# linux-perf): the share of samples in matrix products (the gemm crate's kernels
# and packing) and in the other main kinds of work, all threads together, setup
# (loading the model) included.
#
# Usage: bench/gemm-share.sh CONFIG EPISODES [ITERATIONS] [MELORA]
#   CONFIG     a configuration as `melora config` prints it (method, K, model path),
#              e.g. `melora config --config configs/wordnet-minilm.yml --method fomaml
#              --inner-steps 1 --inner-lr 0.01` with model.path pointed at the model
#   EPISODES   the episodes file `melora bench speed` wrote
#   ITERATIONS timed meta-iterations after one warm-up (default 2)
#   MELORA     the binary (default target/release/melora)
set -euo pipefail
[ $# -ge 2 ] || { sed -n 2,14p "$0" >&2; exit 2; }
config=$1
episodes=$2
iterations=${3:-2}
melora=${4:-target/release/melora}
command -v perf >/dev/null || { echo "perf not found: apt-get install linux-perf" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
perf record -F 499 -o "$work/perf.data" -- \
    "$melora" bench speed-row --iterations "$iterations" --episodes "$episodes" \
    <"$config" >"$work/row.json" 2>"$work/perf.log"
perf report -i "$work/perf.data" --stdio --no-children --sort sym -q 2>/dev/null |
    awk '
    /%/ {
        share = $1; sub("%", "", share)
        sym = $0; sub(/^[^]]*\] /, "", sym)
        if (sym ~ /gemm/) kind = "matrix products (gemm kernels and packing)"
        else if (sym ~ /erf|exp|Pointwise|fast_math|map_chunks|Softmax/) kind = "activations and softmax"
        else if (sym ~ /page_fault|clear_page|memset|malloc|free|memcg|folio|lru|_int_|cfree/) kind = "allocation (page faults, zeroing, malloc)"
        else if (sym ~ /short_backtrace|Barrier|futex|spin|pause|sched|switch|wake/) kind = "thread pools waiting and waking"
        else if (sym ~ /binary_map|unary_map|copy_strided|memmove|memcpy|affine|reduce|cmp/) kind = "candle element-wise ops and copies"
        else kind = "other"
        total[kind] += share
    }
    END { for (k in total) printf "%6.1f%%  %s\n", total[k], k }' | sort -rn
echo "(seconds per meta-iteration: $(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["seconds_per_iter"])' "$work/row.json" 2>/dev/null || echo '?'))"
