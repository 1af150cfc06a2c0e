#!/usr/bin/env bash
# Figure 4: 2-shot LLM feedback on 50, 100, 200 MBPPTrain tasks. Extra args go to every job.
# Plot: open notebooks/figures.ipynb with ILF_LAB_RESULTS=<sweep dir> (Figure 4 section).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
sweep_dir=${SWEEP_DIR:-multirun/feedback_scaling/$(date +%Y-%m-%d_%H-%M-%S)}
python -m ilf_lab -m --config-dir "$here" --config-name feedback_scaling hydra.sweep.dir="$sweep_dir" "$@"
python -m ilf_lab.report "$sweep_dir"
