"""Paper-scale planning on a GPU: training throughput and MFU of a randomly initialised CodeGen-350M-sized model
in bf16, and sampling throughput of our HF engine vs. `model.generate` (and vLLM where it is installed).

The model is a Llama-layout decoder with CodeGen-350M-mono's sizes (20 layers, d=1024, 16 heads, vocabulary
51200, untied output layer; gated MLP of width 2730 so the parameter count matches CodeGen's 4096-wide MLP:
~357M). Random weights: nothing is downloaded. Training is the model's own step (forward, backward, AdamW) on
random tokens, timed after warm-up steps; the Lightning wrapper adds ~6 % on CPU (benchmarks/training.py).

    python benchmarks/gpu_throughput.py                                    # cuda, bf16-mixed, 350m
    python benchmarks/gpu_throughput.py --arch codegen                     # CodeGen-350M's own architecture:
        # sampling then takes the engine's generic path, as CodeGen-6B does (scripts/paper_plan.py's rooflines)
    python benchmarks/gpu_throughput.py --device cpu --size tiny --precision 32 --steps 3   # plumbing check

The last line is one JSON object: metric train_tokens_per_s, value (measured), baseline (the tokens/s the
measured bf16 matmul peak of this device would give), ratio = value / baseline (MFU against the measured peak),
unit; plus mfu_datasheet (against the vendor's dense bf16 peak, where the device is known) and `sampling`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

SIZES = {
    "350m": {"hidden": 1024, "layers": 20, "heads": 16, "mlp": 2730, "vocab": 51200},
    "tiny": {"hidden": 64, "layers": 2, "heads": 4, "mlp": 128, "vocab": 512},
}
DATASHEET_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def build_model_dir(out: Path, size: str, seed: int = 0, arch: str = "llama") -> Path:
    """A random model with the byte-level tokenizer of the tests, padded with extra tokens to the vocabulary.
    arch=codegen: CodeGenForCausalLM with CodeGen-350M-mono's sizes (20 x 1024, 16 heads, rotary 32, 51200)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from ilf_lab.models.loading import build_tiny_codegen, build_tiny_random

    s = SIZES[size]
    if arch == "codegen":
        from transformers import CodeGenConfig, CodeGenForCausalLM

        tok = AutoTokenizer.from_pretrained(build_tiny_codegen(out / "tokenizer"))
        torch.manual_seed(seed)
        head = s["hidden"] // s["heads"]
        config = CodeGenConfig(vocab_size=s["vocab"], n_embd=s["hidden"], n_layer=s["layers"], n_head=s["heads"],
                               rotary_dim=max(2, head // 2), n_positions=2048, bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
        CodeGenForCausalLM(config).save_pretrained(out / "model")
        tok.save_pretrained(out / "model")
        return out / "model"
    tok = AutoTokenizer.from_pretrained(build_tiny_random(out / "tokenizer"))
    tok.add_tokens([f"<x{i}>" for i in range(s["vocab"] - len(tok))])
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=s["vocab"],
        hidden_size=s["hidden"],
        intermediate_size=s["mlp"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["heads"],
        max_position_embeddings=2048,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(out / "model")
    tok.save_pretrained(out / "model")
    return out / "model"


def flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per token: 6 x (parameters but the input embedding) + attention (12 L d T), as in PaLM's MFU."""
    cfg = model.config
    n = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    return 6.0 * n + 12.0 * cfg.num_hidden_layers * cfg.hidden_size * seq_len


def matmul_peak(device: str, dtype: torch.dtype, dim: int, seconds: float = 1.0) -> float:
    """Measured dense matmul FLOP/s at a training-sized shape (the roofline the MFU is taken against)."""
    a = torch.randn(dim, dim, device=device, dtype=dtype)
    b = torch.randn(dim, dim, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    it, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        it += 1
    sync(device)
    return 2.0 * dim**3 * it / (time.perf_counter() - t0)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def train_throughput(model_dir: Path, args) -> dict:
    from transformers import AutoModelForCausalLM

    mixed = args.precision == "bf16-mixed"
    dtype = torch.bfloat16 if args.precision == "bf16-true" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, use_kernels=False).to(args.device)
    model.train()
    fused = args.device.startswith("cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=fused)
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    times = []
    for step in range(args.warmup + args.steps):
        ids = torch.randint(0, vocab, (args.micro_batch, args.seq_len), generator=gen).to(args.device)
        sync(args.device)
        t0 = time.perf_counter()
        with torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=mixed):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(args.device)
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    tokens = args.micro_batch * args.seq_len
    tok_s = tokens * len(times) / sum(times)
    out = {
        "tokens_per_s": tok_s,
        "params": sum(p.numel() for p in model.parameters()),
        "flops_per_token": flops_per_token(model, args.seq_len),
        "step_seconds": sum(times) / len(times),
        "micro_batch": args.micro_batch,
        "seq_len": args.seq_len,
        "precision": args.precision,
        "final_loss": loss.item(),
    }
    if args.device.startswith("cuda"):
        out["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del model, opt
    return out


def sampling_throughput(model_dir: Path, args) -> dict:
    """Our engine vs. model.generate on the same random-text prompts; every sample runs to max_new_tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ilf_lab.generation import SamplingParams
    from ilf_lab.generation.hf import HFEngine

    dtype = torch.float32 if args.precision == "32" else torch.bfloat16
    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token is None:  # CodeGen's tokenizer has none (as ilf_lab.models.loading.load_tokenizer does)
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, use_kernels=False)
    model = model.to(args.device).eval()
    gen = torch.Generator().manual_seed(1)
    first = 0 if args.arch == "codegen" else 3  # the byte tokens (after the specials in the Llama layout)
    byte_ids = list(range(first, first + 256))  # prompts re-tokenise to about prompt_len tokens
    prompts = [
        tok.decode(
            [byte_ids[int(i)] for i in torch.randint(0, len(byte_ids), (args.prompt_len,), generator=gen)]
        )
        for _ in range(args.prompts)
    ]
    n, new = args.n, args.max_new_tokens
    params = SamplingParams(n=n, temperature=0.8, top_p=0.95, max_new_tokens=new, stop=(), seed=0)
    engine = HFEngine(model, tok, batch_size=args.sample_batch)
    engine.generate(prompts[:2], SamplingParams(n=2, temperature=0.8, max_new_tokens=8, stop=(), seed=0))
    sync(args.device)
    t0 = time.perf_counter()
    samples = engine.generate(prompts, params)
    sync(args.device)
    dt = time.perf_counter() - t0
    generated = engine.last_stats["generated_tokens"]
    # same seed, same samples: the same call again must repeat the first token for token (recorded, not assumed:
    # kernels that reduce in another order from call to call would break it). A call over a subset of the prompts
    # changes the batch's rows, which on CPU leaves every row's numbers as they were (batch-invariant kernels,
    # tested) and on a GPU need not (cuBLAS picks its kernel by shape).
    batches = [engine.last_stats["batch_size"]]  # each call's rows: the GPU's samples depend on them
    same_call = engine.generate(prompts, params) == samples
    batches.append(engine.last_stats["batch_size"])
    subset = engine.generate(prompts[: args.repeat_prompts], params) == samples[: args.repeat_prompts]
    batches.append(engine.last_stats["batch_size"])
    out = {
        "same_call_same_samples": same_call,
        "subset_call_same_samples": subset,
        "subset_prompts": min(args.repeat_prompts, len(prompts)),
        "engine_tokens_per_s": generated / dt,
        "engine_backend": engine.backend,
        "engine_prompt_kv": engine.prompt_kv,
        "engine_batch": batches[0],  # the timed call's
        "engine_batches": dict(zip(("timed", "repeat", "subset"), batches, strict=True)),
    }

    # baseline: model.generate, sample_batch sequences per call, forced to the same length
    tok.padding_side = "left"
    per_call = max(1, (args.sample_batch or 64) // n)
    nb = min(len(prompts), args.baseline_prompts)
    sync(args.device)
    t0, base_tokens = time.perf_counter(), 0
    for i in range(0, nb, per_call):
        enc = tok(prompts[i : i + per_call], return_tensors="pt", padding=True, add_special_tokens=False)
        enc = {k: v.to(args.device) for k, v in enc.items()}
        with torch.inference_mode():
            ids = model.generate(
                **enc,
                do_sample=True,
                temperature=0.8,
                top_p=0.95,
                top_k=None,
                num_return_sequences=n,
                max_new_tokens=new,
                min_new_tokens=new,
                pad_token_id=tok.pad_token_id,
            )
        base_tokens += ids[:, enc["input_ids"].shape[1] :].numel()
    sync(args.device)
    out["generate_tokens_per_s"] = base_tokens / (time.perf_counter() - t0)
    out["ratio"] = out["engine_tokens_per_s"] / out["generate_tokens_per_s"]
    out.update(prompts=len(prompts), baseline_prompts=nb, n=n, max_new_tokens=new, prompt_len=args.prompt_len)
    del model, engine
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    out["vllm_tokens_per_s"], out["vllm"] = vllm_throughput(model_dir, prompts, n, new, args)
    return out


def vllm_throughput(model_dir: Path, prompts: list[str], n: int, new: int, args) -> tuple[float | None, str]:
    if not args.device.startswith("cuda"):
        return None, "skipped: needs a GPU"
    try:
        import vllm
    except ImportError:
        return None, "not installed"
    try:
        llm = vllm.LLM(model=str(model_dir), dtype="bfloat16", seed=0, gpu_memory_utilization=0.5)
        sp = vllm.SamplingParams(n=n, temperature=0.8, top_p=0.95, max_tokens=new, ignore_eos=True)
        llm.generate(prompts[:2], sp)
        t0 = time.perf_counter()
        outs = llm.generate(prompts, sp)
        dt = time.perf_counter() - t0
        return sum(len(c.token_ids) for o in outs for c in o.outputs) / dt, f"vllm {vllm.__version__}"
    except Exception as e:  # report, do not lose the other numbers
        return None, f"failed: {type(e).__name__}: {str(e)[:200]}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", choices=sorted(SIZES), default="350m")
    ap.add_argument("--arch", choices=["llama", "codegen"], default="llama",
                    help="llama: the slot engine's path; codegen: CodeGen's own blocks, the generic path")
    ap.add_argument("--precision", choices=["bf16-mixed", "bf16-true", "32"], default="bf16-mixed")
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--baseline-prompts", type=int, default=16)
    ap.add_argument("--repeat-prompts", type=int, default=16, help="prompts of the subset call (batch invariance)")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--sample-batch", type=int, default=None, help="engine rows (default: from memory)")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("error: --device cuda but no CUDA device is visible")

    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    peak_dtype = torch.float32 if args.precision == "32" else torch.bfloat16
    peak = matmul_peak(args.device, peak_dtype, 8192 if args.device.startswith("cuda") else 1024)
    print(f"device {name}: measured {peak_dtype} matmul peak {peak / 1e12:.1f} TFLOP/s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model_dir(Path(tmp), args.size, arch=args.arch)
        train = train_throughput(model_dir, args)
        print(
            f"train ({args.size}, {train['params'] / 1e6:.0f}M params, {args.precision}, micro-batch "
            f"{args.micro_batch} x {args.seq_len}): {train['tokens_per_s']:.0f} tokens/s, "
            f"{train['step_seconds'] * 1000:.0f} ms/step",
            flush=True,
        )
        sampling = sampling_throughput(model_dir, args)
        print(
            f"sampling: engine {sampling['engine_tokens_per_s']:.0f} tok/s vs model.generate "
            f"{sampling['generate_tokens_per_s']:.0f} tok/s (x{sampling['ratio']:.2f}); vLLM: "
            f"{sampling['vllm_tokens_per_s']} ({sampling['vllm']})",
            flush=True,
        )
    achieved = train["tokens_per_s"] * train["flops_per_token"]
    baseline = peak / train["flops_per_token"]
    sheet = next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in name), None)
    result = {
        "metric": "train_tokens_per_s",
        "value": round(train["tokens_per_s"], 1),
        "baseline": round(baseline, 1),
        "ratio": round(train["tokens_per_s"] / baseline, 4),
        "unit": "tokens/s",
        "device": name,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "achieved_tflops": round(achieved / 1e12, 2),
        "measured_peak_tflops": round(peak / 1e12, 2),
        "mfu_datasheet": round(achieved / (sheet * 1e12), 4) if sheet and args.precision != "32" else None,
        "train": train,
        "sampling": sampling,
    }
    line = json.dumps(result)
    if args.out:
        Path(args.out).write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
