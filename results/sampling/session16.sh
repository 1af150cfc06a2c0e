#!/usr/bin/env bash
# Session 16's measurements for issue 20 on a 2-core AVX2-only EPYC (sessions 11-15's host type), run alone on the
# host, from the repository root:   bash results/sampling/session16.sh [bench|final|default|numerics]...
# Before = session 15's code (commit c020753) in a worktree, after = this checkout, back to back in one session.
# bench: the benchmark, before and after (prefill's causal attention in a C++ kernel that computes only the unmasked
#   half; up to 256 decode rows on CPU, from 192);
# default: the default `python -m ilf_lab` from a cold stage cache (model already converted), before and after, back to
#   back;
# final: the benchmark again on the final code alone (session16_final.txt, b5cac45).
# numerics: zero-shot on all of MBPPTest x 10, fp32, default engine, seed 0 (the seeds of sessions 10-15's runs),
#   compared task by task with session 15's (zero_shot_seed0_float32_session15.json).
exec bash "$(dirname "$0")/measure.sh" c020753 session16 "$@"
