"""Sampling throughput: our HF engine vs plain `model.generate`, SmolLM2-135M-Instruct on MBPP chat prompts.

Counts only kept tokens (tokens of the returned completions after stop cutting), the same way for both. Prints
human-readable lines, then one JSON object as the last line (metric, value, baseline, ratio, unit, ...).

    python benchmarks/sampling.py                       # 64 prompts (tasks 11..74) x n=8, 128 new tokens
    python benchmarks/sampling.py --prompts 8 --n 4 --max-new-tokens 64
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

GFLOP_PER_TOKEN = 0.27  # 2 x 135M parameters (SmolLM2-135M)


def mm_gflops(m: int = 128, k: int = 576, n: int = 1536, trials: int = 5, seconds: float = 0.4) -> float:
    """fp32 matmul throughput at a decode-step shape of this model (rows x hidden x MLP width); best of a
    few short trials, so a moment of contention from another process does not define the roofline."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    for _ in range(5):
        torch.mm(a, b)
    best = 0.0
    for _ in range(trials):
        it, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            torch.mm(a, b)
            it += 1
        best = max(best, 2 * m * k * n * it / (time.perf_counter() - t0) / 1e9)
    return best


def kept_tokens(tok, completions: list[list[str]]) -> int:
    return sum(len(tok(c, add_special_tokens=False)["input_ids"]) for o in completions for c in o)


def run_baseline(model, tok, prompts, n, max_new, stops, temperature, top_p, batch_seqs=16):
    """Plain HF sampling: model.generate(do_sample, num_return_sequences) over batches of `batch_seqs`
    sequences, stop_strings, then the same post-hoc stop cut as the engine's contract."""
    from ilf_lab.generation.sampling import cut_at_stop

    tok.padding_side = "left"
    per_call = max(1, batch_seqs // n)
    out = []
    torch.manual_seed(0)
    for i in range(0, len(prompts), per_call):
        enc = tok(prompts[i : i + per_call], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            gen = model.generate(
                **enc,
                do_sample=True,
                temperature=temperature,
                top_p=top_p,
                top_k=None,
                num_return_sequences=n,
                max_new_tokens=max_new,
                stop_strings=list(stops),
                tokenizer=tok,
                pad_token_id=tok.pad_token_id,
            )
        new = gen[:, enc["input_ids"].shape[1] :]
        eos = tok.eos_token_id
        texts = [tok.decode([t for t in row.tolist() if t != eos], skip_special_tokens=False) for row in new]
        texts = [cut_at_stop(t, stops) for t in texts]
        out.extend(texts[j * n : (j + 1) * n] for j in range(len(texts) // n))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument(
        "--baseline-prompts", type=int, default=8, help="plain generate is slow: run it on a subset"
    )
    ap.add_argument("--batch-size", type=int, default=None, help="engine rows (default: automatic)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-dir", default=os.environ.get("ILF_LAB_CACHE_DIR", ".cache/ilf_lab"))
    ap.add_argument("--data-dir", default=os.environ.get("ILF_LAB_DATA_DIR"), help="dir with mbpp/mbpp.jsonl")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from omegaconf import OmegaConf

    from ilf_lab.data.mbpp import load_mbpp
    from ilf_lab.data.prompts import stop_sequences, task_prompt
    from ilf_lab.generation import SamplingParams
    from ilf_lab.generation.hf import HFEngine
    from ilf_lab.models.loading import load_model, model_config, resolve_model_dir

    path = resolve_model_dir(model_config("smollm2_135m_instruct"), args.cache_dir)
    model, tok = load_model(path, "float32")
    tasks = load_mbpp(OmegaConf.create({"dir": args.data_dir}))
    ids = list(range(11, 11 + args.prompts))
    prompts = [task_prompt(tasks[i], "chat", tok) for i in ids]
    stops = stop_sequences("chat")
    params = SamplingParams(
        n=args.n, temperature=args.temperature, top_p=0.95, max_new_tokens=args.max_new_tokens, stop=stops
    )
    gflops = mm_gflops()
    print(f"fp32 torch.mm [128x576]x[576x1536], {args.threads} threads: {gflops:.1f} GFLOP/s")

    engine = HFEngine(model, tok, batch_size=args.batch_size)
    t0 = time.perf_counter()
    out = engine.generate(prompts, params, progress=True)
    dt = time.perf_counter() - t0
    kept = kept_tokens(tok, out)
    value = kept / dt
    stats = engine.last_stats
    print(
        f"engine ({engine.backend}, batch {stats['batch_size']}): {len(prompts)} prompts x n={args.n}: "
        f"{kept} kept tokens ({stats['generated_tokens']} generated) in {dt:.1f} s = {value:.1f} tok/s"
    )

    nb = min(args.baseline_prompts, len(prompts))
    t0 = time.perf_counter()
    base_out = run_baseline(
        model, tok, prompts[:nb], args.n, args.max_new_tokens, stops, args.temperature, 0.95
    )
    bdt = time.perf_counter() - t0
    bkept = kept_tokens(tok, base_out)
    baseline = bkept / bdt
    print(
        f"baseline model.generate (16 sequences/batch): {nb} prompts: {bkept} kept tokens in {bdt:.1f} s "
        f"= {baseline:.1f} tok/s"
    )
    gflops = max(gflops, mm_gflops())  # again after the runs: the better of the two is the roofline
    print(f"fp32 torch.mm roofline (best before/after): {gflops:.1f} GFLOP/s")
    share = value * GFLOP_PER_TOKEN / gflops
    print(
        f"ratio {value / baseline:.2f}x; engine reaches {100 * share:.0f}% of the matmul roofline "
        f"({GFLOP_PER_TOKEN} GFLOP/token)"
    )
    print(
        json.dumps(
            {
                "metric": "sampling_kept_tokens_per_s",
                "value": round(value, 2),
                "baseline": round(baseline, 2),
                "ratio": round(value / baseline, 3),
                "unit": "tok/s",
                "prompts": len(prompts),
                "n": args.n,
                "max_new_tokens": args.max_new_tokens,
                "baseline_prompts": nb,
                "engine_seconds": round(dt, 1),
                "engine_kept_tokens": kept,
                "engine_generated_tokens": stats["generated_tokens"],
                "batch_size": stats["batch_size"],
                "baseline_seconds": round(bdt, 1),
                "baseline_kept_tokens": bkept,
                "mm_gflops": round(gflops, 1),
                "roofline_share": round(share, 3),
                "threads": args.threads,
                "load_avg_1m": round(os.getloadavg()[0], 2),
            }
        )
    )


if __name__ == "__main__":
    main()
