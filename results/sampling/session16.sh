#!/usr/bin/env bash
# Session 16's measurements for issue 20 on a 2-core AVX2-only EPYC (sessions 11-15's host type), run alone on the
# host, from the repository root:   bash results/sampling/session16.sh [bench|default|numerics]...
# Before = session 15's code (commit c020753) in a worktree, after = this checkout, back to back in one session.
# bench: the benchmark, before and after (prefill's causal attention in a C++ kernel that computes only the unmasked
#   half; up to 256 decode rows on CPU, from 192);
# default: the default `python -m ilf_lab` from a cold stage cache (model already converted), before and after, back to
#   back;
# numerics: zero-shot on all of MBPPTest x 10, fp32, default engine, seed 0 (the seeds of sessions 10-15's runs),
#   compared task by task with session 15's (zero_shot_seed0_float32_session15.json).
set -euo pipefail
cd "$(dirname "$0")/../.."
export ILF_LAB_DATA_DIR=${ILF_LAB_DATA_DIR:-$(realpath ../shared/data)}
cache=${ILF_LAB_CACHE_DIR:-/work/cache20}  # holds the converted SmolLM2
out=$(pwd)/results/sampling
before=/tmp/s16_before
[ -d $before ] || git worktree add -f $before c020753 >/dev/null
parts=("$@"); [ ${#parts[@]} -gt 0 ] || parts=(bench numerics default)
for part in "${parts[@]}"; do
  case $part in
    bench)
      (cd $before && PYTHONPATH=$before python benchmarks/sampling.py --cache-dir "$cache") > $out/session16_before.txt
      python benchmarks/sampling.py --cache-dir "$cache" > $out/session16_after.txt
      ;;
    default)
      echo "before (c020753) and after ($(git rev-parse --short HEAD)), back to back:" >> $out/session16_default.txt
      (cd $before && PYTHONPATH=$before bash $out/cold_default_run.sh "$cache" $out/session16_default.txt)
      bash $out/cold_default_run.sh "$cache" $out/session16_default.txt
      ;;
    numerics)
      ILF_LAB_CACHE_DIR=$cache python -m ilf_lab experiment=zero_shot logger=none data.max_test_tasks=null \
        sampling.n=10 model.dtype=float32 seed=0 hydra.run.dir=/tmp/s16_zero_shot_0
      cp /tmp/s16_zero_shot_0/results.json $out/zero_shot_seed0_float32_session16.json
      ;;
    *) echo "error: unknown part $part (bench, default or numerics)" >&2; exit 2 ;;
  esac
done
