#!/usr/bin/env bash
# Set up, lint, and run the tests. Extra arguments go to pytest (e.g. -m "not slow" for the fast set).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
if [ -z "${ILF_LAB_DATA_DIR:-}" ] && [ -d ../shared/data ]; then
  export ILF_LAB_DATA_DIR="$(cd ../shared/data && pwd)"
fi
.venv/bin/python -m ruff check .
.venv/bin/python -m pytest "$@"
