#!/usr/bin/env bash
# Tables 2 and 3 (refinement analyses) as one Hydra sweep, then the report. Extra args go to every job.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
sweep_dir=${SWEEP_DIR:-multirun/refine_analysis/$(date +%Y-%m-%d_%H-%M-%S)}
python -m ilf_lab -m --config-dir "$here" --config-name refine_analysis hydra.sweep.dir="$sweep_dir" "$@"
python -m ilf_lab.report "$sweep_dir"
