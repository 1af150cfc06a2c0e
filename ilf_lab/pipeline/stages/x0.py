"""Stage `x0`: the incorrect programs that feedback is written about (Algorithm 1, step 2).

Two implementations, chosen by the `x0` config group's `_target_`: the programs the human annotations are about
(the paper's setting), or the current policy's own failing samples (iterative ILF, LLM feedback on new tasks).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ilf_lab.io import write_jsonl
from ilf_lab.pipeline.stage import Artifact, Stage, at, nested
from ilf_lab.pipeline.stages.common import (
    SAMPLING_VERSION,
    EngineConfig,
    ExecConfig,
    SampleConfig,
    run_tests,
    sample_programs,
    test_items,
)
from ilf_lab.pipeline.stages.tasks import TaskSet, first


@dataclass(frozen=True)
class AnnotatedX0Config:
    max_refine_tasks: int | None = at("data.max_refine_tasks")
    max_train_tasks: int | None = at("data.max_train_tasks")


class X0Stage(Stage):
    """The x0 stage's interface (the `x0` config group's `_target_` names a subclass)."""

    name = "x0"

    def __init__(self, round: int = 1):
        self.round = round


class AnnotatedX0(X0Stage):
    """x0 of every annotated MBPPRefine and MBPPTrain task (the first N of each at smaller scales)."""

    Config = AnnotatedX0Config
    inputs = ("tasks",)
    source = "annotations"

    def run(self, inputs: dict[str, Artifact], cfg: AnnotatedX0Config, out: Path) -> dict[str, Any]:
        ts = TaskSet.read(inputs["tasks"])
        limits = {"refine": cfg.max_refine_tasks, "train": cfg.max_train_tasks}
        rows = [
            {"task_id": i, "split": split, "old_code": ts.annotations[i].old_code, "source": "annotations"}
            for split in ("refine", "train")
            for i in first(ts.splits[f"{split}_annotated"], limits[split])
        ]
        write_jsonl(out / "x0.jsonl", rows)
        return {"x0": len(rows)}


@dataclass(frozen=True)
class PolicyX0Config:
    max_refine_tasks: int | None = at("data.max_refine_tasks")
    max_train_tasks: int | None = at("data.max_train_tasks")
    sample: SampleConfig = at("x0")
    engine: EngineConfig = nested()
    execution: ExecConfig = at("execution")
    prompt_format: str = at("model.prompt_format")
    seed: int = at("seed")


class PolicyX0(X0Stage):
    """The policy's own failing samples on MBPPTrain: the shortest failing one per task (the paper's annotators
    picked an easy-to-fix sample). Round r samples with seed + 1000 r."""

    version = SAMPLING_VERSION
    Config = PolicyX0Config
    inputs = ("tasks", "policy")
    source = "policy"

    def params(self) -> dict[str, Any]:
        return {"round": self.round}

    def run(self, inputs: dict[str, Artifact], cfg: PolicyX0Config, out: Path) -> dict[str, Any]:
        ts = TaskSet.read(inputs["tasks"])
        tasks = [ts.tasks[i] for i in first(ts.splits["train"], cfg.max_train_tasks)]
        samples = sample_programs(
            str(inputs["policy"].path), cfg.engine, tasks, None, cfg.sample,
            fmt=cfg.prompt_format, seed=cfg.seed + 1000 * self.round,
        )
        flat = [(t, prog) for t, ss in zip(tasks, samples, strict=True) for _, prog in ss]
        verdicts = run_tests(cfg.execution, test_items(flat))
        failing: dict[int, list[tuple[str, str]]] = {}
        for (t, prog), v in zip(flat, verdicts, strict=True):
            if not v.passed and prog.strip():
                failing.setdefault(t.task_id, []).append((prog, v.result))
        rows = [
            {"task_id": i, "split": "train", "old_code": prog, "result": result, "source": "policy"}
            for i, progs in sorted(failing.items())
            for prog, result in [min(progs, key=lambda p: len(p[0]))]
        ]
        write_jsonl(out / "x0.jsonl", rows)
        write_jsonl(
            out / "x0_samples.jsonl",
            [{"task_id": t.task_id, "program": p, "passed": v.passed, "result": v.result}
             for (t, p), v in zip(flat, verdicts, strict=True)],
        )
        return {"x0": len(rows), "sampled": len(flat), "tasks_sampled": len(tasks)}
