"""Sampling throughput and where it goes: our HF engine vs plain `model.generate`, SmolLM2-135M-Instruct at T=0.8.

Two prompt sets, both as the pipeline builds them: MBPP chat prompts (evaluation, x0 sampling) and refine prompts
(task, x0 and human feedback from the ILF annotations: long, n samples each). For each set it prints

* the roofline as the work sees it: fp32 GFLOP/s measured on this host at the decode step's own matmul shapes
  (the engine's batch rows x each linear layer), and the FLOPs per generated token (2 x parameters + attention
  at the run's mean context length);
* the engine's kept and generated tokens/s and the generated rate as a share of that roofline, over `--repeats`
  calls (3 by default), each with its roofline measured right after it: the median call by share is reported (of
  an even number, the lower of the two), every call's share listed, and the calls' samples compared (the same
  seed must give the same samples; the script exits 1 if they differ). Each call's page faults and system
  seconds are listed too: a call after the first reuses the cache memory an earlier one left (pages.KEPT), as
  the pipeline's later stages do, and `--cold` unmaps it before every call (as before session 20);
* the per-phase profile of the engine's call (prefill, the decode step's parts, token choice, stop checks);
* the baseline, `model.generate` at 16 sequences per call on the first `--baseline-prompts` prompts, and the
  ratio in kept tokens/s (kept = tokens of the returned completions after the stop cut, counted the same way);
* the ceiling: the share and ratio an ideal engine would reach with every matmul at the roofline, prefill
  included (the share does not count prefill's FLOPs, so on long prompts its cap is well under 100 %).

The last line is one JSON object (metric, value, baseline, ratio, unit, per-set details).

    python benchmarks/sampling.py                              # 32 chat + 32 refine prompts x n=8, 128 new tokens
    python benchmarks/sampling.py --sets chat --prompts 8 --n 4 --max-new-tokens 64
    python benchmarks/sampling.py --quantize int8             # the engine in int8 (baseline, roofline: fp32)
    python benchmarks/sampling.py --prompt-kv copy            # a prompt's KV copied into each sample's slot
    python benchmarks/sampling.py --cold                      # no call reuses an earlier call's cache memory
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time

import torch
from roofline import PREFILL_ROWS, attention_gflop_per_token, ceiling, prefill_gflop, roofline

from ilf_lab.generation.packed import onednn_available
from ilf_lab.generation.pages import KEPT
from ilf_lab.generation.phases import Phases


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


def prompt_sets(names, tok, data_dir: str | None, count: int) -> dict[str, list[str]]:
    from omegaconf import OmegaConf

    from ilf_lab.config import DataConfig
    from ilf_lab.data.mbpp import Annotation, load_annotation_records, load_mbpp
    from ilf_lab.data.prompts import refine_prompt, task_prompt

    data = OmegaConf.merge(OmegaConf.structured(DataConfig), {"dir": data_dir})
    tasks = load_mbpp(data)
    out = {}
    if "chat" in names:
        out["chat"] = [task_prompt(tasks[i], "chat", tok) for i in range(11, 11 + count)]
    if "refine" in names:
        anns = [Annotation.from_record(r) for r in load_annotation_records(data)]
        anns = sorted(anns, key=lambda a: a.task_id)[:count]
        out["refine"] = [refine_prompt(tasks[a.task_id], a.old_code, a.feedback, "chat", tok) for a in anns]
    return out


def engine_call(engine, prompts, params, model, tok, plen) -> dict:
    """One timed engine call with its own phase profile, then the roofline measured right after it at the call's
    mean decode rows (on a host whose speed drifts, each call is set against the host as it was then)."""
    engine.phases = Phases()
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    out = engine.generate(prompts, params)
    dt, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    stats = engine.last_stats
    gen_tokens, kept = int(stats["generated_tokens"]), kept_tokens(tok, out)
    rows = max(1, round(stats.get("rows_mean", stats["batch_size"])))  # mean active rows per decode step
    # the roofline is the host's fastest fp32 matmul at each decode shape: F.linear's (MKL), or oneDNN's with the
    # weight packed (what the engine calls by default) where this torch has it; before session 11 F.linear's only
    rates, lin_gflop = roofline(model, rows, ("aten", "onednn") if onednn_available() else ("aten",))
    context = sum(plen) / len(plen) + gen_tokens / (len(prompts) * params.n) / 2
    gflop = lin_gflop + attention_gflop_per_token(model, context)
    mm = rates["best"]  # per shape, the faster kind
    return {"out": out, "seconds": dt, "stats": stats, "rows": rows, "gen_tokens": gen_tokens, "kept": kept,
            "value": kept / dt, "gen_rate": gen_tokens / dt, "mm": mm, "mm_aten": rates["aten"],
            "mm_onednn": rates.get("onednn"), "lin_gflop": lin_gflop, "context": context, "gflop": gflop,
            "share": gen_tokens / dt * gflop / mm, "phases": engine.phases,
            "faults": r1.ru_minflt - r0.ru_minflt, "sys": r1.ru_stime - r0.ru_stime}


def bench_set(name, prompts, model, sampler, tok, args) -> dict:
    """`sampler` samples (the model, or its int8 copy); `model` runs the baseline and sets the roofline."""
    from ilf_lab.data.prompts import stop_sequences
    from ilf_lab.generation import SamplingParams
    from ilf_lab.generation.hf import HFEngine, encode_prompts, shared_prefix_len

    stops = stop_sequences("chat")
    params = SamplingParams(
        n=args.n,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        stop=stops,
    )
    ids = encode_prompts(tok, prompts)
    plen = [len(p) for p in ids]
    print(
        f"\n== {name} prompts: {len(prompts)} x n={args.n}, prompt tokens mean {sum(plen) / len(plen):.0f} "
        f"(min {min(plen)}, max {max(plen)}), T={args.temperature}, top_p={args.top_p}, "
        f"{args.max_new_tokens} new tokens"
    )
    engine = HFEngine(sampler, tok, batch_size=args.batch_size, prompt_kv=args.prompt_kv, cpu_linear=args.cpu_linear,
                      attention=args.attention, common_prefix=args.common_prefix)
    shared = shared_prefix_len(ids) if engine.common_prefix == "once" else 0  # prefilled once (slots.py)
    runs = []
    for _ in range(args.repeats):
        if args.cold:
            KEPT.drop()
        runs.append(engine_call(engine, prompts, params, model, tok, plen))
    same = all(r["out"] == runs[0]["out"] for r in runs)  # the same seed: the same samples, every call
    run = sorted(runs, key=lambda r: r["share"])[(len(runs) - 1) // 2]  # the median call by share (even: the lower)
    if len(runs) > 1:
        for i, r in enumerate(runs, 1):
            print(f"call {i}/{len(runs)}: {r['seconds']:.1f} s, {r['gen_rate']:.1f} generated tok/s, roofline "
                  f"{r['mm']:.1f} GFLOP/s at {r['rows']} rows = {100 * r['share']:.1f}%; {r['faults']} page faults, "
                  f"{r['sys']:.1f} s system")
        print(f"median call by share: {runs.index(run) + 1}; samples {'identical' if same else 'DIFFERENT'} "
              f"across the {len(runs)} calls")
    dt, stats, rows = run["seconds"], run["stats"], run["rows"]
    gen_tokens, kept, value, gen_rate = run["gen_tokens"], run["kept"], run["value"], run["gen_rate"]
    mm, mm_aten, mm_onednn, gflop, share = run["mm"], run["mm_aten"], run["mm_onednn"], run["gflop"], run["share"]
    lin_gflop, context = run["lin_gflop"], run["context"]
    print(
        f"roofline: the fastest fp32 matmul at the decode shapes ({rows} rows = the mean per decode step), "
        f"FLOP-weighted: {mm:.1f} GFLOP/s (F.linear {mm_aten:.1f}, oneDNN packed "
        f"{'n/a' if mm_onednn is None else f'{mm_onednn:.1f}'}); "
        f"{gflop:.3f} GFLOP per generated token ({lin_gflop:.3f} linear + attention at mean context {context:.0f})"
    )
    print(
        f"engine ({engine.backend}, prompt KV {engine.prompt_kv}, linear {engine.cpu_linear}, "
        f"attention {engine.attention}, common prefix {engine.common_prefix} ({shared} tokens), "
        f"{stats['batch_size']} slots): {kept} kept / {gen_tokens} generated tokens in {dt:.1f} s = "
        f"{value:.1f} kept tok/s, {gen_rate:.1f} generated tok/s = {100 * share:.0f}% of the roofline "
        f"({100 * gen_rate * gflop / mm_aten:.0f}% of F.linear's)"
    )
    own_share = None  # the same FLOPs at the engine's own lower-precision rate: how far it is from its own limit
    low = "int8" if args.quantize else "onednn_bf16" if engine.cpu_linear == "onednn_bf16" else None
    if low:
        mm_low = roofline(model, rows, (low,))[0][low]
        own_share = gen_rate * gflop / mm_low
        print(f"{low} roofline: the engine's own layer at the same shapes {mm_low:.1f} GFLOP/s (fp32-equivalent); "
              f"generated tok/s = {100 * own_share:.0f}% of it")
    print("profile (seconds, share of the call):")
    profile = {}
    for phase, sec, frac in run["phases"].table(dt):
        print(f"  {phase:<44} {sec:8.2f}  {100 * frac:5.1f}%")
        profile[phase] = round(sec, 2)
    nb = min(args.baseline_prompts, len(prompts))
    t0 = time.perf_counter()
    base_out = run_baseline(
        model, tok, prompts[:nb], args.n, args.max_new_tokens, stops, args.temperature, args.top_p
    )
    bdt = time.perf_counter() - t0
    bkept = kept_tokens(tok, base_out)
    baseline = bkept / bdt
    print(
        f"baseline model.generate (16 sequences/call), first {nb} prompts: {bkept} kept tokens in {bdt:.1f} s "
        f"= {baseline:.1f} tok/s; ratio {value / baseline:.2f}x"
    )
    # prefill's matmuls have a prompt's worth of rows: their own (higher) rate, or the ceiling would be too low
    mm_prefill = roofline(model, PREFILL_ROWS, ("aten", "onednn") if onednn_available() else ("aten",))[0]["best"]
    cap = ceiling(gen_tokens, kept, gflop, prefill_gflop(model, plen, shared), mm, baseline, mm_prefill)
    print(
        f"ceiling (every matmul at the roofline, prefill's at {mm_prefill:.1f} GFLOP/s ({PREFILL_ROWS} rows); "
        f"attention's memory traffic, sampling and Python "
        f"free): {cap['seconds']:.1f} s = at most {100 * cap['share']:.0f}% of the roofline and "
        f"{cap['ratio']:.2f}x model.generate; this engine reaches {cap['seconds'] / dt:.0%} of it"
    )
    return {
        "prompts": len(prompts),
        "prompt_tokens_mean": round(sum(plen) / len(plen), 1),
        "n": args.n,
        "value": round(value, 2),
        "generated_per_s": round(gen_rate, 2),
        "baseline": round(baseline, 2),
        "ratio": round(value / baseline, 3),
        "engine_seconds": round(dt, 1),
        "engine_kept_tokens": kept,
        "engine_generated_tokens": gen_tokens,
        "slots": int(stats["batch_size"]),
        "prompt_kv": engine.prompt_kv,
        "cpu_linear": engine.cpu_linear,
        "attention": engine.attention,
        "common_prefix": engine.common_prefix,
        "common_prefix_tokens": shared,
        "rows_mean_per_step": rows,
        "baseline_prompts": nb,
        "baseline_seconds": round(bdt, 1),
        "baseline_kept_tokens": bkept,
        "roofline_gflops": round(mm, 1),
        "roofline_gflops_aten": round(mm_aten, 1),
        "roofline_gflops_onednn": None if mm_onednn is None else round(mm_onednn, 1),
        "gflop_per_generated_token": round(gflop, 4),
        "roofline_share": round(share, 3),
        "int8_roofline_share": round(own_share, 3) if low == "int8" else None,
        "bf16_roofline_share": round(own_share, 3) if low == "onednn_bf16" else None,
        "roofline_gflops_prefill": round(mm_prefill, 1),
        "ceiling_seconds": round(cap["seconds"], 1),
        "ceiling_share": round(cap["share"], 3),
        "ceiling_ratio": round(cap["ratio"], 2),
        "profile_s": profile,
        "calls": [{k: round(r[k], 3) for k in ("seconds", "gen_rate", "mm", "share", "faults", "sys")} for r in runs],
        "cold": args.cold,
        "same_samples_across_calls": same,
    }


HELD_BACK = ("ONEDNN_MAX_CPU_ISA", "MKL_CBWR", "ATEN_CPU_CAPABILITY")  # results/sampling/session23.sh's emulation


def host_line() -> str:
    """The CPU, the C++ kernels' -march target, and any instruction set the libraries were held to."""
    from ilf_lab.generation.kernels import kernel_error, march

    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    why = kernel_error()  # first: a bad $ILF_LAB_KERNEL_MARCH is a reason here, not an exception
    kernels = f"C++ kernels unavailable ({why})" if why else f"C++ kernels -march={march()}"
    held = ", ".join(f"{k}={os.environ[k]}" for k in HELD_BACK if os.environ.get(k))
    return f"host: {cpu}; {kernels}; libraries held to: {held or 'nothing'}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sets", default="chat,refine", help="comma list of prompt sets: chat, refine")
    ap.add_argument("--prompts", type=int, default=32, help="prompts per set")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument(
        "--baseline-prompts", type=int, default=4, help="plain generate is slow: run it on a subset"
    )
    ap.add_argument("--repeats", type=int, default=3,
                    help="engine calls per set, each with its roofline measured right after it; the median call by "
                    "roofline share is reported (this project's hosts drift by several %% within minutes)")
    ap.add_argument("--batch-size", type=int, default=None, help="engine rows (default: automatic)")
    ap.add_argument("--cold", action="store_true",
                    help="unmap the kept cache memory (pages.KEPT) before every call: no call reuses an earlier one's")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="model weights (model.dtype); the roofline stays fp32's",
    )
    ap.add_argument(
        "--quantize",
        default=None,
        choices=("int8",),
        help="the engine samples with int8 linear layers (sampling.quantize); baseline and roofline stay fp32",
    )
    ap.add_argument(
        "--prompt-kv",
        default=None,
        choices=("copy", "shared"),
        help="the engine holds a prompt's KV once for its n samples (shared, the default) or copies it into each "
        "sample's slot (copy, before session 9) (sampling.prompt_kv)",
    )
    ap.add_argument(
        "--cpu-linear",
        default=None,
        choices=("aten", "onednn", "onednn_bf16"),
        help="the engine's fp32 linear layers: oneDNN with packed weights (onednn, the default on CPU from session 11), "
        "packed in bf16 (onednn_bf16, opt-in: new numerics) or F.linear (aten) (sampling.cpu_linear)",
    )
    ap.add_argument(
        "--attention",
        default=None,
        choices=("matmul", "kernel"),
        help="the engine's attention over the shared prompt KV on CPU: the C++ kernel (kernel, the default from "
        "session 12 where it builds) or torch's batched matmuls (matmul) (sampling.attention)",
    )
    ap.add_argument(
        "--common-prefix",
        default=None,
        choices=("once", "each"),
        help="the engine prefills the start all prompts share once (once, the default from session 13) or with every "
        "prompt (each) (sampling.common_prefix)",
    )
    ap.add_argument("--cache-dir", default=os.environ.get("ILF_LAB_CACHE_DIR", ".cache/ilf_lab"))
    ap.add_argument("--data-dir", default=os.environ.get("ILF_LAB_DATA_DIR"), help="dir with mbpp/ and ilf/")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {args.repeats}")
    torch.set_num_threads(args.threads)

    from ilf_lab.models.loading import load_model, model_config, resolve_model_dir

    path = resolve_model_dir(model_config("smollm2_135m_instruct"), args.cache_dir)
    model, tok = load_model(path, args.dtype)
    sampler = model
    if args.quantize:
        from ilf_lab.generation.quantize import quantize_linear

        sampler = quantize_linear(model, args.quantize)
    sets = prompt_sets(args.sets.split(","), tok, args.data_dir, args.prompts)
    print(
        f"SmolLM2-135M-Instruct {args.dtype}{' engine ' + args.quantize if args.quantize else ''}, "
        f"prompt KV {args.prompt_kv or 'default'}, linear {args.cpu_linear or 'default'}, "
        f"attention {args.attention or 'default'}, common prefix {args.common_prefix or 'default'}, torch {torch.__version__}, {args.threads} threads, "
        f"load avg {os.getloadavg()[0]:.2f}"
    )
    print(host_line())
    results = {name: bench_set(name, prompts, model, sampler, tok, args) for name, prompts in sets.items()}
    worst = min(results.values(), key=lambda r: r["ratio"])
    print(
        json.dumps(
            {
                "metric": "sampling_kept_tokens_per_s",
                "value": worst["value"],
                "baseline": worst["baseline"],
                "ratio": worst["ratio"],
                "unit": "tok/s",
                "max_new_tokens": args.max_new_tokens,
                "temperature": args.temperature,
                "top_p": args.top_p,
                "threads": args.threads,
                "dtype": args.dtype,
                "quantize": args.quantize,
                "prompt_kv": worst["prompt_kv"],  # the engine's (--prompt-kv or its default)
                "cpu_linear": worst["cpu_linear"],  # the engine's (--cpu-linear or its default)
                "attention": worst["attention"],  # the engine's (--attention or its default)
                "common_prefix": worst["common_prefix"],  # the engine's (--common-prefix or its default)
                "load_avg_1m": round(os.getloadavg()[0], 2),
                "repeats": args.repeats,
                "sets": results,
            }
        )
    )
    differ = [name for name, r in results.items() if not r["same_samples_across_calls"]]
    if differ:
        raise SystemExit(f"error: the engine's calls gave different samples with the same seed on: {', '.join(differ)}")


if __name__ == "__main__":
    main()
