#!/usr/bin/env bash
# Session 11's measurements for issue 20 on a 2-core AVX2-only EPYC (no AVX-512, no VNNI), run alone on the host,
# from the repository root:   bash results/sampling/session11.sh [bench|default|numerics|int8probe]...
# bench: the benchmark with F.linear (aten, the engine before this session) and with the new default (oneDNN
#   packed weights); session11_fp32_aten.txt itself was made by session 10's benchmark at ba9000a (no
#   --cpu-linear flag yet, F.linear roofline only), before the change, with `python benchmarks/sampling.py`;
# default: the default `python -m ilf_lab` from a cold stage cache (model already converted) with this checkout
#   (the run before, at ba9000a, is session11_default.txt's first line: same host, same session);
# numerics: zero-shot on all of MBPPTest x 10, fp32, default engine, seed 0: the sample seeds of session 10's
#   zero_shot_seed0_float32_runs.json (F.linear), compared task by task;
# int8probe: the int8 GEMM against fp32 at the decode shapes on this host (why int8 now warns where it is slower).
set -euo pipefail
cd "$(dirname "$0")/../.."
export ILF_LAB_DATA_DIR=${ILF_LAB_DATA_DIR:-../shared/data}
cache=${ILF_LAB_CACHE_DIR:-/work/cache20}  # holds the converted SmolLM2
out=results/sampling
parts=("$@"); [ ${#parts[@]} -gt 0 ] || parts=(bench default numerics int8probe)
for part in "${parts[@]}"; do
  case $part in
    bench)
      python benchmarks/sampling.py --cpu-linear aten --cache-dir "$cache" > $out/session11_fp32_aten.txt
      python benchmarks/sampling.py --cache-dir "$cache" > $out/session11_fp32_onednn.txt
      ;;
    default)
      echo "after: $(git rev-parse --short HEAD) (this checkout)" >> $out/session11_default.txt
      bash $out/cold_default_run.sh "$cache" $out/session11_default.txt
      ;;
    numerics)
      ILF_LAB_CACHE_DIR=$cache python -m ilf_lab experiment=zero_shot logger=none data.max_test_tasks=null \
        sampling.n=10 model.dtype=float32 seed=0 hydra.run.dir=/tmp/s11_zero_shot_0
      cp /tmp/s11_zero_shot_0/results.json $out/zero_shot_seed0_float32_onednn.json
      ;;
    int8probe)
      python - > $out/session11_int8_probe.txt <<'PY'
import sys; sys.path.insert(0, "benchmarks")
import torch
from roofline import mm_gflops
print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, 2 threads, 128 rows")
for k, n in ((576, 576), (576, 1536), (1536, 576), (576, 49152)):
    r = {kind: mm_gflops(128, k, n, kind=kind) for kind in ("aten", "onednn", "int8")}
    print(f"{k:>5} -> {n:>5}: " + ", ".join(f"{kind} {g:.1f}" for kind, g in r.items()) + " GFLOP/s")
PY
      ;;
    *) echo "error: unknown part $part (bench, default, numerics or int8probe)" >&2; exit 2 ;;
  esac
done
