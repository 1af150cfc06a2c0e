"""Fine-tuning throughput: the Lightning path (`finetune`) against a plain PyTorch loop, in the same run.

Both train SmolLM2-135M (fp32) on the same MBPP-like examples (real MBPP tasks, gold code as the target, chat
policy format), in the same length-bucketed micro-batches, with AdamW, the same accumulation and clipping.
Throughput is tokens processed (padding included) per second over the optimizer steps after the warm-up ones,
each step timed end to end (data, forward, backward, optimizer, hooks).

    python benchmarks/training.py [--examples 56] [--micro-batch-size 4] [--accumulate 2] [--warmup-steps 1]

Prints progress lines, then one JSON object on the last line: metric, value (Lightning tokens/s), baseline
(plain loop tokens/s), ratio = value / baseline (goal >= 0.95), unit, useful_fraction (goal >= 0.9), ...
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ilf_lab.config import OptimConfig, TrainerConfig
from ilf_lab.data import load_mbpp
from ilf_lab.models.loading import load_model, load_tokenizer, model_config, resolve_model_dir
from ilf_lab.training import PolicyDataModule, PolicyRecord, finetune
from ilf_lab.training.data import IGNORE_INDEX, ExampleDataset
from ilf_lab.training.finetune import accumulation
from ilf_lab.training.module import lr_factor, next_token_labels, param_groups, scored_loss_sum


def records(data_dir: str, n: int, first_task: int) -> list[PolicyRecord]:
    tasks = load_mbpp(OmegaConf.create({"dir": data_dir}))
    ids = sorted(t for t in tasks if t >= first_task)[:n]
    return [PolicyRecord(tasks[i], tasks[i].code) for i in ids]


def plain_loop(model_dir: str, dm: PolicyDataModule, opt: OptimConfig, deterministic: bool) -> dict:
    """The reference: HF model, AdamW, accumulation and clipping by hand, over the sampler's micro-batches."""
    torch.use_deterministic_algorithms(deterministic)  # as the Lightning preset sets it
    torch.manual_seed(0)
    model, _ = load_model(model_dir, "float32")
    model.train()
    optimizer = torch.optim.AdamW(param_groups(model, opt.weight_decay), lr=opt.lr)
    sampler = dm.sampler()
    steps = sampler.global_plan(0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, math.ceil(opt.warmup_ratio * len(steps)), len(steps), opt.scheduler)
    )
    dataset = ExampleDataset(dm.examples, dm.pad_id)
    micro_batches = list(sampler)
    step_seconds, step_tokens, losses = [], [], []
    t0 = None
    for step in range(len(steps)):
        mbs = micro_batches[step * dm.accumulate : (step + 1) * dm.accumulate]
        tokens, loss_sum = 0, 0.0
        for mb in mbs:
            t0 = t0 or time.perf_counter()
            batch = dataset.__getitems__(mb)
            # the module's loss (logits at scored positions only), as a mean over the micro-batch's targets
            targets = (next_token_labels(batch["labels"]) != IGNORE_INDEX).sum().clamp(min=1)
            loss = scored_loss_sum(model, batch["input_ids"], batch["attention_mask"], batch["labels"]) / targets
            (loss / len(mbs)).backward()
            loss_sum += loss.item() / len(mbs)
            tokens += batch["input_ids"].numel()
        torch.nn.utils.clip_grad_norm_(model.parameters(), opt.grad_clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        now = time.perf_counter()
        step_seconds.append(now - t0)
        t0 = now
        step_tokens.append(tokens)
        losses.append(loss_sum)
        print(
            f"plain step {step}: {tokens} tokens in {step_seconds[-1]:.1f} s, loss {loss_sum:.3f}", flush=True
        )
    return {"step_seconds": step_seconds, "step_tokens": step_tokens, "losses": losses}


def throughput(step_tokens: list[int], step_seconds: list[float], warmup: int) -> float:
    return sum(step_tokens[warmup:]) / sum(step_seconds[warmup:])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", type=int, default=56)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--accumulate", type=int, default=2)
    p.add_argument("--warmup-steps", type=int, default=1, help="optimizer steps left out of the timing")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--first-task", type=int, default=311, help="MBPP task id to start from (MBPPTrain: 311)")
    p.add_argument("--data-dir", default=os.environ.get("ILF_LAB_DATA_DIR"), help="dir with mbpp/mbpp.jsonl")
    p.add_argument("--cache-dir", default=str(Path(__file__).resolve().parents[1] / ".cache" / "ilf_lab"))
    p.add_argument("--model-dir", default=None, help="a HF model dir instead of SmolLM2-135M")
    p.add_argument("--no-bucket", action="store_true", help="random micro-batches (padding to the longest)")
    args = p.parse_args(argv)

    model_dir = args.model_dir or resolve_model_dir(model_config("smollm2_135m_instruct"), args.cache_dir)
    recs = records(args.data_dir, args.examples, args.first_task)
    opt = OptimConfig(
        lr=2e-5,
        batch_size=args.micro_batch_size * args.accumulate,
        micro_batch_size=args.micro_batch_size,
        epochs=1,
        max_length=args.max_length,
        pack=not args.no_bucket,
    )
    trainer = TrainerConfig()  # the cpu preset (conf/trainer/cpu.yaml)
    dm = PolicyDataModule(
        recs,
        load_tokenizer(model_dir),
        "chat",
        opt.max_length,
        opt.micro_batch_size,
        accumulation(opt, 1),
        0,
        bucket=opt.pack,
    )
    lengths = [len(e.input_ids) for e in dm.examples]
    print(
        f"model {model_dir}\n{len(dm.examples)} examples, {min(lengths)}-{max(lengths)} tokens "
        f"(mean {sum(lengths) / len(lengths):.0f}), micro-batch {opt.micro_batch_size} x {dm.accumulate} "
        f"accumulation, threads {torch.get_num_threads()}",
        flush=True,
    )

    plain = plain_loop(model_dir, dm, opt, trainer.deterministic)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = finetune("policy", recs, model_dir, tmp, opt, trainer, prompt_format="chat")
        wall = time.perf_counter() - t0
    for i, (n, s) in enumerate(zip(result.step_tokens, result.step_seconds, strict=True)):
        print(f"lightning step {i}: {n} tokens in {s:.1f} s, loss {result.losses[i]:.3f}", flush=True)
    assert result.step_tokens == plain["step_tokens"], "the two paths must see the same micro-batches"

    w = args.warmup_steps
    value = throughput(result.step_tokens, result.step_seconds, w)
    baseline = throughput(plain["step_tokens"], plain["step_seconds"], w)
    report = {
        "metric": "finetune_tokens_per_s",
        "value": round(value, 2),
        "baseline": round(baseline, 2),
        "ratio": round(value / baseline, 4),
        "unit": "tokens/s",
        "useful_fraction": round(result.useful_fraction, 4),
        "model": "SmolLM2-135M-Instruct fp32" if not args.model_dir else args.model_dir,
        "examples": result.examples,
        "micro_batch_size": opt.micro_batch_size,
        "accumulate": dm.accumulate,
        "timed_steps": len(result.step_tokens) - w,
        "timed_micro_steps": (len(result.step_tokens) - w) * dm.accumulate,
        "tokens_timed": sum(result.step_tokens[w:]),
        "lightning_seconds_timed": round(sum(result.step_seconds[w:]), 2),
        "plain_seconds_timed": round(sum(plain["step_seconds"][w:]), 2),
        "finetune_wall_s": round(wall, 1),
        "loss_first_last": [round(result.losses[0], 4), round(result.losses[-1], 4)],
        "plain_loss_first_last": [round(plain["losses"][0], 4), round(plain["losses"][-1], 4)],
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(report), flush=True)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
