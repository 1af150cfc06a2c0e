#!/usr/bin/env bash
# App. A.1: the 27-point grid over policy.{lr,batch_size,epochs}, scored on MBPPRefine (eval.split=refine);
# then the best point, once, on MBPPTest. Extra args go to both steps, e.g.
#   sweeps/hparams.sh scale=paper model=codegen_6b_mono trainer=gpu
# The stage cache (paths.cache_dir) makes the final run reuse the chosen point's trained policy.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
sweep_dir=${SWEEP_DIR:-multirun/hparams/$(date +%Y-%m-%d_%H-%M-%S)}
python -m ilf_lab -m --config-dir "$here" --config-name hparams hydra.sweep.dir="$sweep_dir" "$@"
read -r -a best <<< "$(python -m ilf_lab.report "$sweep_dir" --best-overrides)"
echo "best point on MBPPRefine: ${best[*]}"
python -m ilf_lab eval.split=test "${best[@]}" "$@"
