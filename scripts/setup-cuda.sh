#!/usr/bin/env bash
# Installs what `cargo build --release --features cuda` needs from the Python
# package registry alone (no system CUDA toolkit, no GPU): nvcc, ptxas and the
# CUDA headers, from NVIDIA's wheels, into a folder of their own. Prints the
# environment to build with, so use it as
#
#   eval "$(scripts/setup-cuda.sh)"
#   cargo build --release --features cuda
#
# Options (environment):
#   MELORA_CUDA_VERSION  the toolkit's version, major.minor (default 13.0). Take the
#                        version of the driver of the machine that will run the
#                        binary (`nvidia-smi` prints it as "CUDA Version"): PTX
#                        from a newer nvcc is refused by an older driver.
#   MELORA_CUDA_DIR      where to install (default ~/.cache/melora/cuda-VERSION).
#   CUDA_COMPUTE_CAP     the GPU's compute capability without the dot (90 for
#                        H100/H200, 89 for RTX 40xx, 86 for RTX 30xx, 80 for
#                        A100). Read from nvidia-smi where a GPU is visible,
#                        else 90.
#
# The CUDA libraries' headers come from the wheels, and one library: candle-kernels
# compiles a few kernels into a static library that asks the linker for the CUDA
# runtime (`-l cudart`). The wheel's libcudart.so.13 has no unversioned name, so
# the script offers the linker the runtime's static archive under that name
# (LIBRARY_PATH): the binary then carries the CUDA runtime and does not need
# libcudart at run time. The rest it opens when it starts on a GPU: the driver,
# cuBLAS, cuRAND and NVRTC (see vendor/candle-core/PATCH.md), so the machine that
# runs it needs the NVIDIA driver and those libraries, as any CUDA program does.
set -euo pipefail

version=${MELORA_CUDA_VERSION:-13.0}
major=${version%%.*}
if [[ ! $version =~ ^[0-9]+\.[0-9]+$ ]]; then
    echo "setup-cuda: MELORA_CUDA_VERSION must be major.minor, such as 13.0 (got '$version')" >&2
    exit 2
fi
if [[ $major != 13 ]]; then
    # CUDA 12's wheels spread the toolkit over one folder per package, which
    # candle-kernels' build does not search; 13's share one root.
    echo "setup-cuda: only CUDA 13.x is supported (got $version): its wheels install one toolkit root" >&2
    exit 2
fi
dir=${MELORA_CUDA_DIR:-$HOME/.cache/melora/cuda-$version}
root=$dir/nvidia/cu$major

if [[ ! -x $root/bin/nvcc ]]; then
    if ! python3 -m pip --version >/dev/null 2>&1; then
        echo "setup-cuda: python3 with pip is needed to download NVIDIA's CUDA wheels" >&2
        exit 1
    fi
    tmp=$dir.partial
    rm -rf "$tmp"
    # Every package pinned: left to itself pip takes the newest crt and nvvm, whose
    # headers do not match this nvcc.
    python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location --root-user-action=ignore \
        --target "$tmp" \
        "nvidia-cuda-nvcc==$version.*" "nvidia-cuda-runtime==$version.*" \
        "nvidia-cuda-cccl==$version.*" "nvidia-cuda-crt==$version.*" \
        "nvidia-nvvm==$version.*" >&2
    rm -rf "$dir"
    mv "$tmp" "$dir"
fi
if [[ ! -x $root/bin/nvcc || ! -e $root/include/nv/target ]]; then
    echo "setup-cuda: $dir does not hold nvcc and the CUDA headers; remove it and run again" >&2
    exit 1
fi

cap=${CUDA_COMPUTE_CAP:-}
if [[ -z $cap ]] && command -v nvidia-smi >/dev/null 2>&1; then
    cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' .' || true)
fi
cap=${cap:-90}

echo "setup-cuda: CUDA $("$root/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p') in $root, compute capability $cap" >&2
printf 'export PATH=%q:"$PATH"\n' "$root/bin"
printf 'export CUDA_ROOT=%q\n' "$root"
printf 'export CUDA_COMPUTE_CAP=%q\n' "$cap"

# The CUDA runtime for the linker, as the static archive (see the top).
link=$dir/link
if [[ ! -e $root/lib/libcudart_static.a ]]; then
    echo "setup-cuda: $root/lib has no libcudart_static.a; remove $dir and run again" >&2
    exit 1
fi
mkdir -p "$link"
ln -sfn "$root/lib/libcudart_static.a" "$link/libcudart.a"
printf 'export LIBRARY_PATH=%q"${LIBRARY_PATH:+:$LIBRARY_PATH}"\n' "$link"
