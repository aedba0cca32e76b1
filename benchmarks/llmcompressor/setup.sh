#!/usr/bin/env bash
# Create benchmarks/.venv-llmcompressor with llm-compressor and its pinned stack, kept apart from the
# project venv (llm-compressor is a peer to compare against, never a slimlm dependency).
# Idempotent: does nothing when the venv already imports the pinned versions.
#
#   bash benchmarks/llmcompressor/setup.sh
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$(cd "$HERE/.." && pwd)/.venv-llmcompressor"
PY="${PYTHON:-python3.11}"

# Pins: the versions verified together on CPU (python 3.11).
# llmcompressor 0.14.0.1 requires compressed-tensors==0.19.0 and transformers>=5.15,<=5.17
# (the project venv has transformers 5.23, which llmcompressor does not accept: another reason
# for a separate venv). torch is installed first and pinned, so pip never pulls a CUDA build.
TORCH="torch==2.13.0"
PINS=(
  "llmcompressor==0.14.0.1"
  "compressed-tensors==0.19.0"
  "transformers==5.17.0"
  "datasets==5.2.0"
  "accelerate==1.15.0"
  "auto-round==0.15.1"
  "safetensors==0.8.0"
)

check() {
  "$VENV/bin/python" - <<'EOF' >/dev/null 2>&1
from importlib.metadata import version
want = {"torch": "2.13.0", "llmcompressor": "0.14.0.1", "compressed-tensors": "0.19.0",
        "transformers": "5.17.0", "datasets": "5.2.0"}
for pkg, v in want.items():
    assert version(pkg).split("+")[0] == v, (pkg, version(pkg))
import torch, datasets, compressed_tensors  # noqa: F401
from llmcompressor import oneshot  # noqa: F401
from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier  # noqa: F401
from llmcompressor.modifiers.transform.awq import AWQModifier  # noqa: F401
from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier  # noqa: F401
EOF
}

if [ -x "$VENV/bin/python" ] && check; then
  echo "llm-compressor venv ready: $VENV"
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
"$VENV/bin/python" -m pip install -q "$TORCH"
"$VENV/bin/python" -m pip install -q "$TORCH" "${PINS[@]}"
check || { echo "llm-compressor venv: import check failed" >&2; exit 1; }
echo "llm-compressor venv ready: $VENV"
"$VENV/bin/python" -c "from importlib.metadata import version as v; print(*[f'{p}=={v(p)}' for p in ('torch','llmcompressor','compressed-tensors','transformers','datasets')])"
