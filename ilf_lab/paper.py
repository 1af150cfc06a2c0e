"""The paper's Table 4 as data, written once (Chen et al. 2023, "Improving Code Generation by Training with
Natural Language Feedback"): CodeGen-Mono 6.1B, MBPPTest tasks 11-110, 30 samples at T=0.8, pass@k in %.

Each row is a preset of two config knobs (`feedback`, `train_on`) and a Hydra `experiment` option; `row_for`
maps a `Results` (one results.json) to its row so the report can put our numbers beside the paper's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ilf_lab.results import Results

MODEL = "CodeGen-Mono 6.1B"
BENCHMARK = "MBPPTest (tasks 11-110)"
N_SAMPLES = 30
TEMPERATURE = 0.8
SETTING = f"{MODEL}, {BENCHMARK}, {N_SAMPLES} samples at T={TEMPERATURE}"


@dataclass(frozen=True)
class PaperRow:
    """One row of Table 4. `feedback` is None where the row does not depend on it."""

    method: str
    feedback_source: str
    finetuning_data: str
    experiment: str
    feedback: str | None
    train_on: str
    pass1: float  # %
    pass10: float  # %


TABLE4: tuple[PaperRow, ...] = (
    PaperRow("ILF", "Humans", "Refinements (πRefine)", "ilf", "human", "refinements", 36.0, 68.0),
    PaperRow(
        "1-shot InstructGPT feedback",
        "InstructGPT, 1-shot",
        "Refinements",
        "instructgpt_1shot",
        "instructgpt_1shot",
        "refinements",
        19.0,
        55.0,
    ),
    PaperRow(
        "2-shot InstructGPT feedback",
        "InstructGPT, 2-shot",
        "Refinements",
        "instructgpt_2shot",
        "instructgpt_2shot",
        "refinements",
        25.0,
        59.0,
    ),
    PaperRow(
        "Fine-tuned on MBPP gold", "—", "MBPP gold programs", "mbpp_gold", None, "mbpp_gold", 22.0, 63.0
    ),
    PaperRow(
        "Fine-tuned on human refinements",
        "Humans",
        "Human refinements",
        "human_refinements",
        None,
        "human_refinements",
        33.0,
        68.0,
    ),
    PaperRow("Zero-shot", "—", "none", "zero_shot", None, "none", 26.0, 59.0),
)

BY_EXPERIMENT: dict[str, PaperRow] = {r.experiment: r for r in TABLE4}


def row_for(result: Results) -> PaperRow | None:
    """The Table 4 row a result reproduces, by (feedback, train_on); None if it is no row of the table.

    train_on none / mbpp_gold / human_refinements identify their row whatever the feedback; refinements need
    the feedback source too. A result that changes what the row means (iterative rounds > 1) is no row.
    """
    if int(result.rounds or 1) != 1:
        return None
    for row in TABLE4:
        if row.train_on == result.train_on and (row.feedback is None or row.feedback == result.feedback):
            return row
    return None
