"""Table 4's comparisons, paired and with their power: every row against zero-shot, ILF against each baseline.

Each comparison is Δ pass@1 in points on the tasks both rows evaluated, with a 95 % interval whose standard error
counts the task spread and the seed variance (`stats.paired`: seed by seed where both rows ran the same seeds), and the smallest Δ the design detects with
power 0.8 at α = 0.05 (MDE). An interval that holds 0 says "not detected"; the MDE says whether that means "no effect of a size
that matters" or "too small for this design to see".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ilf_lab.report.output import md_row
from ilf_lab.report.stats import Paired, paired
from ilf_lab.report.table4 import Row

BASELINES = ("mbpp_gold", "human_refinements", "instructgpt_1shot", "instructgpt_2shot")


@dataclass(frozen=True)
class Comparison:
    model: str
    scale: str
    name: str  # "ILF vs zero-shot", ...
    a: str  # experiments
    b: str
    delta: Paired

    @property
    def reading(self) -> str:
        d = self.delta
        if d.tasks < 2:
            return "too few tasks to tell"
        if d.mde is None:  # no spread at all: the same pass rate on every task, e.g. both are the base policy
            return "identical on every task" if d.mean == 0 else f"{d.mean:+.1f} on every task alike"
        seeds = "" if min(d.runs, d.reference_runs) > 1 else "; one run on a side: seed variance not estimated"
        if d.lo > 0:
            return "higher" + seeds
        if d.hi < 0:
            return "lower" + seeds
        return f"not detected (|Δ| ≥ {d.mde:.1f} would be seen with power 0.8{seeds})"


def comparisons(rows: Sequence[Row], k: int = 1) -> list[Comparison]:
    """Per (model, scale) with Table 4 rows: each run row vs zero-shot, then ILF vs each baseline row."""
    out: list[Comparison] = []
    groups: dict[tuple[str, str], dict[str, Row]] = {}
    for r in rows:
        if r.section == "paper" and r.runs:
            groups.setdefault((r.model, r.scale), {})[r.experiment] = r
    for (model, scale), by in groups.items():
        pairs = [(e, "zero_shot") for e in by if e != "zero_shot"]
        pairs += [("ilf", b) for b in BASELINES if b in by]
        for a, b in pairs:
            if a in by and b in by and (d := paired(by[a].runs, by[b].runs, k)) is not None:
                out.append(Comparison(model, scale, f"{by[a].method} vs {by[b].method}", a, b, d))
    return out


def comparisons_markdown(comps: Sequence[Comparison]) -> str:
    if not comps:
        return ""
    lines = [
        "### Paired comparisons and power",
        "",
        "Δ pass@1 in points (first minus second) on the tasks both rows evaluated. SE: the spread over tasks of "
        "the paired per-task differences of the runs' means, plus the seed (training) variance: of the per-seed "
        "differences where both rows ran the same seeds (runs paired seed by seed, \"seed-matched\"; a row run at "
        "fewer seeds meets only its own seeds' runs of the other), else each "
        "row's own over its runs; 95 % interval Δ ± t(0.975, df) × SE with Satterthwaite's df. MDE = the smallest |Δ| this design "
        "detects with power 0.8 at α = 0.05 (two-sided): (t(0.975, df) + t(0.8, df)) × SE.",
        "",
        "| Comparison | model, scale | Δ pass@1 [95 % CI] | SE | df | MDE | tasks × runs | reading |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in comps:
        d = c.delta
        lines.append(md_row([
            c.name, f"{c.model}, {c.scale}", f"{d.mean:+.1f} [{d.lo:+.1f}, {d.hi:+.1f}]", f"{d.se:.1f}",
            f"{d.df:.0f}", "—" if d.mde is None else f"{d.mde:.1f}", _runs_cell(d),
            c.reading,
        ]))  # fmt: skip
    return "\n".join(lines) + "\n"


COMPARE_CSV_COLUMNS = (
    "model", "scale", "comparison", "a", "b", "delta_pass@1", "ci_low", "ci_high", "se", "df", "mde_power80",
    "tasks", "runs_a", "runs_b", "seed_matched", "runs_left_out", "reading",
)  # fmt: skip


def _runs_cell(d: Paired) -> str:
    out = f"{d.tasks} × {d.runs} vs {d.reference_runs}" + (" seed-matched" if d.seed_matched else "")
    return out + (f" ({d.left_out} runs of other seeds left out)" if d.left_out else "")


def comparison_records(comps: Sequence[Comparison]) -> list[dict[str, Any]]:
    return [
        {"model": c.model, "scale": c.scale, "comparison": c.name, "a": c.a, "b": c.b,
         "delta_pass@1": round(c.delta.mean, 4), "ci_low": round(c.delta.lo, 4), "ci_high": round(c.delta.hi, 4),
         "se": round(c.delta.se, 4), "df": None if c.delta.df == float("inf") else round(c.delta.df, 2),
         "mde_power80": None if c.delta.mde is None else round(c.delta.mde, 4), "tasks": c.delta.tasks,
         "runs_a": c.delta.runs, "runs_b": c.delta.reference_runs, "seed_matched": c.delta.seed_matched,
         "runs_left_out": c.delta.left_out, "reading": c.reading}
        for c in comps
    ]  # fmt: skip
