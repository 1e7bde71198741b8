#!/usr/bin/env bash
# The GPU checks and figures in one run: the CUDA tests, embedding throughput (float32 and
# bfloat16) and training throughput (bench/train_speed.py), on a machine with a CUDA device
# and PyTorch but possibly without this project installed and without a package index.
#
#   bench/gpu.sh OUT            # everything it prints is also written under OUT
#   QUICK=1 DEVICE=cpu bench/gpu.sh OUT   # the same commands, tiny and on the CPU (a dry run)
#   PARTS="tests train" bench/gpu.sh OUT  # some of: train tests train-bf16 embed embed-bf16
#
# Wheels for what the machine lacks may wait in .whl/ (pip's --target install, no index).
# The source tree is put on the path as the installed `refrain` namespace (pyproject.toml's
# package-dir mapping), so nothing is built. PyAV (FFmpeg) decodes MP3 and other compressed
# formats only; every file here is FLAC, which the loader reads with libsndfile, so where PyAV
# is missing a placeholder module that raises on use stands in for it, and the log says so.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bench/gpu.sh OUT}
mkdir -p "$out"
device=${DEVICE:-cuda}
site=/tmp/refrain-gpu-site
pkg=/tmp/refrain-gpu-pkg

if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" .whl/*.whl || exit 1
fi
mkdir -p "$pkg/refrain"
cp refrain/__init__.py "$pkg/refrain/"
for part in model index service; do ln -sfn "$PWD/$part" "$pkg/refrain/$part"; done
export PYTHONPATH="$pkg:$site" PYTHONUNBUFFERED=1
if ! python3 -c "import av" 2>/dev/null; then
    echo "PyAV is not installed: a placeholder stands in (FLAC only)" | tee "$out/machine.txt"
    mkdir -p "$site/av"
    cat >"$site/av/__init__.py" <<'EOF'
"""Placeholder for PyAV on a machine without it: importable, raises on use."""
from . import error  # noqa: F401


def open(*args, **kwargs):
    raise error.FFmpegError("PyAV is not installed on this machine")
EOF
    cat >"$site/av/error.py" <<'EOF'
class FFmpegError(Exception):
    pass


InvalidDataError = EOFError = FFmpegError
EOF
fi

{
    date -u
    python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
    nproc
} 2>&1 | tee -a "$out/machine.txt"

if [ -n "${QUICK:-}" ]; then
    tracks=2 repeat=1 steps=3 loop_steps=3 wpb=4,8 widths=1,1.5
else
    tracks=8 repeat=2 steps=40 loop_steps=30 wpb=16,32,64 widths=1,2
fi
parts=" ${PARTS:-train tests train-bf16 embed embed-bf16} "
want() { [[ "$parts" == *" $1 "* ]]; }
# the most wanted figures first: a command stopped at its time limit keeps what came before
status=0
if want train; then
    timeout 300 python3 bench/train_speed.py --device "$device" --works-per-batch $wpb \
        --width $widths --steps $steps --loop-epochs 2 --loop-steps $loop_steps \
        --prefetch 0,2 --json "$out/train-$device.json" 2>"$out/train-$device.err" \
        | tee "$out/train-$device.txt" || status=1
fi
if [ "$device" = cuda ] && want tests; then
    # -P: the checkout's own refrain/ (without model/ beside it) must not shadow the one above
    timeout 120 python3 -P -m pytest -p no:cacheprovider -m requires_cuda -v -s \
        tests/test_model.py 2>&1 | tee "$out/cuda-tests.log" || status=1
    # how far a CUDA embedding is from the CPU one, with cuDNN's TF32 allowed and not
    timeout 60 python3 -P - <<'EOF' 2>&1 | tee "$out/tf32.txt" || status=1
import numpy as np
import torch
from refrain.model import load_model
audio = "tests/data/audio/song75s.flac"
for name in ("tests/data/clews-official-A/checkpoint_best.ckpt", None):
    ref = load_model(name).embed(audio) if name else load_model().embed(audio)
    gpu = load_model(name, device="cuda") if name else load_model(device="cuda")
    for tf32 in (True, False):
        torch.backends.cudnn.allow_tf32 = tf32
        diff = float(np.abs(gpu.embed(audio) - ref).max())
        print(f"{name or 'shipped default'}: cuDNN TF32 {tf32}: max |GPU - CPU| {diff:.2e}")
EOF
fi
if [ "$device" = cuda ] && want train-bf16; then
    timeout 60 python3 bench/train_speed.py --device cuda --no-loop --amp bf16 \
        --works-per-batch $wpb --width $widths --steps $steps \
        --json "$out/train-cuda-bf16.json" 2>&1 | tee "$out/train-cuda-bf16.txt" || status=1
fi
for precision in float32 bfloat16; do
    [ "$device" = cpu ] && [ "$precision" != float32 ] && continue
    want "$([ $precision = float32 ] && echo embed || echo embed-bf16)" || continue
    timeout 120 python3 bench/embed.py --models default,full --device "$device" \
        --precision "$precision" --tracks $tracks --repeat $repeat 2>&1 \
        | tee "$out/embed-$device-$precision.txt" || status=1
done
exit $status
