"""The data behind the figures: training curves, Figure 3 (perplexity), Figure 4 (scaling of LLM feedback)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from ilf_lab.io import iter_jsonl
from ilf_lab.report.stats import summary
from ilf_lab.report.table4 import run_label
from ilf_lab.results import Results


def training_curves(results: Sequence[Results]) -> dict[str, dict[str, list[float]]]:
    """{run label: {stage: losses}} from results.json `training.<stage>.losses` (runs without training omitted)."""
    out: dict[str, dict[str, list[float]]] = {}
    for r in results:
        curves = {
            stage: [float(x) for x in (t or {}).get("losses") or [] if x is not None]
            for stage, t in r.training.items()
            if isinstance(t, dict)
        }
        curves = {k: v for k, v in curves.items() if v}
        if curves:
            label = run_label(r)
            while label in out:
                label += "'"
            out[label] = curves
    return out


def perplexities(results: Sequence[Results]) -> dict[str, list[float]]:
    """Figure 3's data: {source: [ppl, ...]} from each result's `artifacts.perplexity` JSONL
    (rows {source, task_id, ppl}); {} when no result has that artifact."""
    out: dict[str, list[float]] = {}
    for r in results:
        p = r.artifacts.get("perplexity")
        if p and not Path(p).is_file() and r.path:  # a published run: the file sits beside its results.json
            p = str(Path(r.path).parent / Path(p).name)
        if not p or not Path(p).is_file():
            continue
        for _, row in iter_jsonl(p):  # a malformed line is a DataError naming the file and the line
            ppl = row.get("ppl")
            if isinstance(ppl, (int, float)) and math.isfinite(ppl):
                out.setdefault(str(row.get("source")), []).append(float(ppl))
    return out


def feedback_num_tasks(result: Results) -> int | None:
    """The number of MBPPTrain tasks with LLM feedback (Figure 4's x): results.json `config.feedback.num_tasks`,
    else a `feedback.num_tasks=` override; None when the run did not set it."""
    v = result.setting("feedback.num_tasks")
    if v is None:
        for o in result.overrides:
            if o.lstrip("+").startswith("feedback.num_tasks="):
                v = o.split("=", 1)[1]
    try:
        return int(v) if v not in (None, "null") else None
    except (TypeError, ValueError):
        return None


def feedback_scaling(results: Sequence[Results]) -> dict[str, list[tuple[int, float | None, float | None, int]]]:
    """Figure 4's data: {feedback: [(num_tasks, pass@1 %, pass@10 %, runs), ...]} sorted by num_tasks (means
    over seeds); {} when no result records feedback.num_tasks."""
    acc: dict[tuple[str, int], list[Results]] = {}
    for r in results:
        n = feedback_num_tasks(r)
        if n is not None:
            acc.setdefault((r.feedback, n), []).append(r)
    out: dict[str, list[tuple[int, float | None, float | None, int]]] = {}
    for (fb, n), rs in sorted(acc.items()):
        p1, p10 = (summary(r.metric(k) for r in rs)[0] for k in ("pass@1", "pass@10"))
        out.setdefault(fb, []).append((n, p1, p10, len(rs)))
    return out
