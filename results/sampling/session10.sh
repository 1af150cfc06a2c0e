#!/usr/bin/env bash
# Session 10's measurements for issue 20, run alone on the host, from the repository root:
#   bash results/sampling/session10.sh [bench|numerics|default]...   (all three when none is named)
# bench: the benchmark with the default engine (fp32, shared prompt KV in runs) and with int8;
# numerics: zero-shot on all of MBPPTest x 10, fp32, default engine, seeds 0 and 1: the sample seeds of
#   zero_shot_seed{0,1}_float32_shared.json (session 9: one softmax over the padded grid), so the runs and the
#   flash-decoding merge are compared task by task with the engine before;
# int8: zero-shot as in numerics with sampling.quantize=int8 at seeds 0, 1, 2, and fp32 at seed 2 (int8 against
#   fp32 on three seeds with this engine);
# default: the default `python -m ilf_lab` from a cold stage cache (model already converted), after (this
#   checkout) and before (session 9's last commit 103d6a4, from a git worktree), on the same host.
set -euo pipefail
cd "$(dirname "$0")/../.."
export ILF_LAB_DATA_DIR=${ILF_LAB_DATA_DIR:-../shared/data}
cache=${ILF_LAB_CACHE_DIR:-/work/cache19}  # holds the converted SmolLM2
out=results/sampling
parts=("$@"); [ ${#parts[@]} -gt 0 ] || parts=(bench numerics default)
for part in "${parts[@]}"; do
  case $part in
    bench)
      python benchmarks/sampling.py --cache-dir "$cache" > $out/session10_fp32.txt
      python benchmarks/sampling.py --quantize int8 --cache-dir "$cache" > $out/session10_int8.txt
      ;;
    numerics)
      for seed in 0 1; do
        ILF_LAB_CACHE_DIR=$cache python -m ilf_lab experiment=zero_shot logger=none data.max_test_tasks=null \
          sampling.n=10 model.dtype=float32 seed=$seed hydra.run.dir=/tmp/s10_zero_shot_$seed
        cp /tmp/s10_zero_shot_$seed/results.json $out/zero_shot_seed${seed}_float32_runs.json
      done
      ;;
    int8)
      for run in "2 null" "0 int8" "1 int8" "2 int8"; do
        set -- $run
        ILF_LAB_CACHE_DIR=$cache python -m ilf_lab experiment=zero_shot logger=none data.max_test_tasks=null \
          sampling.n=10 model.dtype=float32 seed=$1 sampling.quantize=$2 hydra.run.dir=/tmp/s10_zs_$1_$2
        cp /tmp/s10_zs_$1_$2/results.json $out/zero_shot_seed$1_$( [ "$2" = null ] && echo float32 || echo int8 )_runs.json
      done
      ;;
    default)
      echo "after: $(git rev-parse --short HEAD) (this checkout)" >> $out/session10_default.txt
      bash $out/cold_default_run.sh "$cache" $out/session10_default.txt
      before=$(mktemp -d /tmp/before103d6a4.XXXX)
      git worktree add -q --detach "$before" 103d6a4
      echo "before: 103d6a4 (session 9's last commit)" >> $out/session10_default.txt
      (cd "$before" && bash results/sampling/cold_default_run.sh "$cache" "$OLDPWD/$out/session10_default.txt")
      git worktree remove --force "$before"
      ;;
    *) echo "error: unknown part $part (bench, numerics, int8 or default)" >&2; exit 2 ;;
  esac
done
