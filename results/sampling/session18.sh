#!/usr/bin/env bash
# Session 18's measurements for issue 20 on a new host (AMD EPYC Zen 5, AVX-512, 2 cores: oneDNN's packed fp32
# matmul at ~420 GFLOP/s at the decode shapes), run alone, from the repository root:
#   bash results/sampling/session18.sh [decode_attention|final|final_default]...
# decode_attention: the decode kernel at the host's width (16 lanes) against 8 lanes, alternating pairs
#   (session18_decode_attention.txt);
# final: the benchmark, 3 engine calls per set (session18_final.txt). session18_before.txt was the same benchmark
#   command (python benchmarks/sampling.py --cache-dir /work/cache20) run by hand at the session's start, on
#   c562061 (the code before this session), on the same host; this script does not re-make it;
# final_default: the default `python -m ilf_lab` from a cold stage cache, model converted (session18_default.txt).
set -euo pipefail
[ $# -gt 0 ] || set -- decode_attention final final_default
cd "$(dirname "$0")/../.."
for part in "$@"; do
  case $part in
    decode_attention) python benchmarks/decode_attention.py > results/sampling/session18_decode_attention.txt ;;
    *) bash results/sampling/measure.sh c562061 session18 "$part" ;;
  esac
done
