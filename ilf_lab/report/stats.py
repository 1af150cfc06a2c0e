"""Numbers over runs: mean ± std over seeds, per-task pass@k, and a paired difference over tasks and seeds with
its interval and the smallest difference the design can detect."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

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
    lo: float  # 95 % interval (t, Satterthwaite df)
    hi: float
    se: float  # standard error: task spread of the paired differences + seed (training) variance
    df: float
    mde: float | None  # smallest |Δ| detected with power 0.8 at α = 0.05 (two-sided); None without spread
    tasks: int
    runs: int
    reference_runs: int
    seed_matched: bool = False  # runs paired seed by seed (both sides ran the same seeds)
    left_out: int = 0  # runs of the side with more seeds left out: no counterpart seed on the other side


def t_ppf(p: float, df: float) -> float:
    """Student-t quantile (no scipy here): Simpson's rule on the density, then bisection; exact to ~1e-6."""
    if math.isinf(df) or df > 1e4:
        return statistics.NormalDist().inv_cdf(p)
    if p < 0.5:
        return -t_ppf(1 - p, df)
    const = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(x: float, steps: int = 2000) -> float:
        h = x / steps
        f = [math.exp(const - (df + 1) / 2 * math.log1p((i * h) ** 2 / df)) for i in range(steps + 1)]
        return 0.5 + h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        lo, hi = hi, hi * 2
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def per_run_task_pass(runs: Sequence[Results], k: int = 1) -> tuple[list[str], list[list[float]]]:
    """(tasks, matrix[run][task]) of pass@k fractions on the tasks every run evaluated with >= k samples; runs
    with no such task (no per-task counts) are left out."""
    from ilf_lab.execution.passk import pass_at_k

    per = [{str(t): pass_at_k(nc["n"], nc["c"], k) for t, nc in r.per_task.items() if nc["n"] >= k} for r in runs]
    per = [p for p in per if p]
    tasks = sorted(set.intersection(*(set(p) for p in per))) if per else []
    return tasks, [[p[t] for t in tasks] for p in per]


def _seed_variance(x: Any) -> float:
    """σ²_seed of one side's [runs x tasks] matrix (a run-wide shift: training, sampling), by moments: the
    variance of the runs' means minus what the run x task residual alone puts there."""
    n, t = x.shape
    if n < 2 or t < 2:
        return 0.0
    resid = x - x.mean(1, keepdims=True) - x.mean(0, keepdims=True) + x.mean()
    ms_resid = float((resid**2).sum()) / ((n - 1) * (t - 1))
    return max(0.0, float(x.mean(1).var(ddof=1)) - ms_resid / t)


def _known_distinct(seeds: list[int | None]) -> bool:
    return None not in seeds and len(set(seeds)) == len(seeds)


def _common_seeds(runs: Sequence[Results], reference: Sequence[Results]) -> tuple[list[Results], list[Results]]:
    """Both sides cut to the seeds they share when one side ran a subset of the other's seeds (say one LLM
    row at seed 0 against three zero-shot seeds): its runs then meet their own seed's counterparts, whose
    evaluation samples share its sampling seeds, instead of other seeds' noise. Else both unchanged."""
    a, b = [r.seed for r in runs], [r.seed for r in reference]
    if not (_known_distinct(a) and _known_distinct(b)):
        return list(runs), list(reference)
    common = set(a) & set(b)
    if not common or common not in (set(a), set(b)):
        return list(runs), list(reference)
    return [r for r in runs if r.seed in common], [r for r in reference if r.seed in common]


def _seed_order(runs: Sequence[Results], reference: Sequence[Results]) -> list[int] | None:
    """Indices into `reference` that line its runs up with `runs` seed by seed, when both sides ran the same
    seeds once each; else None."""
    a, b = [r.seed for r in runs], [r.seed for r in reference]
    if not a or not (_known_distinct(a) and _known_distinct(b)) or sorted(a) != sorted(b):
        return None
    return [b.index(s) for s in a]


def paired(runs: Sequence[Results], reference: Sequence[Results], k: int = 1) -> Paired | None:
    """Δ pass@k in points for seeds crossed with tasks. The per-task differences of the runs' means carry the
    task spread and the per-task sampling noise (their variance / tasks); a shift shared by all tasks of one
    run (a seed's trained model) is the same on every task, so a seed variance / runs is added. When both sides
    ran the same seeds, the runs are paired seed by seed too and the seed variance is that of the per-seed
    differences: what a seed shifts on both sides cancels (the protocol's matched rows: seed s of ILF and of a
    baseline train on the same task IDs; against zero-shot only the sampling seed is shared, and pairing is
    still valid). When one side ran a subset of the other's seeds, the other side is cut to those seeds first
    (`left_out` says how many of its runs). Otherwise (other or partly shared seeds) each side's own seed
    variance is added.
    Interval and MDE use t with Satterthwaite's df: with 3 seeds a seed effect is seen with few df.
    None when the sides share no task."""
    import numpy as np

    def scored(rs: Sequence[Results]) -> list[Results]:
        return [r for r in rs if any(nc["n"] >= k for nc in r.per_task.values())]

    runs, reference = scored(runs), scored(reference)
    total = len(runs) + len(reference)
    runs, reference = _common_seeds(runs, reference)
    left_out = total - len(runs) - len(reference)
    ta, a = per_run_task_pass(runs, k)
    tb, b = per_run_task_pass(reference, k)
    tasks = sorted(set(ta) & set(tb))
    if not tasks:
        return None
    A = np.array(a)[:, [ta.index(t) for t in tasks]] * 100
    B = np.array(b)[:, [tb.index(t) for t in tasks]] * 100
    d = A.mean(0) - B.mean(0)
    mean, n = float(d.mean()), len(tasks)
    parts = [(float(d.var(ddof=1)) / n if n > 1 else 0.0, n - 1)]
    order = _seed_order(runs, reference)
    if order is not None:
        D = A - B[order]
        parts.append((_seed_variance(D) / len(D), len(D) - 1))
    else:
        parts += [(_seed_variance(x) / len(x), len(x) - 1) for x in (A, B)]
    var = sum(v for v, _ in parts)
    if var <= 0 or n < 2:
        return Paired(mean, mean, mean, 0.0, math.inf, None, n, len(A), len(B), order is not None, left_out)
    df = var**2 / sum(v**2 / f for v, f in parts if v > 0)
    se = math.sqrt(var)
    half = t_ppf(0.975, df) * se
    return Paired(mean, mean - half, mean + half, se, df, (t_ppf(0.975, df) + t_ppf(0.8, df)) * se,
                  n, len(A), len(B), order is not None, left_out)


def paired_delta(
    runs: Sequence[Results],
    reference: Sequence[Results],
    k: int = 1,
) -> tuple[float, float, float] | None:
    """(Δ, low, high) of `paired`: pass@k of `runs` minus `reference` in points with its 95 % interval."""
    p = paired(runs, reference, k)
    return None if p is None else (p.mean, p.lo, p.hi)
