"""The figures (matplotlib, without pyplot's global state): Table 4 and Tables 2-3 as bars, training curves,
Figure 3 (perplexity) and Figure 4 (scaling of LLM feedback). Each `plot*` returns the Figure (None when its
data is absent) and saves it as PNG when given a path."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ilf_lab import paper
from ilf_lab.report.output import MISSING
from ilf_lab.report.refinements import RefineRow
from ilf_lab.report.series import feedback_scaling, perplexities, training_curves
from ilf_lab.report.table4 import Row
from ilf_lab.results import Results

DPI = 120


def _figure(width: float, height: float, ncols: int = 1) -> tuple[Any, Any]:
    """A figure without pyplot's global state (works headless, in tests, and in notebooks)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, axes


def _save(fig: Any, path: str | os.PathLike | None) -> Any:
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=DPI)
    return fig


def png(fig: Any) -> bytes:
    """The figure as PNG bytes, as `plot*(..., path)` would write them."""
    buf = io.BytesIO()
    fig.savefig(buf, dpi=DPI, format="png")
    return buf.getvalue()


def plot(rows: Sequence[Row], path: str | os.PathLike | None = None) -> Any:
    """table.png: grouped bars per Table 4 row, ours (each model/scale, error bar = std) beside the paper's,
    one panel for pass@1 and one for pass@10. Rows not run show 'not run'. Returns the Figure."""
    paper_rows = [r for r in rows if r.section == "paper"]
    settings = list(dict.fromkeys((r.model, r.scale) for r in paper_rows))
    labels = [
        p.method.replace(" feedback", "\nfeedback").replace("Fine-tuned on ", "FT: ") for p in paper.TABLE4
    ]
    series = len(settings) + 1
    width = 0.8 / series
    fig, axes = _figure(max(9.0, 1.6 * len(labels)), 4.2, ncols=2)
    for ax, key in zip(axes, ("pass@1", "pass@10"), strict=True):
        xs = range(len(paper.TABLE4))
        for s, setting in enumerate(settings):
            by_exp = {r.experiment: r for r in paper_rows if (r.model, r.scale) == setting}
            means, errs = [], []
            for p in paper.TABLE4:
                mean, std, _ = by_exp[p.experiment].stat(key) if p.experiment in by_exp else (None, None, 0)
                means.append(mean)
                errs.append(std if std is not None else float("nan"))
            pos = [x - 0.4 + width * (s + 0.5) for x in xs]
            heights = [m if m is not None else 0.0 for m in means]
            ax.bar(pos, heights, width, yerr=errs, capsize=2, label=f"ours: {setting[0]} / {setting[1]}")
            for x, m in zip(pos, means, strict=True):
                if m is None:
                    ax.text(x, 0.5, "not run", rotation=90, ha="center", va="bottom", fontsize=7, color="0.4")
        pos = [x - 0.4 + width * (series - 0.5) for x in xs]
        vals = [p.pass1 if key == "pass@1" else p.pass10 for p in paper.TABLE4]
        ax.bar(pos, vals, width, color="0.75", edgecolor="0.3", hatch="//", label=f"paper: {paper.MODEL}")
        ax.set_xticks(list(xs), labels, fontsize=7, rotation=30, ha="right")
        ax.set_ylabel(f"{key} on MBPPTest (%)")
        ax.set_title(key)
        ax.set_ylim(0, 100)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7, loc="upper right")
    fig.suptitle("Table 4: ours vs. the paper", fontsize=10)
    return _save(fig, path)


def plot_refinements(rows: Sequence[RefineRow], path: str | os.PathLike | None = None) -> Any:
    """refinements.png: per refiner/feedback, pass@1 of the refinements and the share of tasks with a passing one."""
    if not rows:
        return None
    fig, axes = _figure(max(6.0, 1.5 * len(rows)), 3.8, ncols=1)
    ax = axes[0]
    labels = [f"{g.refiner_name}\n{g.feedback_label}\n({g.model}, {g.scale})" for g in rows]
    xs = range(len(rows))
    for off, key, name in (
        (-0.2, "pass@1", "pass@1"),
        (0.2, "frac_tasks_with_passing", "tasks with ≥1 passing"),
    ):
        vals = [g.stat(key)[0] for g in rows]
        ax.bar([x + off for x in xs], [v or 0.0 for v in vals], 0.4, label=name)
        for x, v in zip(xs, vals, strict=True):
            ax.text(x + off, (v or 0.0) + 0.5, MISSING if v is None else f"{v:.1f}", ha="center", fontsize=7)
    top = max(
        (v for g in rows for k in ("pass@1", "frac_tasks_with_passing") if (v := g.stat(k)[0])), default=0
    )
    ax.set_ylim(0, top * 1.15 + 1.0)  # room for the value labels
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set_ylabel("% (refinements of MBPPTrain x0)")
    ax.set_title("Tables 2-3: do refinements pass their tests?", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_training(results: Sequence[Results], path: str | os.PathLike | None = None) -> Any:
    """Training loss per step, one panel per stage (refiner = πRefine, policy = πθ*); None if no curves."""
    curves = training_curves(results)
    order = {"refiner": 0, "policy": 1}  # pipeline order
    stages = sorted({s for c in curves.values() for s in c}, key=lambda s: (order.get(s, 2), s))
    if not stages:
        return None
    fig, axes = _figure(5.0 * len(stages), 3.6, ncols=len(stages))
    for ax, stage in zip(axes, stages, strict=True):
        for label, c in curves.items():
            if stage in c:
                ax.plot(
                    range(1, len(c[stage]) + 1),
                    c[stage],
                    marker="." if len(c[stage]) < 30 else None,
                    label=label,
                )
        ax.set_title({"refiner": "πRefine (refiner)", "policy": "πθ* (policy)"}.get(stage, stage))
        ax.set_xlabel("optimizer step")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel("training loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    return _save(fig, path)


def plot_perplexity(results: Sequence[Results], path: str | os.PathLike | None = None) -> Any:
    """Figure 3: histogram of the base model's perplexity on each fine-tuning source; None if absent."""
    data = perplexities(results)
    if not data:
        return None
    fig, (ax,) = _figure(6.0, 3.6)
    top = max(max(v) for v in data.values())
    bins = [i * top / 30 for i in range(31)]
    for source, vals in sorted(data.items()):
        ax.hist(vals, bins=bins, alpha=0.5, label=f"{source} (n={len(vals)})")
    ax.set_xlabel("perplexity under the base model")
    ax.set_ylabel("programs")
    ax.set_title("Figure 3: perplexity of the fine-tuning data")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_feedback_scaling(results: Sequence[Results], path: str | os.PathLike | None = None) -> Any:
    """Figure 4: pass@1 / pass@10 vs. the number of tasks with LLM feedback; None if absent."""
    data = feedback_scaling(results)
    if not data:
        return None
    fig, axes = _figure(9.0, 3.6, ncols=2)
    for ax, idx, key in ((axes[0], 1, "pass@1"), (axes[1], 2, "pass@10")):
        for fb, pts in data.items():
            xs = [p[0] for p in pts if p[idx] is not None]
            ys = [p[idx] for p in pts if p[idx] is not None]
            ax.plot(xs, ys, marker="o", label=fb)
        ax.set_xlabel("MBPPTrain tasks with LLM feedback")
        ax.set_ylim(bottom=0)  # from zero: small differences should look small
        ax.set_ylabel(f"{key} on MBPPTest (%)")
        ax.set_title(f"Figure 4: {key}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)
