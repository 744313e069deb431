#!/usr/bin/env bash
# System packages the tests use: Chromium for the chat-page test. Installed once; skipped when present.
set -euo pipefail
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
      || echo "could not install chromium: the chat page browser test will be skipped" >&2
  else
    echo "chromium is not installed: the chat page browser test will be skipped (apt-get install chromium)" >&2
  fi
fi

# llama.cpp (llama-cpp-python, built from source: a few minutes, once) checks our GGUF export against the engine it
# is for. Best effort: when the build fails, that test is skipped. PHIKIT_SKIP_LLAMA_CPP=1 skips the build.
VENV_PYTHON="${VENV_PYTHON:-.venv/bin/python}"
if [ -z "${PHIKIT_SKIP_LLAMA_CPP:-}" ] && ! "$VENV_PYTHON" -c "import llama_cpp" >/dev/null 2>&1; then
  echo "building llama-cpp-python for the GGUF test (a few minutes, once)" >&2
  CMAKE_ARGS="-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_CURL=OFF -DLLAVA_BUILD=OFF -DMTMD_BUILD=OFF" \
    timeout 1800 "$VENV_PYTHON" -m pip install -q -c constraints.txt llama-cpp-python \
    || echo "could not build llama-cpp-python: the llama.cpp GGUF test will be skipped" >&2
fi
