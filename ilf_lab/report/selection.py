"""App. A.1 model selection: the hyper-parameters of the best point of a sweep evaluated on MBPPRefine."""

from __future__ import annotations

from collections.abc import Sequence

from ilf_lab.report.table4 import eval_split
from ilf_lab.results import Results


def best_overrides(
    results: Sequence[Results], metric: str = "pass@1", split: str = "refine", prefix: str = "policy."
) -> tuple[list[str], Results | None]:
    """The `prefix` overrides of the result with the highest `metric` among those evaluated on `split`
    (MBPPRefine), and that result; ([], None) when none qualifies."""
    pool = [r for r in results if (eval_split(r) or "test") == split and r.metric(metric) is not None]
    if not pool:
        return [], None
    best = max(pool, key=lambda r: r.metric(metric))
    return [o for o in best.overrides if o.lstrip("+").startswith(prefix)], best
