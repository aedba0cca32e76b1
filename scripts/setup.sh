#!/usr/bin/env bash
# Install slimlm into .venv and fetch + cache the default model and corpus. Idempotent.
#   bash scripts/setup.sh          app dependencies
#   bash scripts/setup.sh --test   plus test dependencies (pytest, playwright, Debian chromium)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"

[ -x .venv/bin/python ] || "$PY" -m venv .venv
# torch first and pinned: the CPU build of 2.13.0 installs from local disk; an unpinned torch
# would pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extras}"

if [ -n "$extras" ] && [ ! -x /usr/bin/chromium ]; then
  echo "installing Debian chromium for the end-to-end browser test"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium >/dev/null
fi

.venv/bin/python -m core setup
