#!/usr/bin/env bash
# Session 13's measurements for issue 20 on a 2-core AVX2-only EPYC (sessions 11-12's host type), run alone on the
# host, from the repository root:   bash results/sampling/session13.sh [bench|final|default|numerics]...
# Before = session 12's code (commit 0bafd76) in a worktree, after = this checkout, back to back in one session.
# bench: the benchmark, before and after (common start prefilled once, top-p kernel);
# default: the default `python -m ilf_lab` from a cold stage cache (model already converted), before and after;
# numerics: zero-shot on all of MBPPTest x 10, fp32, default engine, seed 0 (the seeds of sessions 10-12's runs),
#   compared task by task with session 12's (zero_shot_seed0_float32_kernel.json).
set -euo pipefail
cd "$(dirname "$0")/../.."
export ILF_LAB_DATA_DIR=${ILF_LAB_DATA_DIR:-$(realpath ../shared/data)}
cache=${ILF_LAB_CACHE_DIR:-/work/cache20}  # holds the converted SmolLM2
out=$(pwd)/results/sampling
before=/tmp/s13_before
[ -d $before ] || git worktree add -f $before 0bafd76 >/dev/null
parts=("$@"); [ ${#parts[@]} -gt 0 ] || parts=(bench default numerics)
for part in "${parts[@]}"; do
  case $part in
    bench)
      (cd $before && PYTHONPATH=$before python benchmarks/sampling.py --cache-dir "$cache") > $out/session13_before.txt
      python benchmarks/sampling.py --cache-dir "$cache" > $out/session13_after.txt
      ;;
    final)
      python benchmarks/sampling.py --cache-dir "$cache" > $out/session13_final.txt
      ;;
    default)
      echo "before (0bafd76) and after ($(git rev-parse --short HEAD)), this session, same host:" >> $out/session13_default.txt
      (cd $before && PYTHONPATH=$before bash $out/cold_default_run.sh "$cache" $out/session13_default.txt)
      bash $out/cold_default_run.sh "$cache" $out/session13_default.txt
      ;;
    numerics)
      ILF_LAB_CACHE_DIR=$cache python -m ilf_lab experiment=zero_shot logger=none data.max_test_tasks=null \
        sampling.n=10 model.dtype=float32 seed=0 hydra.run.dir=/tmp/s13_zero_shot_0
      cp /tmp/s13_zero_shot_0/results.json $out/zero_shot_seed0_float32_session13.json
      ;;
    *) echo "error: unknown part $part (bench, final, default or numerics)" >&2; exit 2 ;;
  esac
done
