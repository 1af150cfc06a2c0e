#!/usr/bin/env bash
# Session 20's measurements for issue 20 (the Zen 5 / AVX-512 host of sessions 18-19), run alone, from the
# repository root:
#   bash results/sampling/session20.sh [final|cold|default]...
# final: the benchmark, 3 engine calls per set; calls after the first reuse the cache memory (session20_final.txt);
# cold: the same with --cold, every call's cache memory fresh, as before this session (session20_cold.txt);
# default: the default `python -m ilf_lab` from a cold stage cache, model converted, 691071f (session 19's last
#   commit) then this checkout, back to back (session20_default.txt).
set -euo pipefail
[ $# -gt 0 ] || set -- final cold default
exec bash "$(dirname "$0")/measure.sh" 691071f session20 "$@"
