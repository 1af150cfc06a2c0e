#!/usr/bin/env bash
# Session 22's measurements for issue 20 (the Zen 5 / AVX-512 host of sessions 18-21), run alone, from the
# repository root:
#   bash results/sampling/session22.sh [bench|final|default|bf16|numerics_bf16]...
# bench: the benchmark on 2b6f890 (session 21's last commit) then on this checkout, back to back
#   (session22_before.txt, session22_after.txt);
# final: the benchmark again on this checkout alone (session22_final.txt);
# default: the default `python -m ilf_lab` from a cold stage cache, model converted, 2b6f890 then this checkout,
#   back to back (session22_default.txt);
# bf16: the benchmark with the opt-in bf16 linear layers (session22_bf16.txt);
# numerics_bf16: zero-shot on all of MBPPTest x 10, seed 0, the opt-in against the fp32 default
#   (zero_shot_seed0_bf16_linear_session22.json; fp32: zero_shot_seed0_float32_session22.json).
set -euo pipefail
[ $# -gt 0 ] || set -- bench default
here=$(dirname "$0")
cache=${ILF_LAB_CACHE_DIR:-/work/cache20}
for part in "$@"; do
  case $part in
    bf16) python benchmarks/sampling.py --cache-dir "$cache" --cpu-linear onednn_bf16 > "$here/session22_bf16.txt" ;;
    numerics_bf16)
      for lin in onednn_bf16 null; do
        ILF_LAB_CACHE_DIR=$cache python -m ilf_lab experiment=zero_shot logger=none data.max_test_tasks=null \
          sampling.n=10 model.dtype=float32 seed=0 sampling.cpu_linear=$lin hydra.run.dir="/tmp/session22_zs_$lin"
      done
      cp /tmp/session22_zs_onednn_bf16/results.json "$here/zero_shot_seed0_bf16_linear_session22.json"
      cp /tmp/session22_zs_null/results.json "$here/zero_shot_seed0_float32_session22.json"
      ;;
    *) bash "$here/measure.sh" 2b6f890 session22 "$part" ;;
  esac
done
