#!/usr/bin/env bash
# Session 19's measurements for issue 20 (the Zen 5 / AVX-512 host of session 18), run alone, from the repository
# root:
#   bash results/sampling/session19.sh [numerics|final|decode_attention|final_default]...
# numerics: zero-shot on MBPPTest x 10, fp32, seed 0 (zero_shot_seed0_float32_session19.json; compare with
#   session 16's and sessions 13-15's);
# final: the benchmark, 3 engine calls per set (session19_final.txt; before: session18_final.txt and
#   session18_before.txt, same host type, an earlier day);
# decode_attention: the decode kernel at the host's width against 8 lanes (session19_decode_attention.txt);
# final_default: the default `python -m ilf_lab` from a cold stage cache, model converted (session19_default.txt).
# The same-run before/after of the decode kernel itself (this session's kernel against 89061f3's, alternating
# pairs) is in results/sampling/README.md ("Session 19").
set -euo pipefail
[ $# -gt 0 ] || set -- numerics final decode_attention final_default
exec bash "$(dirname "$0")/measure.sh" 89061f3 session19 "$@"
