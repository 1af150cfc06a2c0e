"""Zero-shot HumanEval pass@1 of SmolLM2-135M-Instruct (greedy and sampled), through our engine and sandbox.

Why: a held-out reference point for the MBPP-trained ILF models, measured by the same prompt formats,
sampling engine and sandbox. On a 2-core CPU the 164 problems do not fit a short run, so every phase has a
wall-clock budget and works through the problems in order, in chunks, until its budget is spent; the
problems each phase covered are printed with its number (the first N problems, not a random subset).

Last line, JSON: metric = greedy chat pass@1; baseline = greedy docstring pass@1 on the same first-N problems
(both formats' greedy runs cover a common prefix); when the docstring phase is skipped, the sampled chat
pass@1 (T=0.8) on its problems. Every phase's numbers are in "phases".

    python benchmarks/zero_shot_humaneval.py [--budget-s 600] [--formats chat,docstring] [--samples 5]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import torch

from ilf_lab.data.humaneval import (
    Problem,
    humaneval_item,
    humaneval_program,
    humaneval_prompt,
    humaneval_stops,
    load_humaneval,
)
from ilf_lab.execution import mean_pass_at_k, run_programs
from ilf_lab.generation import SamplingParams, make_engine

CACHE = os.environ.get("ILF_LAB_CACHE_DIR", ".cache/ilf_lab")


def run_phase(
    engine: Any,
    tok: Any,
    problems: list[Problem],
    fmt: str,
    params: SamplingParams,
    budget_s: float,
    chunk: int,
) -> dict[str, Any]:
    """Generate + execute chunk by chunk until the next chunk would overrun `budget_s` (estimated from the
    slowest chunk so far); returns pass@1 over the problems done."""
    t0 = time.perf_counter()
    counts: list[tuple[int, int]] = []
    slowest = 0.0
    for start in range(0, len(problems), chunk):
        if counts and time.perf_counter() - t0 + slowest > budget_s:
            break
        t = time.perf_counter()
        batch = problems[start : start + chunk]
        outs = engine.generate([humaneval_prompt(p, fmt, tok) for p in batch], params)
        items = [
            humaneval_item(p, humaneval_program(p, c, fmt))
            for p, o in zip(batch, outs, strict=True)
            for c in o
        ]
        verdicts = run_programs(items, timeout=10.0, workers=2)
        for i in range(len(batch)):
            counts.append((params.n, sum(v.passed for v in verdicts[i * params.n : (i + 1) * params.n])))
        slowest = max(slowest, time.perf_counter() - t)
        print(
            f"  {fmt} T={params.temperature} n={params.n}: {len(counts)}/{len(problems)} problems, "
            f"{sum(c for _, c in counts)} passing samples, {time.perf_counter() - t0:.0f} s",
            flush=True,
        )
    return {
        "format": fmt,
        "temperature": params.temperature,
        "n": params.n,
        "problems": len(counts),
        "pass@1": mean_pass_at_k(counts, 1),
        "solved": sum(c > 0 for _, c in counts),
        "seconds": round(time.perf_counter() - t0, 1),
        "per_problem": [c for _, c in counts],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-s", type=float, default=600.0, help="wall clock for all phases together")
    ap.add_argument("--formats", default="chat,docstring", help="greedy phases, in order (chat first)")
    ap.add_argument("--samples", type=int, default=5, help="n for the sampled chat phase (0 = skip it)")
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--max-new-tokens", type=int, default=320)
    ap.add_argument("--chunk", type=int, default=16, help="problems per generate call")
    ap.add_argument("--limit", type=int, default=None, help="only the first N problems")
    # 1 thread: on a shared 2-core box, 2 torch threads were ~6x slower per step than 1 (oversubscription)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    from ilf_lab.models.loading import load_model, model_config, resolve_model_dir

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    path = resolve_model_dir(model_config("smollm2_135m_instruct"), CACHE)
    model, tok = load_model(path)
    engine = make_engine("hf", path, model=model, tokenizer=tok)
    problems = load_humaneval()[: args.limit]
    formats = [f for f in args.formats.split(",") if f]
    # budget shares: greedy chat first and largest; docstring replies stop early, so it needs less
    shares = {"chat": 0.45, "docstring": 0.2}
    sampled_share = 0.35 if args.samples else 0.0
    total = sum(shares.get(f, 0.2) for f in formats) + sampled_share
    print(
        f"SmolLM2-135M-Instruct zero-shot HumanEval ({len(problems)} problems), budget {args.budget_s:.0f} s"
    )

    phases = []
    for fmt in formats:
        params = SamplingParams(
            n=1, temperature=0.0, max_new_tokens=args.max_new_tokens, stop=humaneval_stops(fmt), seed=0
        )
        budget = args.budget_s * shares.get(fmt, 0.2) / total
        phases.append(run_phase(engine, tok, problems, fmt, params, budget, args.chunk))
    if args.samples:
        params = SamplingParams(
            n=args.samples,
            temperature=args.temperature,
            top_p=0.95,
            max_new_tokens=args.max_new_tokens,
            stop=humaneval_stops("chat"),
            seed=0,
        )
        left = args.budget_s - (time.perf_counter() - t0)
        phases.append(run_phase(engine, tok, problems, "chat", params, left, max(1, args.chunk // 2)))

    for ph in phases:
        print(
            f"{ph['format']:9s} T={ph['temperature']:<3} n={ph['n']}  pass@1 {ph['pass@1']:.4f} "
            f"({ph['solved']}/{ph['problems']} problems solved by some sample, {ph['seconds']} s)"
        )

    greedy = {ph["format"]: ph for ph in phases if ph["temperature"] == 0}
    main_ph = greedy.get("chat") or phases[0]
    value = main_ph["pass@1"]
    if "docstring" in greedy and main_ph is not greedy["docstring"]:
        m = min(main_ph["problems"], greedy["docstring"]["problems"])
        value = sum(main_ph["per_problem"][:m]) / m
        baseline = sum(greedy["docstring"]["per_problem"][:m]) / m
        baseline_is = f"greedy docstring pass@1 on the first {m} problems (value on the same {m})"
    elif len(phases) > 1:
        baseline, baseline_is = phases[-1]["pass@1"], "sampled chat pass@1 (T, n in phases)"
        m = main_ph["problems"]
    else:
        baseline, baseline_is, m = None, "none", main_ph["problems"]
    for ph in phases:
        ph.pop("per_problem")
    print(
        json.dumps(
            {
                "metric": "humaneval_zero_shot_pass@1_greedy_chat",
                "value": round(value, 4),
                "baseline": None if baseline is None else round(baseline, 4),
                "ratio": None if not baseline else round(value / baseline, 3),
                "unit": "fraction of problems",
                "baseline_is": baseline_is,
                "problems_compared": m,
                "model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantised to fp32)",
                "max_new_tokens": args.max_new_tokens,
                "threads": args.threads,
                "phases": phases,
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
