#!/usr/bin/env bash
# Session 8's measurements for issue 20, run alone on the host, from the repository root:
#   bash results/sampling/session8.sh [bench|numerics|default]...   (all three when none is named)
# bench: the benchmark with int8 weights, the prompt's KV copied (default) and shared, in one session;
# numerics: zero-shot on all of MBPPTest x 10 at seed 1, fp32 and int8 (seed 0 is zero_shot_{float32,int8}.json);
# default: the default `python -m ilf_lab` from a cold stage cache (model already converted), fp32 and int8.
set -euo pipefail
cd "$(dirname "$0")/../.."
export ILF_LAB_DATA_DIR=${ILF_LAB_DATA_DIR:-../shared/data}
cache=${ILF_LAB_CACHE_DIR:-/work/cache19}  # holds the converted SmolLM2
out=results/sampling
parts=("$@"); [ ${#parts[@]} -gt 0 ] || parts=(bench numerics default)
for part in "${parts[@]}"; do
  case $part in
    bench)
      python benchmarks/sampling.py --quantize int8 --cache-dir "$cache" > $out/session8_int8_copy.txt
      python benchmarks/sampling.py --quantize int8 --prompt-kv shared --cache-dir "$cache" > $out/session8_int8_shared.txt
      ;;
    numerics)
      for q in null int8; do
        ILF_LAB_CACHE_DIR=$cache python -m ilf_lab experiment=zero_shot logger=none data.max_test_tasks=null \
          sampling.n=10 seed=1 sampling.quantize=$q hydra.run.dir=/tmp/s8_zero_shot_$q
        cp /tmp/s8_zero_shot_$q/results.json $out/zero_shot_seed1_$( [ $q = null ] && echo float32 || echo $q ).json
      done
      ;;
    default)
      for q in null int8; do
        bash $out/cold_default_run.sh "$cache" $out/session8_default.txt sampling.quantize=$q
      done
      ;;
    *) echo "error: unknown part $part (bench, numerics or default)" >&2; exit 2 ;;
  esac
done
