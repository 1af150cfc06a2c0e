"""App. A.1, as the paper did it: choose each method's fine-tuning hyper-parameters on MBPPRefine, then Table 4.

    python -m ilf_lab.a1 --out multirun/a1 [--grid policy.lr=1e-6,5e-6,1e-5 ...] [overrides...]

1. Every tuned method (MBPP gold, human refinements, 1-/2-shot InstructGPT) is trained at every grid point and
   evaluated on MBPPRefine (`eval.split=refine`): one Hydra sweep, shared stages computed once.
2. Each method's point with the highest MBPPRefine pass@1 is chosen (the paper names no metric; pass@1 is ours).
   ILF is not swept: "For ILF, we use the best hyperparameters obtained for the sweep over MBPP programs" (A.1),
   since MBPPRefine's tasks already trained πRefine. Selection reads MBPPRefine results only.
3. Table 4: each method once on MBPPTest at its chosen point (zero-shot has none), then the report.

`<out>/selection.json` records every point's MBPPRefine score and the choice; the stage cache makes step 3 reuse
the chosen points' trained policies.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ilf_lab.errors import ConfigError, IlfError, UsageError, run_cli

TUNED = ("mbpp_gold", "human_refinements", "instructgpt_1shot", "instructgpt_2shot")
INHERITS = {"ilf": "mbpp_gold"}  # A.1: ILF takes the gold sweep's best point
UNTUNED = ("zero_shot",)
# the paper's grid (A.1); smaller grids for small models are passed with --grid and stated with the results
PAPER_GRID = ("policy.lr=1e-6,5e-6,1e-5", "policy.batch_size=32,64,128", "policy.epochs=1,2,5")


def parse_grid(specs: Sequence[str]) -> dict[str, list[str]]:
    """`key=v1,v2` strings -> {key: [v1, v2]}; every key must be a policy.* setting."""
    grid: dict[str, list[str]] = {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        if not sep or not values or not key.startswith("policy."):
            raise ConfigError(f"--grid {spec!r}: expected policy.<key>=v1,v2,... (A.1 tunes πθ*'s fine-tuning)")
        grid[key] = [v for v in values.split(",") if v]
    return grid


def choose(results: Sequence[Any], grid: dict[str, list[str]]) -> dict[str, dict[str, Any]]:
    """Per tuned method, the grid point with the best MBPPRefine pass@1; ties go to the first point in grid
    order (the order the grid was given). Every (method, point) must have exactly one result."""
    order = [tuple(float(v) for v in p.values()) for p in grid_points(grid)]
    points: dict[str, dict[tuple[float, ...], dict[str, Any]]] = {m: {} for m in TUNED}
    for r in results:
        split = r.eval_split or r.setting("eval.split")
        if split != "refine":
            raise IlfError(f"{r.path}: evaluated on {split!r}; A.1 selects on MBPPRefine only")
        if r.experiment not in points:
            continue
        where = tuple(float(r.setting(k)) for k in grid)
        if where not in order:
            raise IlfError(f"{r.path}: {dict(zip(grid, where, strict=True))} is not a point of the grid")
        if where in points[r.experiment]:
            raise IlfError(f"{r.path}: a second result for {r.experiment} at {where} (stale runs in the folder?)")
        points[r.experiment][where] = {"point": {k: str(r.setting(k)) for k in grid},
                                       "pass@1": r.metric("pass@1"), "path": r.path}
    chosen: dict[str, dict[str, Any]] = {}
    for method, pts in points.items():
        missing = [p for p in order if p not in pts or pts[p]["pass@1"] is None]
        if missing:
            raise IlfError(f"{method}: no MBPPRefine pass@1 for grid point(s) {missing}: did its jobs run?")
        best = max(order, key=lambda p: pts[p]["pass@1"])  # max keeps the first of equal scores
        chosen[method] = {"point": pts[best]["point"], "pass@1": pts[best]["pass@1"],
                          "candidates": [pts[p] for p in order]}
    for method, source in INHERITS.items():
        chosen[method] = {"point": chosen[source]["point"], "inherited_from": source}
    return chosen


def _ilf(args: list[str]) -> None:
    cmd = [sys.executable, "-m", "ilf_lab", *args]
    print("+", " ".join(cmd), flush=True)
    if subprocess.run(cmd).returncode != 0:
        raise IlfError(f"the run failed: {' '.join(cmd)}")


def main(argv: Sequence[str] | None = None) -> int:
    from ilf_lab.errors import ArgumentParser

    ap = ArgumentParser(prog="python -m ilf_lab.a1", description=__doc__.splitlines()[0],
                        epilog="example: python -m ilf_lab.a1 --out multirun/a1 scale=demo "
                               "--grid policy.lr=1e-5,5e-5 --grid policy.epochs=1,2")
    ap.add_argument("--out", required=True, help="directory for the selection sweep, the table runs and the report")
    ap.add_argument("--grid", action="append", default=[], help="policy.<key>=v1,v2 (repeat; default: the paper's)")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for every run (scale=..., model=...)")
    args = ap.parse_args(argv)

    def body() -> int:
        from ilf_lab.report import collect, report

        grid = parse_grid(args.grid or PAPER_GRID)
        if any(o.split("=", 1)[0] in ("experiment", "eval.split", *grid) for o in args.overrides):
            raise UsageError("experiment, eval.split and the grid's keys are set by this command")
        out = Path(args.out)
        if out.exists() and any(out.iterdir()):
            raise UsageError(f"--out {out} is not empty: choose a new folder (old points would be mixed in)")
        select_dir = out / "select"
        _ilf(["-m", f"experiment={','.join(TUNED)}", "eval.split=refine",
              *[f"{k}={','.join(v)}" for k, v in grid.items()], f"hydra.sweep.dir={select_dir}", *args.overrides])
        chosen = choose(collect([select_dir]), grid)
        (out / "selection.json").write_text(json.dumps({"grid": grid, "metric": "pass@1 on MBPPRefine",
                                                         "chosen": chosen}, indent=1))
        for method in (*TUNED, *INHERITS, *UNTUNED):
            point = chosen.get(method, {}).get("point", {})
            _ilf([f"experiment={method}", f"hparams_from={out / 'selection.json'}",
                  *[f"{k}={v}" for k, v in point.items()],
                  f"hydra.run.dir={out / 'table' / method}", *args.overrides])
        text, _ = report([out / "table"], out)
        print(text)
        return 0

    return run_cli(body)


def grid_points(grid: dict[str, list[str]]) -> list[dict[str, str]]:
    """Every combination of the grid's values (for docs and tests)."""
    return [dict(zip(grid, combo, strict=True)) for combo in itertools.product(*grid.values())]


if __name__ == "__main__":
    sys.exit(main())
