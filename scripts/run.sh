#!/usr/bin/env bash
# Set up (idempotent) and run one experiment: `bash scripts/run.sh [overrides]` == `python -m ilf_lab [overrides]`.
# Offline machines: a local data copy is used when ILF_LAB_DATA_DIR is set or ../shared/data exists.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ -z "${ILF_LAB_DATA_DIR:-}" ] && [ -d ../shared/data ]; then
  export ILF_LAB_DATA_DIR="$(cd ../shared/data && pwd)"
fi
exec .venv/bin/python -m ilf_lab "$@"
