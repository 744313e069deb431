#!/usr/bin/env bash
# The checks that need an NVIDIA GPU, in one run of a few minutes (the test suite runs on CPUs; its CUDA variants
# are skipped there). Needs torch with CUDA, transformers and phikit importable (`pip install -e .` in an
# environment with a CUDA torch). Prints what it measures; the last line of each benchmark is its JSON.
#   1. the CUDA variants of the tests: greedy decoding equal to transformers' (eager, compiled as CUDA graphs, and
#      again through the kept cache), fp16 attention scores that overflow fp16 staying finite (phi-2's NaN in
#      fp16), and bf16/fp16 mixed-precision training that learns and resumes exactly;
#   2. phi-1.5-shaped fp16 decoding against transformers' generate, batch 1 and 8, eager and compiled
#      (targets: <= 1.5 ms/token at batch 1, >= 5x transformers);
#   3. phi-2-shaped fp16 decoding, batch 1: finite logits (the benchmark checks) and its speed.
# Usage: scripts/gpu-check.sh [OUTDIR]    (OUTDIR, default runs/gpu-check, receives the logs)
# phikit is imported from this checkout's src/, installed or not; on a machine without a package index, run
# scripts/gpu-wheels.sh where there is one first, and bring .whl/ along.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${1:-runs/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
    site=$(mktemp -d)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: these checks need an NVIDIA GPU')"
"$PY" -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" | tee "$OUT/device.txt"
"$PY" -m pytest -q -p no:cacheprovider -k cuda tests/test_foundation_model.py tests/test_generate_parity.py \
    tests/test_train_precision.py \
    2>&1 | tee "$OUT/tests.log"
"$PY" benchmarks/decode.py --device cuda --modes fp16 --batches 1,8 --transformers-batches 1,8 --compile \
    --llama-types "" --repeats 3 2>&1 | tee "$OUT/decode-phi-1_5.log"
"$PY" benchmarks/decode.py --device cuda --preset phi-2 --modes fp16 --batches 1 --transformers-batches 1 \
    --compile --llama-types "" --repeats 2 --check-finite 2>&1 | tee "$OUT/decode-phi-2.log"
