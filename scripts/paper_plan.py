"""Memory and time plan for the paper's scale: CodeGen-6B-mono, every GPU stage of one ILF run, one H200-class GPU.

    python scripts/paper_plan.py                 # tokens measured on MBPP with a GPT-2-style BPE (SmolLM2's)
    python scripts/paper_plan.py --tokenizer bytes --data DIR   # no model file: 1 token per byte (an upper bound)
    python scripts/paper_plan.py sampling.max_new_tokens=512 policy.micro_batch_size=2   # Hydra overrides

Everything is computed, nothing typed in except the architecture (Salesforce/codegen-6B-mono's config.json) and
the datasheet (--gpu): the parameter count from the model built on the meta device; activation bytes measured on
small CodeGens with the same head geometry (every tensor autograd saves, under bf16 autocast) and extrapolated
linearly in width; token counts from the paper preset (conf/scale/paper.yaml) over the real prompts and programs;
sampling batch sizes from the sampling engine's own rule (`ilf_lab.generation.budget.auto_batch_size`). Times are
rooflines: decode memory-bound (weights + the batch's KV cache read once per step), prefill and training
compute-bound (2·N and 6·N FLOPs per token; 8·N with gradient checkpointing); real kernels reach maybe 40-60 %
of either, so expect 2x (benchmarks/gpu_throughput.py measures it on a GPU). Prints a markdown table, then one
JSON line with every number.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Salesforce/codegen-6B-mono config.json
CODEGEN_6B = {"n_embd": 4096, "n_layer": 33, "n_head": 16, "rotary_dim": 64, "vocab_size": 51200, "n_positions": 2048}
GPUS = {  # datasheets: HBM bytes, HBM bandwidth B/s, dense bf16 FLOP/s
    "h200": {"name": "H200 SXM", "hbm": 141e9, "bw": 4.8e12, "flops": 989e12},
    "h100": {"name": "H100 SXM", "hbm": 80e9, "bw": 3.35e12, "flops": 989e12},
    "a100": {"name": "A100 80GB", "hbm": 80e9, "bw": 2.0e12, "flops": 312e12},
}
RESERVED = 3e9  # CUDA context, cuBLAS workspace, allocator slack: not available to tensors
GB = 1e9


# ------------------------------------------------------------------------------------------------ the model


def codegen_config(**kw: Any) -> Any:
    from transformers import CodeGenConfig

    return CodeGenConfig(**{**CODEGEN_6B, **kw, "bos_token_id": 0, "eos_token_id": 0})


def param_counts(cfg: Any) -> dict[str, int]:
    """Exact counts from the model built on the meta device (no memory): all, in decoder blocks, in Linear layers."""
    from transformers import CodeGenForCausalLM

    with torch.device("meta"):
        model = CodeGenForCausalLM(cfg)
    total = sum(p.numel() for p in model.parameters())
    block = sum(p.numel() for p in model.transformer.h[0].parameters())
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return {"total": total, "block": block, "linear": linear}


def saved_bytes(h: int, heads: int, layers: int, vocab: int, seq: int) -> tuple[int, int]:
    """(bytes of activations, element size of the residual stream) that autograd keeps for one sequence of `seq`
    tokens through a random CodeGen under bf16 autocast (the trainer's bf16-mixed) and our loss. The parameters
    and autocast's bf16 copies of them (counted apart, as weights) are not activations."""
    from transformers import CodeGenForCausalLM

    cfg = codegen_config(n_embd=h, n_head=heads, n_layer=layers, vocab_size=vocab)
    torch.manual_seed(0)
    model = CodeGenForCausalLM(cfg).train()
    params = list(model.parameters())
    ptrs = {p.data_ptr() for p in params}

    def is_weight_cast(t: torch.Tensor) -> bool:
        if t.dtype != torch.bfloat16 or t.dim() != 2:
            return False
        for p in params:
            if p.numel() == t.numel() and p.dim() == 2:
                w = p.detach().to(torch.bfloat16)
                if (w.shape == t.shape and torch.equal(w, t)) or (w.t().shape == t.shape and torch.equal(w.t(), t)):
                    return True
        return False

    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in ptrs and not is_weight_cast(t):
            storage = t.untyped_storage()
            kept[storage.data_ptr()] = max(kept.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    residual: list[int] = []
    hook = model.transformer.h[0].register_forward_pre_hook(lambda m, a: residual.append(a[0].element_size()))
    ids = torch.randint(0, vocab, (1, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=ids, use_cache=False).logits
        torch.nn.functional.cross_entropy(logits.float().view(-1, vocab), ids.view(-1), reduction="sum")
    hook.remove()
    return sum(kept.values()), residual[0]


@dataclass
class Activations:
    """Activation bytes per token, fitted on CodeGens with CodeGen-6B's head size (so width = heads x 256):
    per decoder block `per_head`·heads + `block_const`; outside the blocks (embedding, final norm, logits and the
    loss) `per_vocab`·V + `per_width`·h + `outside_const`."""

    per_head: float
    block_const: float
    per_vocab: float
    per_width: float
    outside_const: float
    residual_bytes: int  # element size of a block's input: what gradient checkpointing keeps per block

    def block(self, heads: int) -> float:
        return self.per_head * heads + self.block_const

    def outside(self, h: int, vocab: int) -> float:
        return self.per_vocab * vocab + self.per_width * h + self.outside_const


def measure_activations(seq: int = 64) -> Activations:
    """1 vs 2 blocks separate a block from the rest; 2 vs 4 heads (512 vs 1024 wide) the width terms; 256 vs
    512 tokens of vocabulary the logits' term. Sequence length enters linearly (SDPA keeps no seq x seq matrix)."""
    head = CODEGEN_6B["n_embd"] // CODEGEN_6B["n_head"]
    blocks, outside = {}, {}
    for heads in (2, 4):
        one, res = saved_bytes(heads * head, heads, 1, 256, seq)
        two, _ = saved_bytes(heads * head, heads, 2, 256, seq)
        blocks[heads], outside[heads] = (two - one) / seq, (2 * one - two) / seq
    per_head = (blocks[4] - blocks[2]) / 2
    wide_vocab, _ = saved_bytes(2 * head, 2, 1, 512, seq)
    per_vocab = (wide_vocab / seq - blocks[2] - outside[2]) / 256
    per_width = (outside[4] - outside[2]) / (2 * head)
    return Activations(per_head, blocks[2] - 2 * per_head, per_vocab, per_width,
                       outside[2] - per_vocab * 256 - per_width * 2 * head, res)


# ------------------------------------------------------------------------------------------------ the work


def paper_config(data_dir: str | None, overrides: list[str] = ()) -> Any:
    from hydra import compose, initialize_config_module
    from omegaconf import open_dict

    from ilf_lab.config import register_configs

    register_configs()
    over = ["scale=paper", "model=codegen_6b_mono", "logger=none", *([f"data.dir={data_dir}"] if data_dir else []),
            *overrides]
    with initialize_config_module(config_module="ilf_lab.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=over)
    with open_dict(cfg):
        cfg.paths.cache_dir = cfg.paths.output_dir = "/nonexistent"
    return cfg


class ByteTokenizer:
    """One token per UTF-8 byte: what no BPE exceeds (an upper bound when no real tokenizer is at hand)."""

    eos_token_id = pad_token_id = 0
    bos_token_id = None

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": list(text.encode())}

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode(errors="replace")


def load_tokenizer(name: str) -> Any:
    """smollm2: SmolLM2's byte-level BPE (49k tokens, trained on code and text), the GPT-2-style tokenizer at hand
    offline, standing in for CodeGen's (GPT-2's 50k BPE + whitespace runs: indentation is cheaper there)."""
    if name == "bytes":
        return ByteTokenizer()
    from transformers import AutoTokenizer

    from ilf_lab.models.loading import gguf_location, model_config

    gguf = gguf_location(model_config("smollm2_135m_instruct"))
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


@dataclass
class Work:
    prompts: int
    mean_prompt: float
    max_prompt: int
    mean_program: float  # tokens of a correct program after the prompt (+ EOS): a typical sample's length
    over_context: int  # prompts that leave less than max_new_tokens of CodeGen's 2048 positions


@dataclass
class Training:
    examples: int
    mean_tokens: float
    batch: int
    micro: int
    epochs: int
    max_length: int


def measure_work(cfg: Any, tok: Any, policy_examples: int) -> dict[str, Any]:
    from ilf_lab.data.mbpp import filter_annotations, load_annotation_records, load_mbpp, split_ids
    from ilf_lab.data.prompts import docstring_prompt, refine_prompt, target_for
    from ilf_lab.training.data import PolicyDataModule, PolicyRecord, RefinerDataModule, RefinerRecord

    def n(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    tasks = load_mbpp(cfg.data)
    anns, _ = filter_annotations(load_annotation_records(cfg.data), cfg.data)
    test = [tasks[i] for i in split_ids(cfg.data, "test") if i in tasks]
    refine_ids, train_ids = set(split_ids(cfg.data, "refine")), set(split_ids(cfg.data, "train"))
    refine_anns = [a for a in anns if a.task_id in refine_ids]
    train_anns = [a for a in anns if a.task_id in train_ids]

    def work(prompts: list[str], programs: list[int], max_new: int) -> Work:
        lens = [n(p) for p in prompts]
        over = sum(x + max_new > CODEGEN_6B["n_positions"] for x in lens)
        return Work(len(lens), sum(lens) / len(lens), max(lens), sum(programs) / len(programs) + 1, over)

    evaluate = work([docstring_prompt(t) for t in test], [n(target_for(t, t.code, "docstring")) for t in test],
                    cfg.sampling.max_new_tokens)
    refine = work(
        [refine_prompt(tasks[a.task_id], a.old_code, a.feedback, "docstring") for a in train_anns],
        [n(target_for(tasks[a.task_id], a.refinement, "docstring")) for a in train_anns],
        cfg.refine.max_new_tokens,
    )

    def training(dm_cls: type, records: list[Any], opt: Any, count: int | None = None) -> Training:
        dm = dm_cls(records, tok, "docstring", opt.max_length, opt.micro_batch_size)
        lens = [len(e.input_ids) for e in dm.examples]
        return Training(count or len(lens), sum(lens) / len(lens), opt.batch_size, opt.micro_batch_size,
                        opt.epochs, opt.max_length)

    refiner = training(RefinerDataModule, [RefinerRecord(tasks[a.task_id], a.old_code, a.feedback, a.refinement)
                                           for a in refine_anns], cfg.refiner)
    policy = training(PolicyDataModule, [PolicyRecord(tasks[a.task_id], a.refinement) for a in train_anns],
                      cfg.policy, policy_examples)
    return {"evaluate": evaluate, "refine": refine, "train_refiner": refiner, "train_policy": policy}


# ------------------------------------------------------------------------------------------------ the plan


def sampling_plan(w: Work, n: int, max_new: int, arch: dict, counts: dict, gpu: dict,
                  step_overhead: float = 0.0) -> dict[str, Any]:
    """The generic HF engine's schedule (CodeGen is not a slot-engine model): prompts in groups of rows // n,
    each prefilled once, its n samples decoded together until the last stops."""
    from ilf_lab.generation.budget import GPU_BUDGET_SHARE, GPU_MAX_ROWS

    h, layers, vocab = arch["n_embd"], arch["n_layer"], arch["vocab_size"]
    weights = 2 * counts["total"]  # bf16
    kv_token = 2 * layers * h * 2  # K and V, every layer, bf16 (no grouped-query heads in CodeGen)
    max_len = min(w.max_prompt + max_new, arch["n_positions"])  # the engine stops samples at the context
    per_row = kv_token * max_len + vocab * 4 * 4  # the engine's own rule (auto_batch_size)
    budget = GPU_BUDGET_SHARE * (gpu["hbm"] - RESERVED - weights)
    rows = max(1, min(int(budget // per_row), GPU_MAX_ROWS))
    per_group = max(1, rows // n)
    groups = math.ceil(w.prompts / per_group)
    active = per_group * n

    def decode_seconds(steps: float) -> float:
        ctx = w.mean_prompt + steps / 2
        memory = (weights + active * ctx * kv_token) / gpu["bw"]
        compute = 2 * counts["total"] * active / gpu["flops"]
        return groups * steps * (max(memory, compute) + step_overhead)

    prefill = 2 * counts["total"] * w.prompts * w.mean_prompt / gpu["flops"]
    return {
        "memory": weights + active * max_len * kv_token,
        "rows": active,
        "typical_s": prefill + decode_seconds(w.mean_program),
        "worst_s": prefill + decode_seconds(max_new),
        "tokens_typical": w.prompts * n * w.mean_program,
        "tokens_worst": w.prompts * n * max_new,
    }


def training_memory(t: Training, arch: dict, counts: dict, act: Activations, gpus: int, checkpointing: bool,
                    master: str = "fp32") -> dict[str, float]:
    """Peak bytes per GPU: weights + grads + AdamW (m, v) + the weights' bf16 copies + activations of one
    micro-batch at max_length. FSDP (gpus > 1) shards the first three and gathers one block at a time."""
    h, heads, layers, vocab = arch["n_embd"], arch["n_head"], arch["n_layer"], arch["vocab_size"]
    n_params = counts["total"]
    elem = 4 if master == "fp32" else 2
    states = {"weights": elem * n_params, "gradients": elem * n_params, "adamw": 2 * elem * n_params}
    states = {k: v / gpus for k, v in states.items()}
    if gpus > 1:
        copies = 2 * 2 * counts["block"]  # FSDP mixed precision: bf16 gathers of the running and next block
    else:
        copies = 2 * counts["linear"] if master == "fp32" else 0  # autocast's bf16 cast cache
    tokens = t.micro * t.max_length
    block = tokens * act.block(heads)
    outside = tokens * act.outside(h, vocab)
    acts = (layers * tokens * h * act.residual_bytes + block if checkpointing else layers * block) + outside
    out = {**states, "bf16 copies": copies, "activations": acts}
    out["total"] = sum(out.values())
    return out


def training_seconds(t: Training, counts: dict, gpu: dict, gpus: int, checkpointing: bool) -> float:
    tokens = t.examples * t.mean_tokens * t.epochs
    flops = (8 if checkpointing else 6) * counts["total"] * tokens
    steps = math.ceil(t.examples / t.batch) * t.epochs
    optimizer = steps * 2 * 16 * counts["total"] / gpus / gpu["bw"]  # AdamW reads and writes w, g, m, v in fp32
    return flops / (gpus * gpu["flops"]) + optimizer


def bf16_update_loss(lr: float) -> float:
    """Share of AdamW updates of size lr (Adam's step is ~lr per weight) that vanish when added to bf16 weights
    of CodeGen's scale (N(0, 0.02)): why bf16-mixed keeps fp32 master weights."""
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(1_000_000, generator=g) * 0.02).to(torch.bfloat16)
    return float(((w + torch.tensor(lr, dtype=torch.bfloat16)) == w).float().mean())


def plan(args: argparse.Namespace) -> dict[str, Any]:
    gpu = GPUS[args.gpu]
    cfg = paper_config(args.data, args.overrides)
    arch = dict(CODEGEN_6B)
    counts = param_counts(codegen_config())
    act = measure_activations()
    work = measure_work(cfg, load_tokenizer(args.tokenizer), args.policy_examples)
    usable = gpu["hbm"] - RESERVED
    rows = []
    for stage, n, max_new in (("refine", cfg.refine.n, cfg.refine.max_new_tokens),
                              ("evaluate", cfg.sampling.n, cfg.sampling.max_new_tokens)):
        w = work[stage]
        s = sampling_plan(w, n, max_new, arch, counts, gpu, args.step_overhead_ms / 1e3)
        rows.append({"stage": stage, "preset": "trainer: any (sampling, bf16)",
                     "work": f"{w.prompts} prompts x {n} (prompt {w.mean_prompt:.0f} tokens, max {w.max_prompt}; "
                             f"program {w.mean_program:.0f}; up to {max_new} new; {s['rows']} rows at once"
                             + (f"; {w.over_context} over the 2048 positions" if w.over_context else "") + ")",
                     "memory": s["memory"], "fits": s["memory"] <= usable,
                     "typical_s": s["typical_s"], "worst_s": s["worst_s"]})
    options = [("gpu (1 GPU, bf16-mixed)", 1, False), ("gpu + gradient_checkpointing (the preset)", 1, True),
               ("fsdp (2 GPUs, bf16-mixed)", 2, False)]
    for stage in ("train_refiner", "train_policy"):
        t = work[stage]
        for label, gpus, ckpt in options:
            mem = training_memory(t, arch, counts, act, gpus, ckpt)
            secs = training_seconds(t, counts, gpu, gpus, ckpt)
            rows.append({"stage": stage, "preset": f"trainer={label}",
                         "work": f"{t.examples} examples x {t.epochs} epochs ({t.mean_tokens:.0f} tokens each; "
                                 f"micro-batch {t.micro} x {t.max_length} tokens)",
                         "memory": mem["total"], "memory_parts": mem, "fits": mem["total"] <= usable,
                         "typical_s": secs, "worst_s": secs})
    pure = training_memory(work["train_policy"], arch, counts, act, 1, False, master="bf16")
    return {
        "gpu": gpu, "usable_bytes": usable, "params": counts, "activations": asdict(act),
        "tokenizer": args.tokenizer, "work": {k: asdict(v) for k, v in work.items()}, "rows": rows,
        "bf16_true": {"memory": pure["total"], "lost_updates": bf16_update_loss(float(cfg.policy.lr)),
                      "lr": float(cfg.policy.lr)},
    }


def _t(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def markdown(p: dict[str, Any]) -> str:
    gpu, c = p["gpu"], p["params"]
    lines = [
        f"CodeGen-6B-mono: {c['total'] / 1e9:.2f} B parameters ({c['block'] / 1e6:.0f} M per block), "
        f"on one {gpu['name']} ({gpu['hbm'] / GB:.0f} GB, {gpu['bw'] / 1e12:.1f} TB/s, "
        f"{gpu['flops'] / 1e12:.0f} TFLOP/s bf16; {p['usable_bytes'] / GB:.0f} GB usable). Tokens: {p['tokenizer']}.",
        "",
        "| stage | preset | work | GPU memory | fits | time (typical) | time (every sample to max tokens) |",
        "|---|---|---|---:|:---:|---:|---:|",
    ]
    for r in p["rows"]:
        lines.append(f"| {r['stage']} | {r['preset']} | {r['work']} | {r['memory'] / GB:.0f} GB | "
                     f"{'yes' if r['fits'] else '**no**'} | {_t(r['typical_s'])} | {_t(r['worst_s'])} |")
    train = [r for r in p["rows"] if "memory_parts" in r]
    parts = train[0]["memory_parts"]
    lines += ["", "Training memory, " + train[0]["preset"] + ": " + ", ".join(
        f"{k} {v / GB:.1f} GB" for k, v in parts.items()) + "."]
    b = p["bf16_true"]
    lines.append(f"bf16-true (bf16 weights and AdamW states): {b['memory'] / GB:.0f} GB, but "
                 f"{100 * b['lost_updates']:.0f} % of updates of size lr={b['lr']:g} round away in bf16 weights.")
    preset = [r for r in p["rows"] if "the preset" in r["preset"] or r["stage"] in ("refine", "evaluate")]
    lines.append(f"One ILF run (train_refiner, refine, train_policy, evaluate) with the presets: "
                 f"{_t(sum(r['typical_s'] for r in preset))} typical, {_t(sum(r['worst_s'] for r in preset))} "
                 f"if every sample ran to max_new_tokens (roofline; model loading and program execution on the "
                 f"CPUs not included).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--gpu", choices=sorted(GPUS), default="h200")
    ap.add_argument("--tokenizer", choices=("smollm2", "bytes"), default="smollm2")
    ap.add_argument("--data", default=os.environ.get("ILF_LAB_DATA_DIR"),
                    help="dir with mbpp/mbpp.jsonl and ilf/surge_annotations.jsonl (default $ILF_LAB_DATA_DIR)")
    ap.add_argument("--policy-examples", type=int, default=78, help="πθ*'s training set (the paper's ILF: ~78)")
    ap.add_argument("--step-overhead-ms", type=float, default=0.0,
                    help="fixed cost per decode step beyond the roofline (Python, kernel launches), e.g. as "
                         "benchmarks/gpu_throughput.py measures it; 0 = the roofline")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides of the paper preset (e.g. refine.n=10)")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    p = plan(args)
    print(markdown(p))
    print(json.dumps(p, default=str))
    return 0


if __name__ == "__main__":
    from ilf_lab.errors import run_cli  # a missing data dir or tokenizer: one line, exit 2

    sys.exit(run_cli(main))
