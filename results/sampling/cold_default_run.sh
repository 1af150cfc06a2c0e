#!/usr/bin/env bash
# One default `python -m ilf_lab` from a cold stage cache (only the converted models copied from CACHE), its wall
# time and its stages' seconds appended to OUT; used by session8.sh and session9.sh, from the repository root:
#   bash results/sampling/cold_default_run.sh CACHE OUT overrides...
set -euo pipefail
cache=${1:?usage: cold_default_run.sh CACHE OUT overrides...}; out=${2:?usage: cold_default_run.sh CACHE OUT overrides...}
shift 2
cold=$(mktemp -d /tmp/cold_default.XXXX); mkdir -p "$cold/models"
cp -r "$cache"/models/. "$cold/models/"
log=$cold.log
start=$(date +%s)
ILF_LAB_CACHE_DIR=$cold python -m ilf_lab logger=none "$@" hydra.run.dir="$cold/run" > "$log" 2>&1
echo "default run, $*: $(( $(date +%s) - start )) s wall" | tee -a "$out"
grep -E "stage .* ok .*ran" "$log" | sed 's/^.*stage/stage/' | cut -c1-120 >> "$out"
rm -rf "$cold" "$log"
