#!/usr/bin/env bash
# Installs the real data sets that Debian packages: WordNet 3.0 (wordnet-base) and
# Fashion-MNIST (dataset-fashion-mnist), and prints where they land. Needs apt-get
# and root (or sudo). Omniglot has no package: point data.path (or
# `melora bench data --omniglot`) at its zip archives or extracted folder.
#
# Usage: scripts/fetch-data.sh
set -euo pipefail

packages=(wordnet-base dataset-fashion-mnist)
sudo=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "run as root, or install sudo" >&2; exit 1; }
    sudo=sudo
fi
if ! dpkg -s "${packages[@]}" >/dev/null 2>&1; then
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${packages[@]}" >/dev/null
fi

echo "WordNet (data.source: wordnet, data.path: /usr/share/wordnet):"
ls -1 /usr/share/wordnet/data.noun /usr/share/wordnet/data.verb
echo "Fashion-MNIST (data.source: idx, data.path: one *-images-idx3-ubyte.gz file):"
ls -1 /usr/share/datasets/fashion-mnist/*.gz
