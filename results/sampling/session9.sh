#!/usr/bin/env bash
# Session 9's measurements for issue 20, run alone on the host, from the repository root:
#   bash results/sampling/session9.sh [numerics|default|bench]...   (all three when none is named)
# numerics: zero-shot on all of MBPPTest x 10 with the prompt's KV shared (sampling.prompt_kv=shared), fp32, at
#   seeds 0 and 1: the sample seeds of zero_shot_float32.json (seed 0, session 7) and zero_shot_seed1_float32.json
#   (session8.sh), so pass@1 with shared KV is compared with the copying cache's on the same tasks and seeds;
# default: the default `python -m ilf_lab` from a cold stage cache (model already converted) with shared KV, fp32
#   and int8 (session8_default.txt has the copying cache's);
# bench: the benchmark in fp32 (the default engine), the prompt's KV copied and shared (the default since
#   session 9), in one session.
set -euo pipefail
cd "$(dirname "$0")/../.."
export ILF_LAB_DATA_DIR=${ILF_LAB_DATA_DIR:-../shared/data}
cache=${ILF_LAB_CACHE_DIR:-/work/cache19}  # holds the converted SmolLM2
out=results/sampling
parts=("$@"); [ ${#parts[@]} -gt 0 ] || parts=(numerics default bench)
for part in "${parts[@]}"; do
  case $part in
    numerics)
      for seed in 0 1; do
        ILF_LAB_CACHE_DIR=$cache python -m ilf_lab experiment=zero_shot logger=none data.max_test_tasks=null \
          sampling.n=10 model.dtype=float32 seed=$seed sampling.prompt_kv=shared hydra.run.dir=/tmp/s9_zero_shot_$seed
        cp /tmp/s9_zero_shot_$seed/results.json $out/zero_shot_seed${seed}_float32_shared.json
      done
      ;;
    default)
      for q in null int8; do
        bash $out/cold_default_run.sh "$cache" $out/session9_default.txt sampling.quantize=$q sampling.prompt_kv=shared
      done
      ;;
    bench)
      python benchmarks/sampling.py --prompt-kv copy --cache-dir "$cache" > $out/session9_fp32_copy.txt
      python benchmarks/sampling.py --cache-dir "$cache" > $out/session9_fp32_shared.txt
      ;;
    *) echo "error: unknown part $part (numerics, default or bench)" >&2; exit 2 ;;
  esac
done
