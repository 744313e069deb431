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
