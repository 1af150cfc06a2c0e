"""Fingerprint what a set of smoke-scale runs produce, to show a refactor left behaviour unchanged.

    python scripts/behaviour_snapshot.py --out before.json   # on the old code
    python scripts/behaviour_snapshot.py --out after.json    # on the new code; then diff the two

Runs Table 4's six rows, the refinement analyses and an x0=policy run with `model=tiny_random scale=smoke` in a
fresh cache, and records per run: training losses, per-task counts, counts, and the sha256 of every JSONL
artifact copied beside results.json (samples, refinements, feedback, x0). pass@k alone is 0 here and proves nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SWEEPS = [
    ["experiment=ilf,instructgpt_1shot,instructgpt_2shot,mbpp_gold,human_refinements,zero_shot",
     "eval.perplexity=true"],
    ["experiment=refine_zero_shot,refine_shuffled_feedback"],
    ["feedback=instructgpt_1shot", "x0=policy", "seed=0,1"],
]


def _fingerprint(run: Path) -> dict:
    res = json.loads((run / "results.json").read_text())
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()[:16] for p in sorted(run.glob("*.jsonl"))}
    training = {k: v.get("losses") for k, v in (res.get("training") or {}).items()}
    return {
        "experiment": res["experiment"],
        "overrides": sorted(res.get("overrides") or []),
        "pass@1": res.get("pass@1"),
        "per_task": res.get("per_task"),
        "counts": res.get("counts"),
        "refine": res.get("refine"),
        "training_losses": training,
        "files": files,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    snap = []
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "ILF_LAB_CACHE_DIR": str(Path(tmp) / "cache"), "WANDB_MODE": "disabled"}
        for i, sweep in enumerate(SWEEPS):
            sweep_dir = Path(tmp) / f"sweep{i}"
            cmd = [sys.executable, "-m", "ilf_lab", "-m", "model=tiny_random", "scale=smoke", "logger=none",
                   f"hydra.sweep.dir={sweep_dir}", *sweep]
            subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
            for res in sorted(sweep_dir.rglob("results.json")):
                snap.append(_fingerprint(res.parent))
    snap.sort(key=lambda r: (r["experiment"], r["overrides"]))
    Path(args.out).write_text(json.dumps(snap, indent=1, sort_keys=True))
    print(f"{len(snap)} runs -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
