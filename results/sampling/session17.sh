#!/usr/bin/env bash
# Session 17's measurements for issue 20 (the engine's code as in a2f9318; the benchmark now repeats its calls), run
# alone on the host, from the repository root:   bash results/sampling/session17.sh [final|final_default]...
# final: the benchmark, 3 engine calls per set, each with its roofline measured right after it (session17_final.txt);
# final_default: the default `python -m ilf_lab` from a cold stage cache, model converted (session17_default.txt).
# The parts run in order and stop at the first failure (set -e): a benchmark whose calls' samples differ exits 1.
[ $# -gt 0 ] || set -- final final_default
exec bash "$(dirname "$0")/measure.sh" a2f9318 session17 "$@"
