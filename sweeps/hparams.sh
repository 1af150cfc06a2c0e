#!/usr/bin/env bash
# App. A.1 per method: each tuned method's policy.{lr,batch_size,epochs} grid scored on MBPPRefine, its best point
# chosen (ILF inherits MBPP gold's), then Table 4 on MBPPTest at the chosen points and the report
# (python -m ilf_lab.a1). Extra args go to every run, e.g.
#   sweeps/hparams.sh scale=paper model=codegen_6b_mono trainer=gpu            # the paper's 27-point grid
#   GRID="--grid policy.lr=1e-5,5e-5 --grid policy.epochs=1,2" sweeps/hparams.sh scale=demo   # a smaller grid
set -euo pipefail
out=${SWEEP_DIR:-multirun/a1/$(date +%Y-%m-%d_%H-%M-%S)}
# shellcheck disable=SC2086
python -m ilf_lab.a1 --out "$out" ${GRID:-} "$@"
