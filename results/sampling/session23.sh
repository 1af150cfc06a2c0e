#!/usr/bin/env bash
# Session 23's measurements for issue 20, run alone, from the repository root:
#   bash results/sampling/session23.sh [slow_default|slow_default_before|slow_bench]...
# An ~80 GFLOP/s host, emulated on this one (the Zen 5 / AVX-512 host of sessions 18-22): oneDNN held to SSE4.1,
# MKL to its compatible (SSE2) code path, ATen's own kernels to no vector unit, the ilf_lab C++ kernels built as
# an AVX2 host builds them (-march=x86-64-v3). The decode-shape fp32 matmul then measures ~91 GFLOP/s on 2 threads
# (the benchmark prints it). Not emulated: this host's memory bandwidth and clock (Python, Lightning, the test
# runs), so a real slow host is slower still where those matter. Numerics follow the ISA, so samples may differ
# from the unrestricted run's. The first runs (files *_native_kernels.txt) kept the C++ kernels -march=native.
# slow_default: the default `python -m ilf_lab` from a cold stage cache, model converted (session23_slow_default.txt);
# slow_default_before: the same on 7afa11a (before.txt's engine) from a worktree (session23_slow_default_before.txt);
# slow_bench: the sampling benchmark, one call per set (session23_slow_bench.txt).
set -euo pipefail
[ $# -gt 0 ] || set -- slow_default slow_bench slow_default_before
here=$(dirname "$0")
cache=${ILF_LAB_CACHE_DIR:-/work/cache21}
export ONEDNN_MAX_CPU_ISA=SSE41 MKL_CBWR=COMPATIBLE ATEN_CPU_CAPABILITY=default ILF_LAB_KERNEL_MARCH=x86-64-v3
for part in "$@"; do
  case $part in
    slow_default)
      echo "emulated slow host: ONEDNN_MAX_CPU_ISA=$ONEDNN_MAX_CPU_ISA MKL_CBWR=$MKL_CBWR ATEN_CPU_CAPABILITY=$ATEN_CPU_CAPABILITY ILF_LAB_KERNEL_MARCH=$ILF_LAB_KERNEL_MARCH, $(git rev-parse --short HEAD)" \
        > "$here/session23_slow_default.txt"
      bash "$here/cold_default_run.sh" "$cache" "$here/session23_slow_default.txt"
      ;;
    slow_default_before)
      out=$(realpath "$here")/session23_slow_default_before.txt wt=/tmp/session23_before
      [ -d $wt ] || git worktree add -f $wt 7afa11a > /dev/null
      echo "emulated slow host: ONEDNN_MAX_CPU_ISA=$ONEDNN_MAX_CPU_ISA MKL_CBWR=$MKL_CBWR ATEN_CPU_CAPABILITY=$ATEN_CPU_CAPABILITY, before = 7afa11a (the engine when #20 was filed; no C++ kernels)" > "$out"
      (cd $wt && PYTHONPATH=$wt bash "$(realpath "$here")/cold_default_run.sh" "$cache" "$out")
      git worktree remove --force $wt
      ;;
    slow_bench)
      { echo "emulated slow host, $(git rev-parse --short HEAD)"
        python benchmarks/sampling.py --cache-dir "$cache" --repeats 1 --baseline-prompts 2; } > "$here/session23_slow_bench.txt"
      ;;
    *) echo "unknown part $part" >&2; exit 2 ;;
  esac
done
