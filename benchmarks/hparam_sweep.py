"""Cost of the App. A.1 policy sweep (lr x epochs here) run as one Hydra sweep over a shared stage cache, against
running every point independently (fresh cache each), in the same run.

The shared sweep trains πRefine and samples the refinements once; only train_policy and evaluate run per point.
Prints lines, then one JSON object (contract 6): value = shared wall seconds, baseline = independent seconds.

    ILF_LAB_DATA_DIR=../shared/data python benchmarks/hparam_sweep.py [--model tiny_random --scale smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(args: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "ilf_lab", *args], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(args)}\n{r.stderr[-2000:]}")
    return time.perf_counter() - t0


def stage_runs(root: Path) -> dict[str, int]:
    """How many times each stage was computed (not taken from the cache) across the results under root."""
    counts: dict[str, int] = {}
    for p in root.rglob("results.json"):
        for s in json.loads(p.read_text())["stages"]:
            if s["key"] and not s["cached"]:
                counts[s["name"]] = counts.get(s["name"], 0) + 1
    return counts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny_random")
    ap.add_argument("--scale", default="smoke")
    ap.add_argument("--lrs", default="1e-4,1e-3")
    ap.add_argument("--epochs", default="1,2")
    ap.add_argument(
        "--experiment",
        default="ilf",
        help="with a random tiny model no refinement passes, so πθ* is not trained and the points' "
        "evaluations coincide too; use a real model (or human_refinements) for per-point training",
    )
    a = ap.parse_args()
    if not os.environ.get("ILF_LAB_DATA_DIR"):
        sys.exit("set ILF_LAB_DATA_DIR to a directory with mbpp/ and ilf/ (e.g. ../shared/data)")
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    base = [f"experiment={a.experiment}", f"model={a.model}", f"scale={a.scale}", "logger=none"]
    points = [(lr, ep) for lr in a.lrs.split(",") for ep in a.epochs.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # warm the base model once for both modes (GGUF conversion is not what we measure)
        run([*base, "--cfg", "job"], env)
        shared = run(
            [
                "-m",
                *base,
                f"policy.lr={a.lrs}",
                f"policy.epochs={a.epochs}",
                f"paths.cache_dir={tmp / 'shared_cache'}",
                f"hydra.sweep.dir={tmp / 'shared'}",
            ],
            env,
        )
        independent = 0.0
        for i, (lr, ep) in enumerate(points):
            independent += run(
                [
                    *base,
                    f"policy.lr={lr}",
                    f"policy.epochs={ep}",
                    f"paths.cache_dir={tmp / f'cache{i}'}",
                    f"hydra.run.dir={tmp / f'ind{i}'}",
                ],
                env,
            )
        shared_runs, ind_runs = stage_runs(tmp / "shared"), stage_runs(tmp)
        for k in list(shared_runs):
            ind_runs[k] -= shared_runs[k]
    print(f"points: {len(points)} ({a.experiment}, {a.model}, scale={a.scale})")
    print(f"shared-cache sweep: {shared:.1f} s; stages computed: {shared_runs}")
    print(f"independent points: {independent:.1f} s; stages computed: {ind_runs}")
    print(
        json.dumps(
            {
                "metric": "hparam_sweep_wall_seconds",
                "value": round(shared, 2),
                "baseline": round(independent, 2),
                "ratio": round(shared / independent, 3),
                "unit": "s",
                "points": len(points),
                "stages_computed_shared": shared_runs,
                "stages_computed_independent": ind_runs,
            }
        )
    )


if __name__ == "__main__":
    main()
