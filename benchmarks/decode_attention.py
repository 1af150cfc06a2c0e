"""Benchmark: the decode attention kernel at the host's vector width against the same kernel at 8 lanes, same run.

On an AVX-512 host `csrc/attend.h` runs the decode kernel's forms (`attend`, `attend_blocked`) on 16 float lanes
with tiles sized for 32 vector registers (elsewhere on 8 lanes and 16 registers, and both builds below are then the
same code). This builds `csrc/decode_attention.cpp` twice with the engine's flags, once with `-DILF_DECODE_V8` (8
lanes and the 16-register tiles anyway: an AVX2 host's code, though the compiler may still use all 32 registers),
loads both, and times one decode step's 30 layers in pairs on the same
random cache, each build first in every other pair (a refine-like shape by default: 32 prompts x 8 rows, prompt
lengths around 354, 64 generated columns a row). The host's speed drifts within minutes, so each pair is a ratio
and the median ratio is reported.

    python benchmarks/decode_attention.py [--pairs 8] [--prompts 32] [--rows 8] [--prompt-len 354] [--own 64]

Prints human-readable lines, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from ilf_lab.generation.attention import DecodeAttention, kernel_store
from ilf_lab.generation.kernels import CSRC, SIGNATURES, _compiler, _features, flags, march


def build(out: Path, extra: tuple[str, ...]):
    """decode_attention.cpp compiled with the engine's flags (kernels.py) plus `extra`, loaded with its signature."""
    cxx = _compiler()
    if cxx is None:
        raise SystemExit("error: no C++ compiler (g++, c++ or clang++) on PATH")
    subprocess.run([cxx, *flags(), *extra, "-o", str(out), str(CSRC / "decode_attention.cpp")], check=True, timeout=180)
    fn = ctypes.CDLL(str(out)).ilf_decode_attention
    fn.argtypes, fn.restype = SIGNATURES["ilf_decode_attention"], ctypes.c_int
    return fn


def build_lanes() -> int:
    """The decode kernel's lanes in the host build: 16 where the engine's -march target defines __AVX512F__
    (attend.h)."""
    return 16 if "__AVX512F__" in _features(_compiler(), march()) else 8


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--rows", type=int, default=8, help="rows (samples) per prompt")
    ap.add_argument("--prompt-len", type=int, default=354, help="mean prompt length (they spread +-150, >= 1)")
    ap.add_argument("--own", type=int, default=64, help="generated columns each row reads")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    for name in ("pairs", "prompts", "rows", "prompt_len", "own", "layers", "threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    kvh, g, hd = 3, 3, 64  # SmolLM2-135M: 9 query heads over 3 kv heads of 64
    lens = [max(1, args.prompt_len + (p * 37) % 300 - 150) for p in range(args.prompts)]
    pkv = kernel_store(torch.randn(args.layers, 2, args.prompts, kvh, max(lens), hd))  # keys blocked
    kv = torch.randn(args.layers, 2, args.prompts * args.rows, kvh, args.own, hd)
    q = torch.randn(args.prompts * args.rows, kvh * g, 1, hd)
    row_prompt = [p for p in range(args.prompts) for _ in range(args.rows)]
    with tempfile.TemporaryDirectory() as tmp:
        fns = {"host": build(Path(tmp) / "host.so", ()), "v8": build(Path(tmp) / "v8.so", ("-DILF_DECODE_V8",))}
        att = {k: DecodeAttention(pkv, kv, kvh * g, fn=f) for k, f in fns.items()}
        plans = {k: a.plan(row_prompt, lens, [args.own] * len(row_prompt)) for k, a in att.items()}
        outs = {k: att[k](0, q, plans[k], 0.125) for k in att}
        diff = (outs["host"] - outs["v8"]).abs().max().item()
        times: dict[str, list[float]] = {k: [] for k in att}
        for pair in range(args.pairs):
            for k in (("host", "v8") if pair % 2 == 0 else ("v8", "host")):  # each build first in half the pairs
                t0 = time.perf_counter()
                for i in range(args.layers):
                    att[k](i, q, plans[k], 0.125)
                times[k].append(time.perf_counter() - t0)
    ratios = [b / a for a, b in zip(times["host"], times["v8"], strict=True)]
    lanes = build_lanes()
    print(f"decode attention, {args.prompts} prompts x {args.rows} rows, prompt length ~{args.prompt_len}, "
          f"{args.own} own columns, {args.layers} layers, {args.threads} threads; host width {lanes} lanes")
    for k in att:
        print(f"  {k:4s}: median {1e3 * statistics.median(times[k]):.1f} ms a step (min {1e3 * min(times[k]):.1f})")
    print(f"  8-lane time / host-width time, per pair: {' '.join(f'{r:.2f}' for r in ratios)}; "
          f"median {statistics.median(ratios):.2f}; outputs differ by at most {diff:.1e}")
    value, baseline = 1 / statistics.median(times["host"]), 1 / statistics.median(times["v8"])
    print(json.dumps({"metric": "decode_attention_steps_per_s", "value": round(value, 3),
                      "baseline": round(baseline, 3), "ratio": round(value / baseline, 3), "unit": "steps/s",
                      "baseline_is": "the same kernel built with 8 lanes (-DILF_DECODE_V8)", "lanes": lanes,
                      "pair_ratios": [round(r, 3) for r in ratios], "pair_ratio_median": round(statistics.median(ratios), 3),
                      "max_abs_diff": diff, "layers": args.layers}))

if __name__ == "__main__":
    main()
