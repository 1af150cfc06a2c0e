"""`trainer=gpu` on a GPU: the preset as `python -m ilf_lab trainer=gpu` composes it (Lightning, bf16-mixed,
gradient checkpointing) fine-tunes a random Llama-layout refiner twice with one seed, then the engine samples from
the result twice with one seed. Prints one JSON line: losses, whether the two runs' weights agree, and whether the
two sampling calls agree. CPU CI cannot run this (no CUDA); results/gpu/h200.sh runs it on a lent H200.

    python results/gpu/train_check.py --out results/gpu/train_check.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def records(n: int) -> list:
    from ilf_lab.data.prompts import Task
    from ilf_lab.training import RefinerRecord

    out = []
    for i in range(n):
        t = Task(task_id=i, text=f"Write a function to add {i} to a number.",
                 code=f"def add_{i}(x):\n    return x + {i}\n", tests=(f"assert add_{i}(1) == {i + 1}",))
        out.append(RefinerRecord(t, f"def add_{i}(x):\n    return x - {i}\n", "It subtracts; it should add.", t.code))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--trainer", default="gpu", help="the trainer preset (cpu: this script's own plumbing check)")
    args = ap.parse_args()
    from hydra import compose, initialize_config_dir

    from ilf_lab.config import OptimConfig, register_configs
    from ilf_lab.generation import SamplingParams
    from ilf_lab.generation.hf import HFEngine
    from ilf_lab.models.loading import build_tiny_random, load_model
    from ilf_lab.training import finetune

    register_configs()
    conf = Path(__file__).resolve().parents[2] / "conf"  # the repo's conf/ (ilf_lab.conf once installed)
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"trainer={args.trainer}"])
    tmp = Path(tempfile.mkdtemp())
    base = str(build_tiny_random(tmp / "base"))
    opt = OptimConfig(lr=1e-3, batch_size=8, micro_batch_size=4, epochs=3)
    runs = []
    for k in range(2):
        t0 = time.perf_counter()
        r = finetune("refiner", records(args.examples), base, tmp / f"run{k}", opt, cfg.trainer,
                     prompt_format="chat", seed=0)
        runs.append({"seconds": time.perf_counter() - t0, "steps": r.steps, "losses": r.losses,
                     "checkpoint": r.checkpoint})
    a, tok = load_model(runs[0]["checkpoint"])
    b, _ = load_model(runs[1]["checkpoint"])
    same_weights = all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    max_diff = max(float((x - y).detach().abs().max()) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    gpu = torch.cuda.is_available()
    engine = HFEngine(a.to("cuda").to(torch.bfloat16) if gpu else a, tok)
    prompts = [f"def add_{i}(x):\n" for i in range(8)]
    params = SamplingParams(n=4, temperature=0.8, max_new_tokens=32, stop=(), seed=0)
    first = engine.generate(prompts, params)
    result = {
        "device": torch.cuda.get_device_name() if gpu else "cpu",
        "trainer": {k: cfg.trainer[k] for k in ("accelerator", "precision", "gradient_checkpointing", "deterministic")},
        "runs": [{k: v for k, v in r.items() if k != "checkpoint"} for r in runs],
        "loss_first_last": [runs[0]["losses"][0], runs[0]["losses"][-1]],
        "same_seed_same_weights": same_weights,
        "max_abs_weight_diff": max_diff,
        "engine_backend": engine.backend,
        "same_call_same_samples": engine.generate(prompts, params) == first,
    }
    line = json.dumps(result)
    if args.out:
        Path(args.out).write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
