#!/usr/bin/env bash
# Train the tune-salience network on a GPU host from a compact labelled cache, in minutes.
#
#   bash scripts/salience-gpu.sh CACHE.npz OUT [STEPS]
#
# CACHE.npz is a `refrain salience cache` of rendered corpus folders (7.8 MB an hour of audio:
# eight hours stay under 64 MiB, so the cache travels with the code); OUT is the run folder
# (resumed when it exists). The host needs torch with CUDA, numpy, safetensors, tqdm and
# mir_eval; the repository's own folders are imported from this checkout, nothing installed.
# The network that wins on the cache's validation versions is OUT/best: copy it to
# model/weights/salience to ship it.
set -euo pipefail

cache=${1:?usage: salience-gpu.sh CACHE.npz OUT [STEPS]}
out=${2:?usage: salience-gpu.sh CACHE.npz OUT [STEPS]}
steps=${3:-20000}
root=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

python3 - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device: this script trains on a GPU"
print("device:", torch.cuda.get_device_name(0))
PY
# a larger batch of longer crops than on a CPU; the learning-rate schedule spans `steps`
python3 -m refrain.service.cli salience train "$cache" --out "$out" --steps "$steps" \
    --batch 64 --frames 256 --every 1000 --device cuda --quiet
python3 -m refrain.service.cli salience evaluate "$cache" --checkpoint "$out/best" \
    --split valid --json "$out/valid.json"
