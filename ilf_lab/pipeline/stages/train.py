"""Stages `train_refiner` and `train_policy`: fine-tune πRefine on MBPPRefine's (t, x0, f) -> x1, and πθ* on
the fine-tuning data the `train_on` config group names (the Table 4 row).

Training checkpoints go to the cache's per-key scratch dir, so a killed training resumes from its last epoch
checkpoint on the rerun; only the finished HF checkpoint is published (without Lightning's optimiser state).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ilf_lab.config import OptimConfig, TrainerConfig
from ilf_lab.io import read_jsonl
from ilf_lab.pipeline.stage import Artifact, Stage, at
from ilf_lab.pipeline.stages.tasks import TaskSet

_INFO = ("steps", "epochs", "examples", "tokens", "target_tokens", "useful_fraction", "seconds", "tokens_per_s",
         "losses")


class _Train(Stage):
    """Shared by both trainings: the slice's optimiser and trainer settings, the model of input `model`."""

    kind: ClassVar[str]
    version = 2  # 2: logits only at scored positions (the same loss up to float rounding)
    scratch: Path | None = None  # set by the runner: survives a killed run of this key
    logger: Any = None  # a Lightning logger for the curves (observes; never changes the artifact)

    def records(self, inputs: dict[str, Artifact]) -> list[Any]:
        raise NotImplementedError

    def resolved(self, cfg: Any) -> dict[str, Any]:
        """`devices`/`accelerator` = auto resolve per machine (world size, hence accumulation): key what they
        resolved to. Explicit settings are in the slice already."""
        from ilf_lab.training.finetune import _accelerator, _local_devices

        t = cfg.trainer
        if "auto" not in (str(t.devices), str(t.accelerator)) and str(t.devices) != "-1":
            return {}
        return {"world": _local_devices(t) * t.num_nodes, "accelerator": _accelerator(t.accelerator)}

    def run(self, inputs: dict[str, Artifact], cfg: Any, out: Path) -> dict[str, Any]:
        from ilf_lab.training import finetune

        records = self.records(inputs)
        if not records:
            return {"examples": 0}
        work = (self.scratch or out) / "model"
        result = finetune(
            self.kind, records, str(inputs["model"].path), work, cfg.optim, cfg.trainer,
            prompt_format=cfg.prompt_format, seed=cfg.seed, logger=self.logger, dtype=cfg.dtype,
        )
        shutil.rmtree(work / "lightning", ignore_errors=True)  # resume state, not part of the artifact
        if work != out / "model":
            shutil.move(str(work), out / "model")
        return {"examples": len(records), "training": {k: getattr(result, k) for k in _INFO}}


@dataclass(frozen=True)
class TrainRefinerConfig:
    optim: OptimConfig = at("refiner")
    trainer: TrainerConfig = at("trainer")
    prompt_format: str = at("model.prompt_format")
    dtype: str = at("model.dtype")
    seed: int = at("seed")


class TrainRefiner(_Train):
    """πRefine: the base model fine-tuned on MBPPRefine's human (t, x0, f) -> x1."""

    name = "train_refiner"
    kind = "refiner"
    Config = TrainRefinerConfig
    inputs = ("tasks", "feedback", "model")

    def records(self, inputs: dict[str, Artifact]) -> list[Any]:
        from ilf_lab.training import RefinerRecord

        tasks = TaskSet.read(inputs["tasks"]).tasks
        return [
            RefinerRecord(tasks[x["task_id"]], x["old_code"], x["feedback"], x["refinement"])
            for x in read_jsonl(inputs["feedback"].file("feedback.jsonl"))
            if x["split"] == "refine" and x.get("refinement")
        ]


# ---------------------------------------------------------------------------- πθ*'s fine-tuning data sources


class FineTuningData:
    """Where πθ*'s (task -> program) pairs come from; `inputs` are the upstream stages it reads."""

    inputs: ClassVar[tuple[str, ...]] = ()
    label: ClassVar[str]  # train_on.source: the row's name in results.json and the report

    def pairs(self, inputs: dict[str, Artifact], tasks: TaskSet) -> list[tuple[int, str]]:
        raise NotImplementedError


class Refinements(FineTuningData):
    """ILF: the refinements that passed, one per MBPPTrain task (the refine stage's `kept`)."""

    label = "refinements"

    inputs = ("refine",)

    def pairs(self, inputs: dict[str, Artifact], tasks: TaskSet) -> list[tuple[int, str]]:
        rows = read_jsonl(inputs["refine"].file("refinements.jsonl"))
        return [(x["task_id"], x["program"]) for x in rows if x["kept"]]


def kept_task_ids(refine: Artifact) -> list[int]:
    """The MBPPTrain tasks with a passing refinement: the task set of ILF's πθ* training data."""
    return [x["task_id"] for x in read_jsonl(refine.file("refinements.jsonl")) if x["kept"]]


class MBPPGold(FineTuningData):
    """MBPP's gold programs of the task IDs in πθ*'s ILF training set (§3.2: "we train on programs
    corresponding to the same set of task IDs as the ones used in πθ*'s training dataset"; the reference's
    create_finetuning_data_from_refinements.py does the same): the tasks the run's refine stage kept."""

    label = "mbpp_gold"

    inputs = ("refine",)

    def pairs(self, inputs: dict[str, Artifact], tasks: TaskSet) -> list[tuple[int, str]]:
        return [(i, tasks.tasks[i].code) for i in kept_task_ids(inputs["refine"])]


class HumanRefinements(FineTuningData):
    """The annotators' refinements of the same task IDs as πθ*'s ILF training set (§3.2)."""

    label = "human_refinements"

    inputs = ("refine",)

    def pairs(self, inputs: dict[str, Artifact], tasks: TaskSet) -> list[tuple[int, str]]:
        return [(i, tasks.annotations[i].refinement) for i in kept_task_ids(inputs["refine"])]


class MBPPGoldAllTasks(FineTuningData):
    """Not the paper's protocol: MBPP's gold programs of every MBPPTrain task with feedback (before §3.2's
    matching; kept to compare with earlier runs)."""

    label = "mbpp_gold_all_tasks"

    inputs = ("feedback",)

    def pairs(self, inputs: dict[str, Artifact], tasks: TaskSet) -> list[tuple[int, str]]:
        rows = read_jsonl(inputs["feedback"].file("feedback.jsonl"))
        return [(x["task_id"], tasks.tasks[x["task_id"]].code) for x in rows if x["split"] == "train"]


class HumanRefinementsAllTasks(FineTuningData):
    """Not the paper's protocol: the annotators' refinements of every annotated MBPPTrain task."""

    label = "human_refinements_all_tasks"

    inputs = ("feedback",)

    def pairs(self, inputs: dict[str, Artifact], tasks: TaskSet) -> list[tuple[int, str]]:
        rows = read_jsonl(inputs["feedback"].file("feedback.jsonl"))
        return [(x["task_id"], x["refinement"]) for x in rows if x["split"] == "train" and x.get("refinement")]


class NoFineTuning(FineTuningData):
    """Zero-shot: πθ* is the base policy."""

    label = "none"


@dataclass(frozen=True)
class TrainPolicyConfig:
    optim: OptimConfig = at("policy")
    trainer: TrainerConfig = at("trainer")
    prompt_format: str = at("model.prompt_format")
    dtype: str = at("model.dtype")
    seed: int = at("seed")


class TrainPolicy(_Train):
    """πθ*: the current policy (input `model`) fine-tuned on the pairs of a `FineTuningData` source."""

    name = "train_policy"
    kind = "policy"
    Config = TrainPolicyConfig

    def __init__(self, source: FineTuningData):
        self.source = source
        self.inputs = ("tasks", "model", *source.inputs)

    def params(self) -> dict[str, Any]:
        return {"source": type(self.source).__name__}

    def records(self, inputs: dict[str, Artifact]) -> list[Any]:
        from ilf_lab.training import PolicyRecord

        ts = TaskSet.read(inputs["tasks"])
        return [PolicyRecord(task=ts.tasks[i], program=p) for i, p in self.source.pairs(inputs, ts)]
