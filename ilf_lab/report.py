"""Results -> the paper's Table 4 (architecture contract 4), and the data behind the notebooks' figures.

    python -m ilf_lab.report DIR... [--out DIR]

finds every `results.json` under the dirs, prints the table as markdown (ours beside the paper's numbers, one
table per model/scale), and writes `table.csv` and `table.png` into `--out` (default: the first DIR). Results
that are no row of Table 4 (a hyper-parameter point, a feedback-scaling point, iterative rounds, ...) are listed in
a section of their own; several runs of one row (seeds) are shown as mean ± std with their count. Runs that
sampled refinements (every ILF-style run, and the `refine_analysis` sweep's runs, which stop after the refine
stage) also give Tables 2-3: how often the refinements pass, by refiner and feedback (`refinements.csv/.png`).

Everything the notebooks plot comes from the functions here, so the notebooks hold no logic of their own.
No pandas: the csv module and matplotlib only.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ilf_lab import paper

MISSING = "—"
REQUIRED = ("experiment", "feedback", "train_on", "model", "pass@1", "pass@10", "n_samples", "num_tasks")

# overrides that do not change what a Table 4 row measures: which row / model / scale (group choices, shown
# in the table), the seed, and where or how fast it runs
_NEUTRAL_EXACT = frozenset(
    {
        "experiment",
        "feedback",
        "train_on",
        "model",
        "scale",
        "seed",
        "name",
        "data.dir",
        "sampling.engine",
        "sampling.batch_size",
        "execution.workers",
        "execution.timeout",
        "execution.memory_mb",
        "eval",
        "eval.benchmarks",
        "eval.perplexity",
        "eval.humaneval_max_problems",
        "feedback.backend",
        "feedback.model",
        "feedback.base_url",
        "feedback.api_key_env",
        "feedback.max_concurrency",
        "feedback.max_retries",
        "trainer",
    }
)
_NEUTRAL_PREFIXES = ("logger", "paths", "hydra", "trainer")


class ReportError(Exception):
    """A problem with the inputs; the CLI prints it as one line and exits 2."""


# ---------------------------------------------------------------------------------------------- collecting


def collect(dirs: Iterable[str | os.PathLike]) -> list[dict[str, Any]]:
    """Every results.json under `dirs` (recursively; a results.json path is taken as is), parsed and checked.

    Each result gets `_path` (its file). Raises ReportError naming the file for a malformed one, and when
    nothing is found at all.
    """
    dirs = [Path(d) for d in dirs]
    paths: list[Path] = []
    for d in dirs:
        if d.is_file():
            paths.append(d)
        elif d.is_dir():
            paths.extend(sorted(d.rglob("results.json")))
        else:
            raise ReportError(f"{d}: no such file or directory")
    seen: set[Path] = set()
    results = []
    for p in paths:
        rp = p.resolve()
        if rp in seen:
            continue
        seen.add(rp)
        results.append(load(p))
    if not results:
        raise ReportError(f"no results.json found under {', '.join(str(d) for d in dirs)}")
    return results


def load(path: str | os.PathLike) -> dict[str, Any]:
    """One results.json, checked against contract 2 (and the pass@k / counts types the table needs)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReportError(f"{path}: malformed results.json ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise ReportError(f"{path}: malformed results.json (not a JSON object)")
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise ReportError(f"{path}: malformed results.json (missing {', '.join(missing)})")
    for k in ("pass@1", "pass@10"):
        _check_fraction(path, k, data[k])
    for k in ("n_samples", "num_tasks"):
        v = data[k]
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
            raise ReportError(f"{path}: malformed results.json ({k}={v!r} is not a count)")
    he = (data.get("benchmarks") or {}).get("humaneval") if isinstance(data.get("benchmarks"), dict) else None
    if he is not None:
        if not isinstance(he, dict):
            raise ReportError(f"{path}: malformed results.json (benchmarks.humaneval is not an object)")
        for k in ("pass@1", "pass@10"):
            _check_fraction(path, f"benchmarks.humaneval.{k}", he.get(k))
    data["_path"] = str(path)
    return data


def _check_fraction(path: Path, key: str, v: Any) -> None:
    if v is None:
        return  # n_samples < k
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not (0.0 <= v <= 1.0) or math.isnan(v):
        raise ReportError(f"{path}: malformed results.json ({key}={v!r} is not a fraction in [0, 1] or null)")


# ---------------------------------------------------------------------------------------------- the table


@dataclass
class Row:
    """One line of the report: a Table 4 row (possibly with no runs) or another result group."""

    model: str
    scale: str
    method: str
    feedback_source: str
    finetuning_data: str
    experiment: str
    paper: paper.PaperRow | None = None
    label: str = ""  # what sets an `other` row apart (its overrides, rounds, ...)
    runs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def section(self) -> str:
        return "paper" if self.paper is not None else "other"

    def stat(self, key: str, benchmark: str = "mbpp") -> tuple[float | None, float | None, int]:
        """(mean, std, count) of pass@k in %, over the runs that have it; std None for a single run."""
        values = [v * 100 for v in (_metric(r, key, benchmark) for r in self.runs) if v is not None]
        if not values:
            return None, None, 0
        std = statistics.stdev(values) if len(values) > 1 else None
        return statistics.fmean(values), std, len(values)

    def counts(self, key: str) -> str:
        vals = sorted({r.get(key) for r in self.runs if r.get(key) is not None})
        return "/".join(str(v) for v in vals) if vals else MISSING

    def policy_examples(self) -> str:
        """How many programs πθ* was fine-tuned on (0: nothing passed, the base policy was evaluated)."""
        vals = sorted({(r.get("counts") or {}).get("policy_examples") for r in self.runs} - {None})
        if not vals or all(r.get("train_on") == "none" for r in self.runs):
            return MISSING
        return "/".join(str(v) for v in vals) + (" (base policy)" if vals == [0] else "")

    @property
    def has_humaneval(self) -> bool:
        return any(
            _metric(r, "pass@1", "humaneval") is not None or _metric(r, "pass@10", "humaneval") is not None
            for r in self.runs
        )


def per_task_pass(runs: Sequence[dict[str, Any]], k: int = 1) -> dict[str, float]:
    """Per-task pass@k (a fraction) from results.json's `per_task` counts, averaged over runs (seeds)."""
    from ilf_lab.execution.passk import pass_at_k

    acc: dict[str, list[float]] = {}
    for r in runs:
        for tid, nc in (r.get("per_task") or {}).items():
            n, c = (nc or {}).get("n"), (nc or {}).get("c")
            if isinstance(n, int) and isinstance(c, int) and 0 <= c <= n and n >= k:
                acc.setdefault(str(tid), []).append(pass_at_k(n, c, k))
    return {t: statistics.fmean(v) for t, v in acc.items()}


def paired_delta(
    runs: Sequence[dict[str, Any]],
    reference: Sequence[dict[str, Any]],
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


def _delta_fmt(delta: tuple[float, float, float] | None) -> str:
    if delta is None:
        return MISSING
    mean, lo, hi = delta
    return f"{mean:+.1f} [{lo:+.1f}, {hi:+.1f}]"


def _zero_shot(rows: Sequence[Row]) -> dict[tuple[str, str], Row]:
    """Per (model, scale) the zero-shot row with runs: the reference for the Δ column."""
    return {
        (r.model, r.scale): r for r in rows if r.paper is not None and r.experiment == "zero_shot" and r.runs
    }


def _delta(row: Row, zero: dict[tuple[str, str], Row]) -> tuple[float, float, float] | None:
    ref = zero.get((row.model, row.scale))
    if ref is None or ref is row or not row.runs:
        return None
    return paired_delta(row.runs, ref.runs)


def _metric(result: dict[str, Any], key: str, benchmark: str = "mbpp") -> float | None:
    if benchmark == "mbpp":
        return result.get(key)
    return ((result.get("benchmarks") or {}).get(benchmark) or {}).get(key)


def deviations(result: dict[str, Any]) -> list[str]:
    """The overrides (and settings) that make a result something other than its Table 4 row."""
    out = []
    for o in result.get("overrides") or []:
        key = str(o).lstrip("+~").split("=", 1)[0]
        if key in _NEUTRAL_EXACT or any(key == p or key.startswith(p + ".") for p in _NEUTRAL_PREFIXES):
            continue
        out.append(str(o).lstrip("+"))
    rounds = int(result.get("rounds") or 1)
    if rounds != 1 and not any(o.startswith("rounds=") for o in out):
        out.append(f"rounds={rounds}")
    split = result.get("eval_split") or _select(result, "config.eval.split")
    if split not in (None, "test") and not any(o.startswith("eval.split=") for o in out):
        out.append(f"eval.split={split}")
    num_tasks = _select(result, "config.feedback.num_tasks")
    if num_tasks is not None and not any(o.startswith("feedback.num_tasks=") for o in out):
        out.append(f"feedback.num_tasks={num_tasks}")
    return sorted(out)


def table(results: Sequence[dict[str, Any]]) -> list[Row]:
    """Group results into rows: per (model, scale) the six Table 4 rows in the paper's order (rows without
    runs included, so they show as missing), then the results that are no Table 4 row, grouped by their
    experiment and deviations. Several runs of one row are averaged by `Row.stat`."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        if r.get("stopped_after"):
            continue  # an analysis run without a policy (Tables 2-3): see refinement_rows
        groups.setdefault((str(r.get("model")), str(r.get("scale") or "?")), []).append(r)
    rows: list[Row] = []
    for (model, scale), rs in sorted(groups.items()):
        paper_rows = [
            Row(model, scale, p.method, p.feedback_source, p.finetuning_data, p.experiment, paper=p)
            for p in paper.TABLE4
        ]
        others: dict[tuple[Any, ...], Row] = {}
        for r in rs:
            p = paper.row_for(r)
            dev = deviations(r)
            if p is not None and not dev:
                paper_rows[paper.TABLE4.index(p)].runs.append(r)
                continue
            label = " ".join(dev) or "(no Table 4 row)"
            key = (r.get("experiment"), r.get("feedback"), r.get("train_on"), label)
            if key not in others:
                others[key] = Row(
                    model,
                    scale,
                    method=str(r.get("experiment")),
                    feedback_source=str(r.get("feedback")),
                    finetuning_data=str(r.get("train_on")),
                    experiment=str(r.get("experiment")),
                    label=label,
                )
            others[key].runs.append(r)
        rows += paper_rows
        rows += sorted(others.values(), key=lambda x: (x.experiment, _natural(x.label)))
    return rows


def _natural(s: str) -> list[Any]:
    """Sort key that puts feedback.num_tasks=50 before =100."""
    import re

    return [
        float(t) if t.replace(".", "", 1).isdigit() else t for t in re.split(r"(\d+(?:\.\d+)?(?:e-?\d+)?)", s)
    ]


def _fmt(mean: float | None, std: float | None, n: int) -> str:
    if mean is None:
        return MISSING
    return f"{mean:.1f}" if std is None else f"{mean:.1f} ± {std:.1f}"


def _paper_fmt(v: float | None) -> str:
    return MISSING if v is None else f"{v:.0f}"


def to_markdown(rows: Sequence[Row]) -> str:
    """The report as markdown: per (model, scale) a heading, Table 4 with the paper's numbers, other results."""
    out: list[str] = []
    zero = _zero_shot(rows)
    for (model, scale), group in _by_setting(rows).items():
        he = any(r.has_humaneval for r in group)
        out.append(f"### Table 4 — ours: model={model}, scale={scale}")
        out.append("")
        out.append(
            f"Paper: {paper.SETTING}. pass@k in %; ours = mean ± std over runs; {MISSING} = not run. "
            "Δ pass@1 = ours minus our zero-shot row on the same tasks, with a 95 % paired bootstrap interval "
            "over tasks."
        )
        out.append("")
        out += _md_table([r for r in group if r.section == "paper"], he, with_paper=True, zero=zero)
        other = [r for r in group if r.section == "other"]
        if other:
            out.append("")
            out.append(f"#### Other results (no Table 4 row) — model={model}, scale={scale}")
            out.append("")
            out += _md_table(other, he, with_paper=False, zero=zero)
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def _md_table(
    rows: Sequence[Row], he: bool, with_paper: bool, zero: dict[tuple[str, str], Row] | None = None
) -> list[str]:
    head = ["Method", "Feedback source", "Fine-tuning data"]
    if not with_paper:
        head = ["Experiment", "Feedback", "train_on", "Setting"]
    head += ["pass@1 (ours)", "pass@10 (ours)"]
    if with_paper:
        head += ["pass@1 (paper)", "pass@10 (paper)"]
    head += ["Δ pass@1 vs zero-shot"]
    if he:
        head += ["HumanEval pass@1", "HumanEval pass@10"]
    head += ["πθ* trained on", "n_samples", "num_tasks", "runs"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = (
            [r.method, r.feedback_source, r.finetuning_data]
            if with_paper
            else [r.experiment, r.feedback_source, r.finetuning_data, r.label]
        )
        cells += [_fmt(*r.stat("pass@1")), _fmt(*r.stat("pass@10"))]
        if with_paper:
            assert r.paper is not None
            cells += [_paper_fmt(r.paper.pass1), _paper_fmt(r.paper.pass10)]
        cells += [_delta_fmt(_delta(r, zero or {}))]
        if he:
            cells += [_fmt(*r.stat("pass@1", "humaneval")), _fmt(*r.stat("pass@10", "humaneval"))]
        cells += [r.policy_examples(), r.counts("n_samples"), r.counts("num_tasks"), str(len(r.runs))]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return lines


def _by_setting(rows: Sequence[Row]) -> dict[tuple[str, str], list[Row]]:
    out: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        out.setdefault((r.model, r.scale), []).append(r)
    return out


CSV_COLUMNS = (
    "model",
    "scale",
    "section",
    "method",
    "feedback_source",
    "finetuning_data",
    "experiment",
    "setting",
    "runs",
    "pass@1_mean",
    "pass@1_std",
    "pass@10_mean",
    "pass@10_std",
    "paper_pass@1",
    "paper_pass@10",
    "delta_pass@1_vs_zero_shot",
    "delta_pass@1_ci_low",
    "delta_pass@1_ci_high",
    "humaneval_pass@1_mean",
    "humaneval_pass@1_std",
    "humaneval_pass@10_mean",
    "humaneval_pass@10_std",
    "n_samples",
    "num_tasks",
    "results",
)


def to_records(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """Rows as flat dicts (the CSV's columns); numbers in %, missing values as None."""
    recs = []
    zero = _zero_shot(rows)
    for r in rows:
        delta = _delta(r, zero)
        rec: dict[str, Any] = {
            "model": r.model,
            "scale": r.scale,
            "section": r.section,
            "method": r.method,
            "feedback_source": r.feedback_source,
            "finetuning_data": r.finetuning_data,
            "experiment": r.experiment,
            "setting": r.label,
            "runs": len(r.runs),
            "paper_pass@1": r.paper.pass1 if r.paper else None,
            "paper_pass@10": r.paper.pass10 if r.paper else None,
            **dict(
                zip(
                    ("delta_pass@1_vs_zero_shot", "delta_pass@1_ci_low", "delta_pass@1_ci_high"),
                    [round(x, 4) for x in delta] if delta else (None, None, None),
                    strict=True,
                )
            ),
            "n_samples": r.counts("n_samples") if r.runs else None,
            "num_tasks": r.counts("num_tasks") if r.runs else None,
            "results": ";".join(x["_path"] for x in r.runs if "_path" in x),
        }
        for bench, prefix in (("mbpp", ""), ("humaneval", "humaneval_")):
            for k in ("pass@1", "pass@10"):
                mean, std, _ = r.stat(k, bench)
                rec[f"{prefix}{k}_mean"] = None if mean is None else round(mean, 4)
                rec[f"{prefix}{k}_std"] = None if std is None else round(std, 4)
        recs.append(rec)
    return recs


def write_csv(rows: Sequence[Row], path: str | os.PathLike) -> Path:
    """table.csv: one line per row, empty cells where missing."""
    return _write_records(to_records(rows), CSV_COLUMNS, path)


def _write_records(recs: Sequence[dict[str, Any]], columns: Sequence[str], path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns))
        w.writeheader()
        for rec in recs:
            w.writerow({k: "" if rec.get(k) is None else rec[k] for k in columns})
    return path


# ---------------------------------------------------------------------------------------------- figures


def _figure(width: float, height: float, ncols: int = 1) -> tuple[Any, Any]:
    """A figure without pyplot's global state (works headless, in tests, and in notebooks)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, axes


def plot(rows: Sequence[Row], path: str | os.PathLike | None = None) -> Any:
    """table.png: grouped bars per Table 4 row, ours (each model/scale, error bar = std) beside the paper's,
    one panel for pass@1 and one for pass@10. Rows not run show 'not run'. Returns the Figure."""
    paper_rows = [r for r in rows if r.section == "paper"]
    settings = list(_by_setting(paper_rows))
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
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    return fig


def run_label(result: dict[str, Any]) -> str:
    """A short name for one run: experiment, deviations, seed."""
    dev = " ".join(deviations(result))
    seed = result.get("seed")
    return " ".join(
        x for x in (str(result.get("experiment")), dev, f"seed={seed}" if seed is not None else "") if x
    )


def training_curves(results: Sequence[dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """{run label: {stage: losses}} from results.json `training.<stage>.losses` (runs without training omitted)."""
    out: dict[str, dict[str, list[float]]] = {}
    for r in results:
        curves = {
            stage: [float(x) for x in (t or {}).get("losses") or [] if x is not None]
            for stage, t in (r.get("training") or {}).items()
            if isinstance(t, dict)
        }
        curves = {k: v for k, v in curves.items() if v}
        if curves:
            label = run_label(r)
            while label in out:
                label += "'"
            out[label] = curves
    return out


def plot_training(results: Sequence[dict[str, Any]], path: str | os.PathLike | None = None) -> Any:
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
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def perplexities(results: Sequence[dict[str, Any]]) -> dict[str, list[float]]:
    """Figure 3's data: {source: [ppl, ...]} from each result's `artifacts.perplexity` JSONL
    (rows {source, task_id, ppl}); {} when no result has that artifact."""
    out: dict[str, list[float]] = {}
    for r in results:
        p = (r.get("artifacts") or {}).get("perplexity")
        if not p or not Path(p).is_file():
            continue
        for line in Path(p).read_text().splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            ppl = row.get("ppl")
            if isinstance(ppl, (int, float)) and math.isfinite(ppl):
                out.setdefault(str(row.get("source")), []).append(float(ppl))
    return out


def plot_perplexity(results: Sequence[dict[str, Any]], path: str | os.PathLike | None = None) -> Any:
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
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def _select(d: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def feedback_num_tasks(result: dict[str, Any]) -> int | None:
    """The number of MBPPTrain tasks with LLM feedback (Figure 4's x): results.json `config.feedback.num_tasks`,
    else a `feedback.num_tasks=` override; None when the run did not set it."""
    v = _select(result, "config.feedback.num_tasks")
    if v is None:
        for o in result.get("overrides") or []:
            if str(o).lstrip("+").startswith("feedback.num_tasks="):
                v = str(o).split("=", 1)[1]
    try:
        return int(v) if v not in (None, "null") else None
    except (TypeError, ValueError):
        return None


def feedback_scaling(
    results: Sequence[dict[str, Any]],
) -> dict[str, list[tuple[int, float | None, float | None, int]]]:
    """Figure 4's data: {feedback: [(num_tasks, pass@1 %, pass@10 %, runs), ...]} sorted by num_tasks (means
    over seeds); {} when no result records feedback.num_tasks."""
    acc: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in results:
        n = feedback_num_tasks(r)
        if n is not None:
            acc.setdefault((str(r.get("feedback")), n), []).append(r)
    out: dict[str, list[tuple[int, float | None, float | None, int]]] = {}
    for (fb, n), rs in sorted(acc.items()):
        row = Row("", "", "", "", "", "", runs=rs)
        out.setdefault(fb, []).append((n, row.stat("pass@1")[0], row.stat("pass@10")[0], len(rs)))
    return out


def plot_feedback_scaling(results: Sequence[dict[str, Any]], path: str | os.PathLike | None = None) -> Any:
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
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def best_overrides(
    results: Sequence[dict[str, Any]], metric: str = "pass@1", split: str = "refine", prefix: str = "policy."
) -> tuple[list[str], dict[str, Any] | None]:
    """App. A.1 model selection: the `prefix` overrides of the result with the highest `metric` among those
    evaluated on `split` (MBPPRefine), and that result; ([], None) when none qualifies."""
    pool = [
        r
        for r in results
        if (r.get("eval_split") or _select(r, "config.eval.split") or "test") == split
        and r.get(metric) is not None
    ]
    if not pool:
        return [], None
    best = max(pool, key=lambda r: r[metric])
    keep = [str(o) for o in best.get("overrides") or [] if str(o).lstrip("+").startswith(prefix)]
    return keep, best


# ------------------------------------------------------------------------------ Tables 2-3: refinements

REFINER_NAMES = {"trained": "πRefine", "base": "base model, zero-shot", "llm": "the LLM's own (k-shot)"}


@dataclass
class RefineRow:
    """Refinements of MBPPTrain's x0 by one refiner given one kind of feedback, over seeds."""

    model: str
    scale: str
    refiner: str
    feedback: str
    shuffled: bool
    tasks: int
    samples_per_task: int
    runs: list[dict[str, Any]] = field(default_factory=list)  # the results' `refine` blocks, one per seed

    @property
    def feedback_label(self) -> str:
        return f"{self.feedback}, shuffled (unrelated)" if self.shuffled else self.feedback

    def stat(self, key: str) -> tuple[float | None, float | None, int]:
        values = [r[key] * 100 for r in self.runs if r.get(key) is not None]
        if not values:
            return None, None, 0
        return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None), len(values)


def refinement_rows(results: Sequence[dict[str, Any]]) -> list[RefineRow]:
    """Every result with a `refine` block, grouped by (model, scale, refiner, feedback, shuffled, sizes); runs
    that share a refine stage (an ILF run and the refine_trained analysis with the same settings) count once."""
    groups: dict[tuple[Any, ...], RefineRow] = {}
    seen: set[tuple[Any, ...]] = set()
    for r in results:
        b = r.get("refine")
        if not isinstance(b, dict) or not b.get("tasks"):
            continue
        key = (
            str(r.get("model")),
            str(r.get("scale") or "?"),
            str(b.get("refiner")),
            str(b.get("feedback")),
            bool(b.get("feedback_shuffled")),
            int(b["tasks"]),
            int(b.get("samples_per_task") or 1),
        )
        # the refine stage's cache key names the artifact exactly; older results fall back to the seed
        stage_keys = [
            st.get("key") for st in r.get("stages") or [] if str(st.get("name", "")).startswith("refine")
        ]
        ident = (key, (stage_keys[-1] if stage_keys and stage_keys[-1] else None) or f"seed={r.get('seed')}")
        if ident in seen:
            continue
        seen.add(ident)
        groups.setdefault(key, RefineRow(*key)).runs.append(b)
    order = {"trained": 0, "base": 1, "llm": 2}
    return sorted(
        groups.values(), key=lambda g: (g.model, g.scale, order.get(g.refiner, 3), g.feedback, g.shuffled)
    )


def refinements_markdown(rows: Sequence[RefineRow]) -> str:
    """Tables 2-3 as markdown: pass@k of the sampled refinements and the share of tasks with a passing one."""
    if not rows:
        return ""
    out = [
        "### Tables 2-3 — refinements of MBPPTrain's incorrect programs (x0)",
        "",
        "Table 2 compares the base model given related vs. shuffled feedback; Table 3 πRefine vs. the base model. "
        f"pass@k over the refinements sampled per task, in %; ≥1 passing = tasks with a passing refinement; {MISSING} = "
        "fewer samples than k.",
        "",
        "| Model | Scale | Refiner | Feedback | Tasks | Samples/task | pass@1 | pass@10 | ≥1 passing | runs |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for g in rows:
        cells = [
            g.model,
            g.scale,
            REFINER_NAMES.get(g.refiner, g.refiner),
            g.feedback_label,
            str(g.tasks),
            str(g.samples_per_task),
            _fmt(*g.stat("pass@1")),
            _fmt(*g.stat("pass@10")),
            _fmt(*g.stat("frac_tasks_with_passing")),
            str(len(g.runs)),
        ]
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(out) + "\n"


REFINE_CSV_COLUMNS = (
    "model",
    "scale",
    "refiner",
    "feedback",
    "shuffled",
    "tasks",
    "samples_per_task",
    "runs",
    "pass@1_mean",
    "pass@1_std",
    "pass@10_mean",
    "pass@10_std",
    "tasks_with_passing_pct_mean",
    "tasks_with_passing_pct_std",
)


def write_refinements_csv(rows: Sequence[RefineRow], path: str | os.PathLike) -> Path:
    """refinements.csv: one line per refiner/feedback group, numbers in %."""
    recs = []
    for g in rows:
        rec: dict[str, Any] = {
            k: getattr(g, k) for k in ("model", "scale", "refiner", "feedback", "shuffled")
        }
        rec |= {"tasks": g.tasks, "samples_per_task": g.samples_per_task, "runs": len(g.runs)}
        for key, col in (
            ("pass@1", "pass@1"),
            ("pass@10", "pass@10"),
            ("frac_tasks_with_passing", "tasks_with_passing_pct"),
        ):
            mean, std, _ = g.stat(key)
            rec[f"{col}_mean"] = None if mean is None else round(mean, 4)
            rec[f"{col}_std"] = None if std is None else round(std, 4)
        recs.append(rec)
    return _write_records(recs, REFINE_CSV_COLUMNS, path)


def plot_refinements(rows: Sequence[RefineRow], path: str | os.PathLike | None = None) -> Any:
    """refinements.png: per refiner/feedback, pass@1 of the refinements and the share of tasks with a passing one."""
    if not rows:
        return None
    fig, axes = _figure(max(6.0, 1.5 * len(rows)), 3.8, ncols=1)
    ax = axes[0]
    labels = [
        f"{REFINER_NAMES.get(g.refiner, g.refiner)}\n{g.feedback_label}\n({g.model}, {g.scale})" for g in rows
    ]
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
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


# ---------------------------------------------------------------------------------------------- CLI


def report(dirs: Sequence[str | os.PathLike], out: str | os.PathLike | None = None) -> tuple[str, list[Row]]:
    """Collect, tabulate, write table.csv + table.png (and refinements.csv/.png for Tables 2-3) into `out`
    (default: the first dir); return the markdown. Only analysis runs (stop_after) give no Table 4 files."""
    md, rows, _ = _report(dirs, out)
    return md, rows


def _report(
    dirs: Sequence[str | os.PathLike], out: str | os.PathLike | None
) -> tuple[str, list[Row], list[Path]]:
    results = collect(dirs)
    rows = table(results)
    ref_rows = refinement_rows(results)
    out_dir = Path(out) if out is not None else Path(dirs[0])
    if out_dir.is_file():
        out_dir = out_dir.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    md, written = [], []
    if rows:
        written += [write_csv(rows, out_dir / "table.csv"), out_dir / "table.png"]
        plot(rows, written[-1])
        md.append(to_markdown(rows))
    if ref_rows:
        written += [write_refinements_csv(ref_rows, out_dir / "refinements.csv"), out_dir / "refinements.png"]
        plot_refinements(ref_rows, written[-1])
        md.append(refinements_markdown(ref_rows))
    if feedback_scaling(results):
        written.append(out_dir / "feedback_scaling.png")
        plot_feedback_scaling(results, written[-1])
    return "\n".join(md), rows, written


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m ilf_lab.report",
        description="Print the paper's Table 4 from every results.json under DIR...; write table.csv/table.png.",
    )
    ap.add_argument("dirs", nargs="+", metavar="DIR", help="result folders (searched recursively)")
    ap.add_argument("--out", default=None, help="where table.csv and table.png go (default: the first DIR)")
    ap.add_argument(
        "--best-overrides",
        action="store_true",
        help="print only the policy.* overrides of the best MBPPRefine point (eval.split=refine) of an hparams sweep",
    )
    args = ap.parse_args(argv)
    if args.best_overrides:
        try:
            best, result = best_overrides(collect(args.dirs))
        except ReportError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if result is None:
            print(
                "error: no result evaluated with eval.split=refine (run sweeps/hparams.sh)", file=sys.stderr
            )
            return 2
        print(f"best: pass@1={result['pass@1']} on MBPPRefine ({result['_path']})", file=sys.stderr)
        print(" ".join(best))
        return 0
    try:
        md, _, written = _report(args.dirs, args.out)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(md)
    print(f"wrote {', '.join(map(str, written))}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
