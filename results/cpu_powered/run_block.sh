#!/usr/bin/env bash
# The powered CPU reproduction's blocks (README.md here), from the repository root:
#   RUNS=/work/runs19 ILF_LAB_CACHE_DIR=/work/cache19 bash results/cpu_powered/run_block.sh 1|2|3a
# Each block is one resumable command: run it again after an interruption (finished runs and stages are kept).
set -euo pipefail
cd "$(dirname "$0")/../.."  # the repository root
block=${1:?usage: run_block.sh 1|2|3a}
RUNS=${RUNS:-/work/runs19}
export ILF_LAB_DATA_DIR=${ILF_LAB_DATA_DIR:-../shared/data} ILF_LAB_CACHE_DIR=${ILF_LAB_CACHE_DIR:-/work/cache19}
common=(--grid policy.lr=2e-5,1e-4 --grid policy.epochs=2,5 --select data.max_test_tasks=100 --select sampling.n=10
        scale=cpu sampling.dtype=bfloat16 logger=none)
case $block in
  1)  out=$RUNS/a1;     args=(--methods mbpp_gold,human_refinements --seeds 0) ;;
  2)  out=$RUNS/a1;     args=(--methods mbpp_gold,human_refinements --seeds 0,1,2) ;;
  3a) out=$RUNS/a1_llm; args=(--methods instructgpt_1shot,instructgpt_2shot --seeds 0) ;;
  *)  echo "error: unknown block $block (1, 2 or 3a)" >&2; exit 2 ;;
esac
cmd=(python -m ilf_lab.a1 --out "$out" "${args[@]}" "${common[@]}")
if [ -e "$out" ]; then cmd+=(--resume); fi
"${cmd[@]}"
