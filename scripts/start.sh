#!/usr/bin/env bash
# Set everything up (first time only takes long), then start the app on http://localhost:8501
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m streamlit run app.py --browser.gatherUsageStats false "$@"
