"""Numbers over runs: mean ± std over seeds, per-task pass@k, and the paired bootstrap of a difference."""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence

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


def paired_delta(
    runs: Sequence[Results],
    reference: Sequence[Results],
    k: int = 1,
    iters: int = 4000,
    seed: int = 0,
) -> tuple[float, float, float] | None:
    """pass@k of `runs` minus `reference` in points, over the tasks both evaluated, with a 95 % paired bootstrap
    interval over tasks (which tasks are solvable dominates the noise); None when they share no task."""
    import numpy as np

    a, b = per_task_pass(runs, k), per_task_pass(reference, k)
    tasks = sorted(set(a) & set(b))
    if not tasks:
        return None
    d = np.array([a[t] - b[t] for t in tasks]) * 100
    boots = d[np.random.default_rng(seed).integers(0, len(d), (iters, len(d)))].mean(axis=1)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return float(d.mean()), float(lo), float(hi)
