#!/usr/bin/env bash
# Table 4's six rows as one Hydra sweep, then the table. Extra args go to every job, e.g.
#   sweeps/paper_table.sh scale=paper model=codegen_6b_mono trainer=gpu 'seed=0,1,2'
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
sweep_dir=${SWEEP_DIR:-multirun/paper_table/$(date +%Y-%m-%d_%H-%M-%S)}
python -m ilf_lab -m --config-dir "$here" --config-name paper_table hydra.sweep.dir="$sweep_dir" "$@"
python -m ilf_lab.report "$sweep_dir"
