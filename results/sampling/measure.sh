#!/usr/bin/env bash
# One session's measurements for issue 20, run alone on the host, from the repository root (sessions 16 on; sessions
# 12-15 kept their own copies of this logic as their record):
#   bash results/sampling/measure.sh BEFORE TAG [bench|final|cold|final_default|numerics|default|decode_attention]...
# BEFORE: the commit of the code before, checked out in a worktree; after = this checkout; TAG names the files.
# bench: benchmarks/sampling.py, before then after (TAG_before.txt, TAG_after.txt);
# final: the benchmark again on this checkout alone (TAG_final.txt);
# cold: the benchmark with --cold, no call reusing an earlier one's cache memory (TAG_cold.txt);
# final_default: the default run on this checkout alone (appended to TAG_default.txt);
# numerics: zero-shot on all of MBPPTest x 10, fp32, default engine, seed 0 (zero_shot_seed0_float32_TAG.json);
# decode_attention: benchmarks/decode_attention.py, the decode kernel at the host's width against 8 lanes
#   (TAG_decode_attention.txt);
# default: the default `python -m ilf_lab` from a cold stage cache (model already converted), before then after
#   (appended to TAG_default.txt).
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: measure.sh BEFORE TAG [bench|final|cold|final_default|numerics|default|decode_attention]..." >&2; exit 2; }
rev=$1 tag=$2; shift 2
cd "$(dirname "$0")/../.."
export ILF_LAB_DATA_DIR=${ILF_LAB_DATA_DIR:-$(realpath ../shared/data)}
cache=${ILF_LAB_CACHE_DIR:-/work/cache20}  # holds the converted SmolLM2
out=$(pwd)/results/sampling
before=/tmp/${tag}_before
parts=("$@"); [ ${#parts[@]} -gt 0 ] || parts=(bench numerics default)
if [[ " ${parts[*]} " == *" bench "* || " ${parts[*]} " == *" default "* ]]; then
  [ -d "$before" ] || git worktree add -f "$before" "$rev" >/dev/null
fi
for part in "${parts[@]}"; do
  case $part in
    bench)
      (cd "$before" && PYTHONPATH=$before python benchmarks/sampling.py --cache-dir "$cache") > "$out/${tag}_before.txt"
      python benchmarks/sampling.py --cache-dir "$cache" > "$out/${tag}_after.txt"
      ;;
    final) python benchmarks/sampling.py --cache-dir "$cache" > "$out/${tag}_final.txt" ;;
    cold) python benchmarks/sampling.py --cache-dir "$cache" --cold > "$out/${tag}_cold.txt" ;;
    decode_attention) python benchmarks/decode_attention.py > "$out/${tag}_decode_attention.txt" ;;
    default)
      echo "before ($rev) and after ($(git rev-parse --short HEAD)), back to back:" >> "$out/${tag}_default.txt"
      (cd "$before" && PYTHONPATH=$before bash "$out/cold_default_run.sh" "$cache" "$out/${tag}_default.txt")
      bash "$out/cold_default_run.sh" "$cache" "$out/${tag}_default.txt"
      ;;
    final_default)
      echo "final code ($(git rev-parse --short HEAD)), alone:" >> "$out/${tag}_default.txt"
      bash "$out/cold_default_run.sh" "$cache" "$out/${tag}_default.txt"
      ;;
    numerics)
      ILF_LAB_CACHE_DIR=$cache python -m ilf_lab experiment=zero_shot logger=none data.max_test_tasks=null \
        sampling.n=10 model.dtype=float32 seed=0 hydra.run.dir="/tmp/${tag}_zero_shot_0"
      cp "/tmp/${tag}_zero_shot_0/results.json" "$out/zero_shot_seed0_float32_${tag}.json"
      ;;
    *) echo "error: unknown part $part (bench, final, cold, final_default, numerics, default or decode_attention)" >&2; exit 2 ;;
  esac
done
