"""Zero-shot pass@1 of SmolLM2-135M-Instruct on MBPP test tasks (11-110), both prompt formats, through the
sandbox (all test_list asserts + test_setup_code). Greedy pass@1, and pass@1 estimated from n samples at T>0
(unbiased estimator, mean over tasks).

Prints a table, then one JSON object as the last line: metric=pass@1 (chat, greedy), baseline = docstring.

    python benchmarks/zero_shot_mbpp.py                 # greedy + T=0.8 n=5, both formats
    python benchmarks/zero_shot_mbpp.py --n 0           # greedy only
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--first", type=int, default=11)
    ap.add_argument("--last", type=int, default=110)
    ap.add_argument("--formats", default="docstring,chat")
    ap.add_argument("--n", type=int, default=5, help="samples at --temperature (0: greedy only)")
    ap.add_argument("--sample-formats", default=None, help="formats to sample (default: --formats)")
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-dir", default=os.environ.get("ILF_LAB_CACHE_DIR", ".cache/ilf_lab"))
    ap.add_argument("--data-dir", default=os.environ.get("ILF_LAB_DATA_DIR"), help="dir with mbpp/mbpp.jsonl")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from omegaconf import OmegaConf

    from ilf_lab.data.mbpp import load_mbpp
    from ilf_lab.data.prompts import program_from_completion, stop_sequences, task_prompt
    from ilf_lab.execution import run_programs
    from ilf_lab.execution.passk import mean_pass_at_k
    from ilf_lab.generation import SamplingParams, make_engine
    from ilf_lab.models.loading import model_config, resolve_model_dir

    path = resolve_model_dir(model_config("smollm2_135m_instruct"), args.cache_dir)
    engine = make_engine("hf", path)
    all_tasks = load_mbpp(OmegaConf.create({"dir": args.data_dir}))
    tasks = [all_tasks[i] for i in range(args.first, args.last + 1)]
    formats = args.formats.split(",")
    sample_formats = args.sample_formats.split(",") if args.sample_formats else formats
    runs = [
        (f, SamplingParams(temperature=0, max_new_tokens=args.max_new_tokens, stop=stop_sequences(f)))
        for f in formats
    ]
    if args.n > 0:
        runs += [
            (
                f,
                SamplingParams(
                    n=args.n,
                    temperature=args.temperature,
                    top_p=0.95,
                    max_new_tokens=args.max_new_tokens,
                    stop=stop_sequences(f),
                    seed=0,
                ),
            )
            for f in sample_formats
        ]
    results = {}
    for fmt, params in runs:
        t0 = time.perf_counter()
        # a task the format cannot prompt (prompts.code_prefix finds no signature) counts as failed
        ok, prompts = [], []
        for t in tasks:
            try:
                prompts.append(task_prompt(t, fmt, engine.tokenizer))
                ok.append(t)
            except ValueError as e:
                print(f"{fmt}: task counted as failed ({e})", flush=True)
        outs = engine.generate(prompts, params, progress=True)
        gen_s = time.perf_counter() - t0
        n = 1 if params.greedy else params.n
        items = [
            {
                "task_id": t.task_id,
                "program": program_from_completion(t, c, fmt),
                "tests": list(t.tests),
                "setup": t.setup,
            }
            for t, o in zip(ok, outs, strict=True)
            for c in o[:n]
        ]
        verdicts = run_programs(items, timeout=10.0)
        counts = [(n, sum(v.passed for v in verdicts[i * n : (i + 1) * n])) for i in range(len(ok))]
        counts += [(n, 0)] * (len(tasks) - len(ok))
        p1 = mean_pass_at_k(counts, 1)
        key = f"{fmt} {'greedy' if params.greedy else f'T={params.temperature} n={n}'}"
        results[key] = {
            "pass@1": round(p1, 4),
            "unpromptable": len(tasks) - len(ok),
            "solved": sum(c > 0 for _, c in counts),
            "tasks": len(tasks),
            "gen_seconds": round(gen_s, 1),
        }
        print(
            f"{key:28s} pass@1 {100 * p1:5.1f}%  tasks with a pass {results[key]['solved']}/{len(tasks)}  "
            f"(generation {gen_s:.0f} s)",
            flush=True,
        )
    chat, doc = results.get("chat greedy"), results.get("docstring greedy")
    value = chat["pass@1"] if chat else None
    baseline = doc["pass@1"] if doc else None
    print(
        json.dumps(
            {
                "metric": "pass@1",
                "value": value,
                "baseline": baseline,
                "ratio": round(value / baseline, 3) if value is not None and baseline else None,
                "unit": "fraction (chat greedy vs docstring greedy)",
                "tasks": f"{args.first}-{args.last}",
                "runs": results,
            }
        )
    )


if __name__ == "__main__":
    main()
