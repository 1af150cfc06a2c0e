"""Numbers over runs: mean ± std over seeds, per-task pass@k, and the paired bootstrap of a difference (over
seeds and tasks) with the smallest difference the design can detect."""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ilf_lab.results import Results


def summary(values: Iterable[float | None], scale: float = 100.0) -> tuple[float | None, float | None, int]:
    """(mean, std, count) of the values that are not None, times `scale` (fractions -> %); std None for one."""
    vals = [v * scale for v in values if v is not None]
    if not vals:
        return None, None, 0
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None), len(vals)


def per_task_pass(runs: Sequence[Results], k: int = 1) -> dict[str, float]:
    """Per-task pass@k (a fraction) from results.json's `per_task` counts, averaged over runs (seeds)."""
    from ilf_lab.execution.passk import pass_at_k

    acc: dict[str, list[float]] = {}
    for r in runs:
        for tid, nc in r.per_task.items():
            n, c = nc["n"], nc["c"]
            if n >= k:
                acc.setdefault(str(tid), []).append(pass_at_k(n, c, k))
    return {t: statistics.fmean(v) for t, v in acc.items()}


@dataclass(frozen=True)
class Paired:
    """A paired difference of pass@k in points: `runs` minus `reference` on the tasks every run evaluated."""

    mean: float
    lo: float  # 95 % bootstrap interval
    hi: float
    se: float  # the bootstrap's standard error
    tasks: int
    runs: int
    reference_runs: int

    @property
    def mde(self) -> float:
        """The smallest |Δ| this design detects with power 0.8 at α = 0.05 (two-sided, normal approximation)."""
        return MDE_Z * self.se


MDE_Z = 1.959964 + 0.841621  # z_{1-α/2} + z_{power}, α = 0.05, power 0.8


def per_run_task_pass(runs: Sequence[Results], k: int = 1) -> tuple[list[str], list[list[float]]]:
    """(tasks, matrix[run][task]) of pass@k fractions on the tasks every run evaluated with >= k samples."""
    from ilf_lab.execution.passk import pass_at_k

    per = [{str(t): pass_at_k(nc["n"], nc["c"], k) for t, nc in r.per_task.items() if nc["n"] >= k} for r in runs]
    tasks = sorted(set.intersection(*(set(p) for p in per))) if per else []
    return tasks, [[p[t] for t in tasks] for p in per]


def paired(
    runs: Sequence[Results], reference: Sequence[Results], k: int = 1, iters: int = 4000, seed: int = 0
) -> Paired | None:
    """Δ pass@k with a two-level paired bootstrap: each draw resamples each side's runs (seeds: training and
    sampling noise), then the tasks (which tasks are solvable dominates), and differences the per-task means of
    the drawn runs on the drawn tasks. With one run per side it is the plain paired bootstrap over tasks.
    None when the sides share no task."""
    import numpy as np

    ta, a = per_run_task_pass(runs, k)
    tb, b = per_run_task_pass(reference, k)
    tasks = sorted(set(ta) & set(tb))
    if not tasks:
        return None
    A = np.array(a)[:, [ta.index(t) for t in tasks]] * 100
    B = np.array(b)[:, [tb.index(t) for t in tasks]] * 100
    rng = np.random.default_rng(seed)
    ra = A[rng.integers(0, len(A), (iters, len(A)))].mean(axis=1)  # (iters, tasks)
    rb = B[rng.integers(0, len(B), (iters, len(B)))].mean(axis=1)
    pick = rng.integers(0, len(tasks), (iters, len(tasks)))
    boots = (np.take_along_axis(ra, pick, 1) - np.take_along_axis(rb, pick, 1)).mean(axis=1)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return Paired(float(A.mean(0).mean() - B.mean(0).mean()), float(lo), float(hi), float(boots.std(ddof=1)),
                  len(tasks), len(A), len(B))


def paired_delta(
    runs: Sequence[Results],
    reference: Sequence[Results],
    k: int = 1,
    iters: int = 4000,
    seed: int = 0,
) -> tuple[float, float, float] | None:
    """(Δ, low, high) of `paired`: pass@k of `runs` minus `reference` in points with its 95 % interval."""
    p = paired(runs, reference, k, iters, seed)
    return None if p is None else (p.mean, p.lo, p.hi)
