"""App. A.1, as the paper did it: choose each method's fine-tuning hyper-parameters on MBPPRefine, then Table 4.

    python -m ilf_lab.a1 --out multirun/a1 [--grid policy.lr=1e-6,5e-6,1e-5 ...] [--select sampling.n=10 ...]
                         [--methods mbpp_gold,human_refinements] [--seeds 0,1,2] [--resume] [overrides...]

1. Every tuned method (MBPP gold, human refinements, 1-/2-shot InstructGPT) is trained at every grid point and
   evaluated on MBPPRefine (`eval.split=refine`): one Hydra sweep, shared stages computed once.
2. Each method's point with the highest MBPPRefine pass@1 is chosen (the paper names no metric; pass@1 is ours).
   ILF is not swept: "For ILF, we use the best hyperparameters obtained for the sweep over MBPP programs" (A.1),
   since MBPPRefine's tasks already trained πRefine. Selection reads MBPPRefine results only.
3. Table 4: each method on MBPPTest at its chosen point (zero-shot has none), once per `--seeds` seed (the
   point is chosen once, at the overrides' seed), then the report.

`<out>/selection.json` records every point's MBPPRefine score and the choice; the stage cache makes step 3 reuse
the chosen points' trained policies. `--select` overrides apply to step 1 only (a cheaper MBPPRefine evaluation);
`--resume` continues an interrupted command in the same `--out`: it keeps selection.json (same grid) and every
Table 4 run that already wrote its results.json, so a block of work survives the loss of the stage cache too.
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
from ilf_lab.io import atomic_write_text

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


def choose(
    results: Sequence[Any], grid: dict[str, list[str]], methods: Sequence[str] = TUNED
) -> dict[str, dict[str, Any]]:
    """Per tuned method, the grid point with the best MBPPRefine pass@1; ties go to the first point in grid
    order (the order the grid was given). Every (method, point) must have exactly one result."""
    order = [tuple(float(v) for v in p.values()) for p in grid_points(grid)]
    points: dict[str, dict[tuple[float, ...], dict[str, Any]]] = {m: {} for m in methods}
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
        if source in chosen:
            chosen[method] = {"point": chosen[source]["point"], "inherited_from": source}
    return chosen


def _ilf(args: list[str]) -> None:
    cmd = [sys.executable, "-m", "ilf_lab", *args]
    print("+", " ".join(cmd), flush=True)
    if subprocess.run(cmd).returncode != 0:
        raise IlfError(f"the run failed: {' '.join(cmd)}")


def parse_methods(spec: str) -> list[str]:
    methods = [m for m in spec.split(",") if m]
    unknown = [m for m in methods if m not in TUNED]
    if unknown or not methods or len(set(methods)) != len(methods):
        raise ConfigError(f"--methods {spec!r}: expected a comma list of {', '.join(TUNED)}")
    return methods


def parse_seeds(spec: str | None) -> list[int | None]:
    if spec is None:
        return [None]  # one run at the overrides' (or the config's) seed
    try:
        seeds = [int(s) for s in spec.split(",") if s]
    except ValueError:
        raise ConfigError(f"--seeds {spec!r}: expected a comma list of integers, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {spec!r}: expected distinct integers, e.g. 0,1,2")
    return list(seeds)


def _selection(out: Path, grid: dict[str, list[str]], methods: list[str], select: list[str],
               overrides: list[str], resume: bool) -> dict[str, Any]:
    """Step 1-2, or the selection a resumed command already made (which must be for this very command)."""
    from ilf_lab.report import collect

    path = out / "selection.json"
    made_by = {"grid": grid, "methods": methods, "overrides": overrides, "select_overrides": select}
    if resume and path.exists():
        old = json.loads(path.read_text())
        differs = [k for k, v in made_by.items() if old.get(k) != v]
        if differs:
            raise UsageError(f"{path}: made by a command with other {', '.join(differs)} "
                             f"({', '.join(repr(old.get(k)) for k in differs)}): use a new --out")
        print(f"kept {path}", flush=True)
        return old["chosen"]
    select_dir = out / "select"
    _ilf(["-m", f"experiment={','.join(methods)}", "eval.split=refine",
          *[f"{k}={','.join(v)}" for k, v in grid.items()], f"hydra.sweep.dir={select_dir}", *overrides, *select])
    chosen = choose(collect([select_dir]), grid, methods)
    atomic_write_text(path, json.dumps({**made_by, "metric": "pass@1 on MBPPRefine", "chosen": chosen}, indent=1))
    return chosen


def _table_runs(out: Path, chosen: dict[str, Any], methods: list[str], seeds: list[int | None],
                overrides: list[str]) -> dict[Path, list[str]]:
    """{run dir: the run's overrides} for Table 4: every method at its point, once per seed."""
    runs: dict[Path, list[str]] = {}
    for method in [*methods, *(m for m, src in INHERITS.items() if src in methods), *UNTUNED]:
        point = chosen.get(method, {}).get("point", {})
        for seed in seeds:
            run_dir = out / "table" / method / ("" if seed is None else f"seed{seed}")
            runs[run_dir] = [f"experiment={method}", f"hparams_from={out / 'selection.json'}",
                             *[f"{k}={v}" for k, v in point.items()], *([] if seed is None else [f"seed={seed}"]),
                             f"hydra.run.dir={run_dir}", *overrides]
    return runs


def _run_table(runs: dict[Path, list[str]], out: Path) -> None:
    """Run each Table 4 run that has no results.json yet. A run dir records the arguments it was started with
    (`a1_args.json`), so a resumed command keeps only what this command would have made: a results.json from
    other arguments, or in no run dir of this command (another layout of seeds), stops it."""
    expected = {(d / "results.json").resolve() for d in runs}
    stale = [p for p in sorted((out / "table").rglob("results.json")) if p.resolve() not in expected]
    if stale:
        raise UsageError(f"{stale[0]}: a run this command would not make (other --methods or --seeds?): "
                         "use a new --out")
    for run_dir, args in runs.items():
        marker = run_dir / "a1_args.json"
        if (run_dir / "results.json").exists():
            if not marker.exists() or json.loads(marker.read_text()) != args:
                raise UsageError(f"{run_dir}: made with other arguments than {args}: use a new --out")
            print(f"kept {run_dir / 'results.json'}", flush=True)
            continue
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(marker, json.dumps(args))
        _ilf(args)


def main(argv: Sequence[str] | None = None) -> int:
    from ilf_lab.errors import ArgumentParser

    ap = ArgumentParser(prog="python -m ilf_lab.a1", description=__doc__.splitlines()[0],
                        epilog="example: python -m ilf_lab.a1 --out multirun/a1 scale=demo "
                               "--grid policy.lr=1e-5,5e-5 --grid policy.epochs=1,2 --select sampling.n=5")
    ap.add_argument("--out", required=True, help="directory for the selection sweep, the table runs and the report")
    ap.add_argument("--grid", action="append", default=[], help="policy.<key>=v1,v2 (repeat; default: the paper's)")
    ap.add_argument("--select", action="append", default=[],
                    help="an override for the MBPPRefine selection sweep only (repeat), e.g. data.max_test_tasks=100")
    ap.add_argument("--methods", default=",".join(TUNED), help="the tuned methods, comma list (default: all four); "
                    "ILF is run when mbpp_gold is among them, zero-shot always")
    ap.add_argument("--seeds", default=None, help="Table 4 seeds, comma list (each run in table/<method>/seed<N>)")
    ap.add_argument("--resume", action="store_true",
                    help="continue in a non-empty --out: keep its selection.json and finished Table 4 runs")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for every run (scale=..., model=...)")
    args = ap.parse_args(argv)

    def body() -> int:
        from ilf_lab.report import report

        grid = parse_grid(args.grid or PAPER_GRID)
        methods, seeds = parse_methods(args.methods), parse_seeds(args.seeds)
        check_overrides(args.overrides, grid, seeds_set=args.seeds is not None, what="an override")
        check_overrides(args.select, grid, seeds_set=True, what="--select")
        out = Path(args.out)
        if out.exists() and any(out.iterdir()) and not args.resume:
            raise UsageError(f"--out {out} is not empty: choose a new folder (old points would be mixed in), "
                             "or --resume to continue the command that made it")
        out.mkdir(parents=True, exist_ok=True)
        chosen = _selection(out, grid, methods, args.select, args.overrides, args.resume)
        _run_table(_table_runs(out, chosen, methods, seeds, args.overrides), out)
        text, _ = report([out / "table"], out)
        print(text)
        return 0

    return run_cli(body)


SET_HERE = ("experiment", "eval.split", "hparams_from", "hydra.run.dir", "hydra.sweep.dir")


def check_overrides(overrides: Sequence[str], grid: dict[str, list[str]], seeds_set: bool, what: str) -> None:
    """Refuse overrides of what this command sets (last wins in Hydra, so one would silently redirect every
    run): the experiment (also as `+experiment@_global_=`), the split, the grid, the run folders, and the seed
    where the command sets it (always in the selection sweep: A.1 chooses once, at the runs' seed)."""
    fixed = (*SET_HERE, *grid, *(("seed",) if seeds_set else ()))
    for o in overrides:
        key = o.split("=", 1)[0].lstrip("+~").split("@", 1)[0]
        if key in fixed:
            raise UsageError(f"{what} {o!r}: {key} is set by this command")


def grid_points(grid: dict[str, list[str]]) -> list[dict[str, str]]:
    """Every combination of the grid's values (for docs and tests)."""
    return [dict(zip(grid, combo, strict=True)) for combo in itertools.product(*grid.values())]


if __name__ == "__main__":
    sys.exit(main())
