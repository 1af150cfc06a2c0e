#!/usr/bin/env bash
# Session 12's measurements for issue 20 on a 2-core AVX2-only EPYC (the host type of session 11), run alone on the
# host, from the repository root:   bash results/sampling/session12.sh [bench|default|numerics]...
# bench: the benchmark with the attention kernel (the new default) and with torch's batched matmuls (before);
# default: the default `python -m ilf_lab` from a cold stage cache (model already converted), with the matmuls
#   (before) and then the kernel (after), back to back;
# numerics: zero-shot on all of MBPPTest x 10, fp32, default engine, seed 0: the sample seeds of sessions 10-11's
#   runs (zero_shot_seed0_float32_onednn.json), compared task by task.
set -euo pipefail
cd "$(dirname "$0")/../.."
export ILF_LAB_DATA_DIR=${ILF_LAB_DATA_DIR:-../shared/data}
cache=${ILF_LAB_CACHE_DIR:-/work/cache20}  # holds the converted SmolLM2
out=results/sampling
parts=("$@"); [ ${#parts[@]} -gt 0 ] || parts=(bench default numerics)
for part in "${parts[@]}"; do
  case $part in
    bench)
      python benchmarks/sampling.py --cache-dir "$cache" > $out/session12_kernel.txt
      python benchmarks/sampling.py --attention matmul --cache-dir "$cache" > $out/session12_matmul.txt
      ;;
    default)
      echo "$(git rev-parse --short HEAD), this session, same host:" >> $out/session12_default.txt
      bash $out/cold_default_run.sh "$cache" $out/session12_default.txt sampling.attention=matmul
      bash $out/cold_default_run.sh "$cache" $out/session12_default.txt
      ;;
    numerics)
      ILF_LAB_CACHE_DIR=$cache python -m ilf_lab experiment=zero_shot logger=none data.max_test_tasks=null \
        sampling.n=10 model.dtype=float32 seed=0 hydra.run.dir=/tmp/s12_zero_shot_0
      cp /tmp/s12_zero_shot_0/results.json $out/zero_shot_seed0_float32_kernel.json
      ;;
    *) echo "error: unknown part $part (bench, default or numerics)" >&2; exit 2 ;;
  esac
done
