#!/usr/bin/env bash
# Copy the machine-readable records of finished runs (results.json, perplexity.jsonl, and ilf_lab.a1's
# a1_args.json, which lets a resumed a1 keep them; no samples, no checkpoints) from a run folder into a results/
# folder, keeping their relative paths, e.g.
#   scripts/publish_runs.sh /work/runs19/a1/table results/cpu_powered/runs
# Only results.json files of finished runs are copied; a copy that would change a committed file says so.
set -euo pipefail
src=${1:?usage: scripts/publish_runs.sh RUN_DIR RESULTS_DIR}; dst=${2:?usage: scripts/publish_runs.sh RUN_DIR RESULTS_DIR}
[ -d "$src" ] || { echo "error: $src is not a folder" >&2; exit 2; }
n=0
while IFS= read -r -d '' f; do
  rel=${f#"$src"/}; dir=$(dirname "$rel")
  mkdir -p "$dst/$dir"
  for name in results.json perplexity.jsonl a1_args.json; do
    [ -f "$src/$dir/$name" ] || continue
    if [ -f "$dst/$dir/$name" ] && ! cmp -s "$src/$dir/$name" "$dst/$dir/$name"; then echo "replaced $dst/$dir/$name"; fi
    cp "$src/$dir/$name" "$dst/$dir/$name"
  done
  n=$((n + 1))
done < <(find "$src" -name results.json -print0 | sort -z)
echo "published $n runs from $src into $dst"
