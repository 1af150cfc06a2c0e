"""Tables 2-3: how often the refinements of MBPPTrain's incorrect programs pass, by refiner and feedback.

From each result's `refine` block: every ILF-style run samples refinements, and the `refine_analysis` sweep's
runs stop after the refine stage.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ilf_lab.report.output import MISSING, fmt, md_row, mean_std_columns, records_csv, write_file
from ilf_lab.report.stats import summary
from ilf_lab.results import Results

REFINER_NAMES = {
    "trained": "πRefine",
    "base": "base model, zero-shot",
    "base_0shot": "base model, zero-shot",
    "base_1shot": "base model, 1-shot",
    "base_2shot": "base model, 2-shot",
    "llm": "the LLM's own (k-shot)",
    "zero_shot_programs": "none: the base model's own programs (Table 3's baseline)",
}


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
    runs: list[Results] = field(default_factory=list)  # one per seed
    blocks: list[dict[str, Any]] = field(default_factory=list)  # the numbers of each run (its `refine` block)

    @property
    def feedback_label(self) -> str:
        return f"{self.feedback}, shuffled (unrelated)" if self.shuffled else self.feedback

    @property
    def refiner_name(self) -> str:
        return REFINER_NAMES.get(self.refiner, self.refiner)

    def stat(self, key: str) -> tuple[float | None, float | None, int]:
        """(mean, std, count) in % of a `refine` number (pass@k, frac_tasks_with_passing) over the runs."""
        return summary(b.get(key) for b in self.blocks)


def refinement_rows(results: Sequence[Results]) -> list[RefineRow]:
    """Every result with a `refine` block, grouped by (model, scale, refiner, feedback, shuffled, sizes); runs
    that share a refine stage (an ILF run and the refine_trained analysis with the same settings) count once.
    Results evaluated on the annotated MBPPTrain tasks without fine-tuning (eval.split=train, train_on=none)
    are Table 3's baseline: the base model's own programs on the tasks the refiners refine."""
    groups: dict[tuple[Any, ...], RefineRow] = {}
    seen: set[tuple[Any, ...]] = set()
    for r in results:
        b = _block(r)
        if not b or not b.get("tasks"):
            continue
        refiner = str(b.get("refiner"))
        if refiner == "base" and b.get("shots") is not None:
            refiner = f"base_{int(b['shots'])}shot"
        key = (
            r.model,
            str(r.scale or "?"),
            refiner,
            str(b.get("feedback")),
            bool(b.get("feedback_shuffled")),
            int(b["tasks"]),
            int(b.get("samples_per_task") or 1),
        )
        # the stage's cache key names the artifact exactly; older results fall back to the seed
        stage = "evaluate" if refiner == "zero_shot_programs" else "refine"
        stage_keys = [st.key for st in r.stages if st.name.startswith(stage)]
        ident = (key, (stage_keys[-1] if stage_keys and stage_keys[-1] else None) or f"seed={r.seed}")
        if ident in seen:
            continue
        seen.add(ident)
        row = groups.setdefault(key, RefineRow(*key))
        row.runs.append(r)
        row.blocks.append(b)
    order = {"trained": 0, "zero_shot_programs": 1, "base_1shot": 2, "base_2shot": 3, "base": 4, "llm": 5}
    return sorted(
        groups.values(), key=lambda g: (g.model, g.scale, order.get(g.refiner, 4), g.feedback, g.shuffled)
    )


def _block(r: Results) -> dict[str, Any]:
    """The numbers of one result for Tables 2-3: its `refine` block, or its own programs' pass rates on MBPPTrain."""
    if r.refine:
        return r.refine
    if r.eval_split == "train" and r.train_on == "none" and r.score.per_task:
        per_task = r.score.per_task.values()
        return {
            "refiner": "zero_shot_programs", "feedback": "—", "feedback_shuffled": False,
            "tasks": r.score.num_tasks, "samples_per_task": r.score.n_samples,
            **{f"pass@{k}": v for k, v in r.score.pass_at.items()},
            "frac_tasks_with_passing": sum(pt["c"] > 0 for pt in per_task) / len(per_task),
        }
    return {}


def refinements_markdown(rows: Sequence[RefineRow]) -> str:
    """Tables 2-3 as markdown: pass@k of the sampled refinements and the share of tasks with a passing one."""
    if not rows:
        return ""
    out = [
        "### Tables 2-3 — refinements of MBPPTrain's incorrect programs (x0)",
        "",
        "Table 2 compares the base model (1-shot) given related vs. shuffled feedback; Table 3 πRefine's "
        "refinements vs. the base model's own programs on the same tasks. "
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
            g.refiner_name,
            g.feedback_label,
            str(g.tasks),
            str(g.samples_per_task),
            fmt(*g.stat("pass@1")),
            fmt(*g.stat("pass@10")),
            fmt(*g.stat("frac_tasks_with_passing")),
            str(len(g.runs)),
        ]
        out.append(md_row(cells))
    return "\n".join(out) + "\n"


REFINE_CSV_COLUMNS = (
    "model", "scale", "refiner", "feedback", "shuffled", "tasks", "samples_per_task", "runs",
    "pass@1_mean", "pass@1_std", "pass@10_mean", "pass@10_std",
    "tasks_with_passing_pct_mean", "tasks_with_passing_pct_std",
)  # fmt: skip


def refinement_records(rows: Sequence[RefineRow]) -> list[dict[str, Any]]:
    """One flat dict per refiner/feedback group (refinements.csv's columns), numbers in %."""
    recs = []
    for g in rows:
        rec: dict[str, Any] = {k: getattr(g, k) for k in ("model", "scale", "refiner", "feedback", "shuffled")}
        rec |= {"tasks": g.tasks, "samples_per_task": g.samples_per_task, "runs": len(g.runs)}
        for key, col in (
            ("pass@1", "pass@1"),
            ("pass@10", "pass@10"),
            ("frac_tasks_with_passing", "tasks_with_passing_pct"),
        ):
            rec |= mean_std_columns(col, g.stat(key))
        recs.append(rec)
    return recs


def write_refinements_csv(rows: Sequence[RefineRow], path: str | os.PathLike) -> Path:
    """refinements.csv: one line per refiner/feedback group, numbers in %."""
    return write_file(path, records_csv(refinement_records(rows), REFINE_CSV_COLUMNS))
