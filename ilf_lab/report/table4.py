"""Table 4: results grouped into the paper's rows (and the results that are no row), as markdown and CSV."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ilf_lab import paper
from ilf_lab.config import is_report_neutral
from ilf_lab.report.output import (
    MISSING,
    delta_fmt,
    fmt,
    md_row,
    md_text,
    mean_std_columns,
    paper_fmt,
    records_csv,
    write_file,
)
from ilf_lab.report.stats import paired_delta, summary
from ilf_lab.results import Results


@dataclass
class Row:
    """One line of the report: a Table 4 row (possibly with no runs) or another result group."""

    model: str
    scale: str  # the scale, and in parentheses the overrides every run of the table shares (`shared_setting`)
    method: str
    feedback_source: str
    finetuning_data: str
    experiment: str
    paper: paper.PaperRow | None = None
    label: str = ""  # what sets an `other` row apart (its overrides, rounds, ...)
    runs: list[Results] = field(default_factory=list)
    hyper: str = ""  # a Table 4 row's fine-tuning hyper-parameter overrides (e.g. its A.1 point)

    @property
    def section(self) -> str:
        return "paper" if self.paper is not None else "other"

    def stat(self, key: str, benchmark: str = "mbpp") -> tuple[float | None, float | None, int]:
        """(mean, std, count) of pass@k in %, over the runs that have it; std None for a single run."""
        return summary(r.metric(key, benchmark) for r in self.runs)

    def counts(self, key: str) -> str:
        """The runs' `n_samples` or `num_tasks` (MBPP), distinct values joined by `/`."""
        vals = sorted({v for r in self.runs if (v := getattr(r.score, key)) is not None})
        return "/".join(str(v) for v in vals) if vals else MISSING

    def policy_examples(self) -> str:
        """How many programs πθ* was fine-tuned on, and which (0: nothing passed, the base policy was evaluated),
        so that rows trained on unlike data are never compared silently."""
        vals = sorted({r.counts.get("policy_examples") for r in self.runs} - {None})
        if not vals or all(r.train_on == "none" for r in self.runs):
            return MISSING
        sources = sorted({training_source(r) for r in self.runs})
        return "/".join(str(v) for v in vals) + f" ({'; '.join(sources)})" + (", base policy" if vals == [0] else "")

    @property
    def has_humaneval(self) -> bool:
        return any(
            r.metric("pass@1", "humaneval") is not None or r.metric("pass@10", "humaneval") is not None
            for r in self.runs
        )


# ---------------------------------------------------------------------------------------------- grouping


_SOURCES = {
    "refinements": "passing πRefine refinements",
    "mbpp_gold": "MBPP gold, ILF's task IDs",
    "human_refinements": "human refinements, ILF's task IDs",
    "mbpp_gold_all_tasks": "MBPP gold, all annotated tasks",
    "human_refinements_all_tasks": "human refinements, all annotated tasks",
}


def training_source(result: Results) -> str:
    """What πθ* was fine-tuned on, in words (the LLM rows' refinements are the LLM's own)."""
    provider = result.setting("feedback.provider") or ("human" if result.feedback == "human" else "llm")
    if result.train_on == "refinements" and provider == "llm":
        return "passing LLM-written refinements"
    return _SOURCES.get(result.train_on, result.train_on)


def feedback_label(row: Row) -> str:
    """The row's feedback source, saying so when "InstructGPT" was in fact the policy model itself (a local
    model with no other `feedback.model`: at CPU scale SmolLM2 writes its own feedback)."""
    own = row.runs and all(
        r.setting("feedback.provider") == "llm" and r.setting("feedback.backend") == "hf"
        and not r.setting("feedback.model") for r in row.runs
    )
    return f"{row.feedback_source} — here the policy model itself ({row.model}), not InstructGPT" if own else (
        row.feedback_source)


def eval_split(result: Results) -> str | None:
    """The split a run was evaluated on (None: not recorded, i.e. MBPPTest)."""
    return result.eval_split or result.setting("eval.split")


# fine-tuning hyper-parameters: a run whose point App. A.1 chose (`hparams_from`, set by ilf_lab.a1) stays on its
# Table 4 row, which shows the point; other hyper-parameter overrides move a run off the table
HYPER_PREFIXES = ("policy.", "refiner.")


def _is_default(override: str) -> bool:
    """`key=value` where value is the schema's default (e.g. `eval.split=test`): no deviation."""
    from ilf_lab.config import default_of

    key, sep, value = override.lstrip("+").partition("=")
    default = default_of(key)
    return bool(sep) and isinstance(default, (str, int, float, bool)) and value in (str(default), str(default).lower())


def _selected(result: Results) -> bool:
    return bool(result.setting("hparams_from"))


def hyper_label(result: Results) -> str:
    """An A.1-selected run's hyper-parameter overrides (policy.*, refiner.*), sorted; "" otherwise."""
    if not _selected(result):
        return ""
    return " ".join(sorted(str(o).lstrip("+") for o in result.overrides
                           if str(o).lstrip("+").startswith(HYPER_PREFIXES) and not _is_default(str(o))))


def deviations(result: Results) -> list[str]:
    """The overrides (and settings) that make a result something other than its Table 4 row (an A.1-selected
    run's hyper-parameters do not: see `hyper_label`)."""
    selected = _selected(result)
    out = [str(o).lstrip("+") for o in result.overrides
           if not is_report_neutral(str(o)) and not _is_default(str(o))
           and not (selected and str(o).lstrip("+").startswith(HYPER_PREFIXES))]
    rounds = int(result.rounds or 1)
    if rounds != 1 and not any(o.startswith("rounds=") for o in out):
        out.append(f"rounds={rounds}")
    split = eval_split(result)
    if split not in (None, "test") and not any(o.startswith("eval.split=") for o in out):
        out.append(f"eval.split={split}")
    num_tasks = result.setting("feedback.num_tasks")
    if num_tasks is not None and not any(o.startswith("feedback.num_tasks=") for o in out):
        out.append(f"feedback.num_tasks={num_tasks}")
    return sorted(out)


def run_label(result: Results) -> str:
    """A short name for one run: experiment, deviations, seed."""
    dev = " ".join(deviations(result))
    seed = result.seed
    return " ".join(x for x in (result.experiment, dev, f"seed={seed}" if seed is not None else "") if x)


def table(results: Sequence[Results]) -> list[Row]:
    """Group results into rows: per (model, scale) the six Table 4 rows in the paper's order (rows without
    runs included, so they show as missing), then the results that are no Table 4 row, grouped by their
    experiment and deviations. Several runs of one row are averaged by `Row.stat`."""
    groups: dict[tuple[str, str], list[Results]] = {}
    for r in results:
        if r.stopped_after or eval_split(r) == "train":
            continue  # an analysis run (Tables 2-3: refinements, or programs on MBPPTrain): see refinement_rows
        groups.setdefault((r.model, str(r.scale or "?")), []).append(r)
    rows: list[Row] = []
    for (model, scale), rs in sorted(groups.items()):
        shared = shared_setting(rs)
        if shared:  # e.g. every run sampled in bf16: the table's setting, shown with its scale, not a deviation
            scale = f"{scale} ({' '.join(shared)})"
        paper_rows = [
            Row(model, scale, p.method, p.feedback_source, p.finetuning_data, p.experiment, paper=p)
            for p in paper.TABLE4
        ]
        others: dict[tuple[Any, ...], Row] = {}
        for r in rs:
            p = paper.row_for(r)
            dev, hyper = [d for d in deviations(r) if d not in shared], hyper_label(r)
            row = paper_rows[paper.TABLE4.index(p)] if p is not None else None
            if row is not None and not dev and (not row.runs or row.hyper == hyper):
                row.runs.append(r)
                row.hyper = hyper
                continue
            label = " ".join([*dev, hyper]).strip() or "(no Table 4 row)"
            key = (r.experiment, r.feedback, r.train_on, label)
            if key not in others:
                others[key] = Row(model, scale, method=r.experiment, feedback_source=r.feedback,
                                  finetuning_data=r.train_on, experiment=r.experiment, label=label)
            others[key].runs.append(r)
        rows += paper_rows
        rows += sorted(others.values(), key=lambda x: (x.experiment, _natural(x.label)))
    return rows


SYNTHETIC = ("eval.split=", "rounds=", "feedback.num_tasks=")  # what a run is, not how it was run


def shared_setting(results: Sequence[Results]) -> list[str]:
    """The deviations every result of a (model, scale) group shares, except hyper-parameters and what makes a
    result another experiment (eval split, rounds, feedback tasks): a setting the whole table was run under."""
    if not results:
        return []
    common = set.intersection(*(set(deviations(r)) for r in results))
    return sorted(d for d in common if not d.startswith((*HYPER_PREFIXES, *SYNTHETIC)))


def _natural(s: str) -> list[Any]:
    """Sort key that puts feedback.num_tasks=50 before =100."""
    return [
        float(t) if t.replace(".", "", 1).isdigit() else t for t in re.split(r"(\d+(?:\.\d+)?(?:e-?\d+)?)", s)
    ]


def _by_setting(rows: Sequence[Row]) -> dict[tuple[str, str], list[Row]]:
    out: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        out.setdefault((r.model, r.scale), []).append(r)
    return out


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


# ---------------------------------------------------------------------------------------------- markdown


def to_markdown(rows: Sequence[Row]) -> str:
    """The report as markdown: per (model, scale) a heading, Table 4 with the paper's numbers, other results."""
    out: list[str] = []
    zero = _zero_shot(rows)
    for (model, scale), group in _by_setting(rows).items():
        he = any(r.has_humaneval for r in group)
        setting = f"model={md_text(model)}, scale={md_text(scale)}"
        out.append(f"### Table 4 — ours: {setting}")
        out.append("")
        out.append(
            f"Paper: {paper.SETTING}. pass@k in %; ours = mean ± std over runs; {MISSING} = not run. "
            "Δ pass@1 = ours minus our zero-shot row on the same tasks, with a 95 % paired interval over tasks "
            "and seeds (how: the paired comparisons below)."
        )
        out.append("")
        out += _md_table([r for r in group if r.section == "paper"], he, with_paper=True, zero=zero)
        out += [f"\n{note}" for note in unmatched_baselines(group)]
        other = [r for r in group if r.section == "other"]
        if other:
            out.append("")
            out.append(f"#### Other results (no Table 4 row) — {setting}")
            out.append("")
            out += _md_table(other, he, with_paper=False, zero=zero)
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def refine_keys(row: Row) -> set[str]:
    """The refine stages (cache keys) a row's runs drew their fine-tuning task IDs from."""
    return {st.key for r in row.runs for st in r.stages if st.name.split("[")[0] == "refine" and st.key}


def unmatched_baselines(group: Sequence[Row]) -> list[str]:
    """Warnings for baseline rows trained on another refine stage's task IDs than the ILF row's (§3.2 wants the
    same task IDs: a different seed, refine.n or sandbox setting gives other kept tasks)."""
    by_exp = {r.experiment: r for r in group if r.section == "paper"}
    ilf = refine_keys(by_exp["ilf"]) if "ilf" in by_exp else set()
    notes = []
    for exp in ("mbpp_gold", "human_refinements"):
        keys = refine_keys(by_exp[exp]) if exp in by_exp else set()
        if ilf and keys and keys != ilf:
            notes.append(f"Warning: the {by_exp[exp].method} row was trained on the task IDs of refine stage(s) "
                         f"{', '.join(sorted(keys))}, not the ILF row's ({', '.join(sorted(ilf))}): not matched (§3.2).")
    return notes


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
            [r.method + (f" ({r.hyper})" if r.hyper else ""), feedback_label(r), r.finetuning_data]
            if with_paper
            else [r.experiment, feedback_label(r), r.finetuning_data, r.label]
        )
        cells += [fmt(*r.stat("pass@1")), fmt(*r.stat("pass@10"))]
        if with_paper:
            assert r.paper is not None
            cells += [paper_fmt(r.paper.pass1), paper_fmt(r.paper.pass10)]
        cells += [delta_fmt(_delta(r, zero or {}))]
        if he:
            cells += [fmt(*r.stat("pass@1", "humaneval")), fmt(*r.stat("pass@10", "humaneval"))]
        cells += [r.policy_examples(), r.counts("n_samples"), r.counts("num_tasks"), str(len(r.runs))]
        lines.append(md_row(cells))
    return lines


# ---------------------------------------------------------------------------------------------- CSV

CSV_COLUMNS = (
    "model", "scale", "section", "method", "feedback_source", "finetuning_data", "experiment", "setting", "runs",
    "pass@1_mean", "pass@1_std", "pass@10_mean", "pass@10_std", "paper_pass@1", "paper_pass@10",
    "delta_pass@1_vs_zero_shot", "delta_pass@1_ci_low", "delta_pass@1_ci_high",
    "humaneval_pass@1_mean", "humaneval_pass@1_std", "humaneval_pass@10_mean", "humaneval_pass@10_std",
    "n_samples", "num_tasks", "policy_trained_on", "hyperparameters", "results",
)  # fmt: skip


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
            "delta_pass@1_vs_zero_shot": round(delta[0], 4) if delta else None,
            "delta_pass@1_ci_low": round(delta[1], 4) if delta else None,
            "delta_pass@1_ci_high": round(delta[2], 4) if delta else None,
            "n_samples": r.counts("n_samples") if r.runs else None,
            "num_tasks": r.counts("num_tasks") if r.runs else None,
            "policy_trained_on": r.policy_examples() if r.runs else None,
            "hyperparameters": r.hyper,
            "results": ";".join(x.path for x in r.runs if x.path),
        }
        for bench, prefix in (("mbpp", ""), ("humaneval", "humaneval_")):
            for k in ("pass@1", "pass@10"):
                rec |= mean_std_columns(f"{prefix}{k}", r.stat(k, bench))
        recs.append(rec)
    return recs


def write_csv(rows: Sequence[Row], path: str | os.PathLike) -> Path:
    """table.csv: one line per row, empty cells where missing."""
    return write_file(path, records_csv(to_records(rows), CSV_COLUMNS))
