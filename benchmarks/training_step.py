"""One training micro-batch, forward + backward, with logits only at the scored positions vs full logits.

SmolLM2-135M-Instruct (fp32), the loss as `CausalLMModule.training_step` computes it (`scored_loss_sum`). The
baseline is the same step computing (batch, seq, vocab) logits, as `model(labels=...)` does. The defaults are
the default run's refiner micro-batches (MBPPRefine, 44 examples: 19,636 tokens in 22 micro-batches of 2 rows,
3,244 target tokens, so ~448 tokens and ~74 targets a row); the token ids are random (speed only depends on
the shapes). The two variants alternate, `--repeats` times each after one warm-up each; medians are compared.

    python benchmarks/training_step.py [--seq-len 448] [--targets 74] [--micro-batch 2] [--repeats 5]

The last line is one JSON object: metric, value (kept-logit steps/s), baseline (full-logit steps/s), ratio, unit.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from ilf_lab.training.data import IGNORE_INDEX
from ilf_lab.training.module import keeps_logits, scored_loss_sum


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq-len", type=int, default=448)
    ap.add_argument("--targets", type=int, default=74, help="target tokens at the end of each row")
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--cache-dir", default=os.environ.get("ILF_LAB_CACHE_DIR", ".cache/ilf_lab"))
    args = ap.parse_args()
    if not 0 < args.targets < args.seq_len or args.micro_batch < 1 or args.repeats < 1:
        ap.error("need 0 < --targets < --seq-len, --micro-batch >= 1 and --repeats >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    from ilf_lab.models.loading import load_model, model_config, resolve_model_dir

    model, _ = load_model(str(resolve_model_dir(model_config("smollm2_135m_instruct"), args.cache_dir)), "float32")
    model.train()
    assert keeps_logits(model), "the model's forward takes no logits_to_keep"
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.micro_batch, args.seq_len), generator=gen)
    mask = torch.ones_like(ids)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, -args.targets :] = ids[:, -args.targets :]

    def step(keep: bool) -> tuple[float, float]:
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss = scored_loss_sum(model, ids, mask, labels, keep_logits=keep)
        loss.backward()
        return time.perf_counter() - t0, float(loss.detach())

    times: dict[bool, list[float]] = {True: [], False: []}
    losses = {keep: step(keep)[1] for keep in (True, False)}  # warm-up
    for _ in range(args.repeats):
        for keep in (True, False):
            times[keep].append(step(keep)[0])
    kept, full = statistics.median(times[True]), statistics.median(times[False])
    tokens = args.micro_batch * args.seq_len
    print(f"micro-batch {args.micro_batch} x {args.seq_len} tokens, {args.targets} targets a row, "
          f"{torch.get_num_threads()} threads")
    print(f"full logits:            {full:.2f} s ({tokens / full:.0f} tok/s)  loss {losses[False]:.4f}")
    print(f"logits at targets only: {kept:.2f} s ({tokens / kept:.0f} tok/s)  loss {losses[True]:.4f}")
    print(json.dumps({
        "metric": "training micro-batch steps/s (forward + backward), logits at scored positions only",
        "value": round(1 / kept, 4), "baseline": round(1 / full, 4), "ratio": round(full / kept, 3),
        "unit": "steps/s", "seconds": {"kept": times[True], "full": times[False]},
        "loss": {"kept": losses[True], "full": losses[False]},
        "shape": {"micro_batch": args.micro_batch, "seq_len": args.seq_len, "targets": args.targets},
    }))


if __name__ == "__main__":
    main()
