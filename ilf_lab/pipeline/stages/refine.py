"""Stage `refine`: refinements x1 of MBPPTrain's x0, tested; one passing refinement kept per task.

`SampledRefinements` samples n per task from a refiner (πRefine, or the base model zero-shot for Tables 2-3);
the refiner is an upstream input, so its key is the refiner's own (a differently trained πRefine is a different
refine stage). `LLMRefinements` tests the refinements an LLM wrote together with its feedback.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ilf_lab.data.prompts import Task, refine_prompt
from ilf_lab.io import read_jsonl, write_jsonl
from ilf_lab.pipeline.stage import Artifact, Stage, at, nested
from ilf_lab.pipeline.stages.common import (
    SAMPLING_VERSION,
    EngineConfig,
    ExecConfig,
    SampleConfig,
    engine_for,
    run_tests,
    sample_programs,
    test_items,
)
from ilf_lab.pipeline.stages.tasks import TaskSet


def _test_and_keep(ex: ExecConfig, candidates: list[tuple[Task, str]], tasks: int, out: Path) -> dict[str, Any]:
    verdicts = run_tests(ex, test_items(candidates))
    kept: set[int] = set()
    rows = []
    for (t, prog), v in zip(candidates, verdicts, strict=True):
        keep = v.passed and t.task_id not in kept
        if keep:
            kept.add(t.task_id)
        rows.append({"task_id": t.task_id, "program": prog, "passed": v.passed, "result": v.result, "kept": keep})
    write_jsonl(out / "refinements.jsonl", rows)
    return {
        "refinements": len(rows),
        "refinements_passing": sum(r["passed"] for r in rows),
        "tasks": tasks,
        "tasks_with_passing": len(kept),
    }


class _Refine(Stage):
    name = "refine"

    def __init__(self, round: int = 1):
        self.round = round

    def params(self) -> dict[str, Any]:
        return {"round": self.round}

    @staticmethod
    def train_rows(inputs: dict[str, Artifact]) -> list[dict[str, Any]]:
        return [r for r in read_jsonl(inputs["feedback"].file("feedback.jsonl")) if r["split"] == "train"]


@dataclass(frozen=True)
class SampledRefinementsConfig:
    sample: SampleConfig = at("refine")
    shots: int = at("refine.shots")
    engine: EngineConfig = nested()
    execution: ExecConfig = nested()
    prompt_format: str = at("model.prompt_format")
    seed: int = at("seed")


class SampledRefinements(_Refine):
    """n refinements per MBPPTrain task sampled from the refiner (input `model`) given (t, x0, f)."""

    version = SAMPLING_VERSION
    Config = SampledRefinementsConfig
    inputs = ("tasks", "feedback", "model")

    def run(self, inputs: dict[str, Artifact], cfg: SampledRefinementsConfig, out: Path) -> dict[str, Any]:
        rows = self.train_rows(inputs)
        ts = TaskSet.read(inputs["tasks"])
        tasks = [ts.tasks[r["task_id"]] for r in rows]
        path, fmt = str(inputs["model"].path), cfg.prompt_format
        _, tok = engine_for(path, cfg.engine)
        shots = refine_shots(ts, cfg.shots, cfg.seed)
        prompts = [
            refine_prompt(t, r["old_code"], r["feedback"], fmt, tok, shots) for t, r in zip(tasks, rows, strict=True)
        ]
        samples = sample_programs(
            path, cfg.engine, tasks, prompts, cfg.sample, fmt=fmt, seed=cfg.seed + 2000 * self.round
        )
        candidates = [(t, prog) for t, ss in zip(tasks, samples, strict=True) for _, prog in ss]
        return _test_and_keep(cfg.execution, candidates, len(rows), out)


def refine_shots(ts: TaskSet, k: int, seed: int) -> list[tuple[Task, str, str, str]]:
    """k (task, x0, f, x1) examples from MBPPRefine's annotations, seeded (Table 2's 1-shot prompt)."""
    if k == 0:
        return []
    pool = [ts.annotations[i] for i in sorted(ts.splits["refine_annotated"])]
    return [(ts.tasks[a.task_id], a.old_code, a.feedback, a.refinement)
            for a in random.Random(seed).sample(pool, min(k, len(pool)))]


@dataclass(frozen=True)
class LLMRefinementsConfig:
    execution: ExecConfig = nested()


class LLMRefinements(_Refine):
    """The refinements the LLM wrote with its feedback (n replies per task), where it wrote one, tested."""

    version = 2  # 2: `tasks` counts tasks, not replies
    Config = LLMRefinementsConfig
    inputs = ("tasks", "feedback")

    def run(self, inputs: dict[str, Artifact], cfg: LLMRefinementsConfig, out: Path) -> dict[str, Any]:
        rows = self.train_rows(inputs)
        tasks = TaskSet.read(inputs["tasks"]).tasks
        candidates = [(tasks[r["task_id"]], r["refinement"]) for r in rows if r.get("refinement")]
        return _test_and_keep(cfg.execution, candidates, len({r["task_id"] for r in rows}), out)
