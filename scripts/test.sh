#!/usr/bin/env bash
# Install test dependencies (and the default assets the integration tests use), then run all tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
exec .venv/bin/python -m pytest -q "$@"
