#!/usr/bin/env bash
# Session 21's measurements for issue 20 (the Zen 5 / AVX-512 host of sessions 18-20), run alone, from the
# repository root:
#   bash results/sampling/session21.sh [bench|final|default]...
# bench: the benchmark on 09a097d (session 20's last commit) then on this checkout, back to back
#   (session21_before.txt, session21_after.txt);
# final: the benchmark again on this checkout alone (session21_final.txt);
# default: the default `python -m ilf_lab` from a cold stage cache, model converted, 09a097d then this checkout,
#   back to back (session21_default.txt).
set -euo pipefail
[ $# -gt 0 ] || set -- bench default
exec bash "$(dirname "$0")/measure.sh" 09a097d session21 "$@"
