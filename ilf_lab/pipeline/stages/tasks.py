"""Stage `tasks`: MBPP's splits and the human annotations, filtered as configured.

Its input is the `data` source (the MBPP and annotation records themselves, keyed by their content), so a changed
data file is a new key; subsets (`data.max_*_tasks`) are applied by the stages that use them, not here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ilf_lab.data.mbpp import Annotation, filter_annotations
from ilf_lab.data.prompts import Task
from ilf_lab.errors import DataError
from ilf_lab.io import read_jsonl, write_jsonl
from ilf_lab.pipeline.stage import Artifact, Stage, at


@dataclass(frozen=True)
class SplitsConfig:
    prompt: tuple[int, int] = at("data.splits.prompt")
    test: tuple[int, int] = at("data.splits.test")
    refine: tuple[int, int] = at("data.splits.refine")
    train: tuple[int, int] = at("data.splits.train")


@dataclass(frozen=True)
class TasksConfig:
    splits: SplitsConfig = at("data.splits")
    require_refinement_passes: bool = at("data.require_refinement_passes")
    max_edit_distance: float = at("data.max_edit_distance")
    one_per_task: bool = at("data.one_per_task")


class Tasks(Stage):
    """All tasks by split (MBPPTest, MBPPRefine, MBPPTrain) and the annotations that survive the filters."""

    name = "tasks"
    version = 2  # 2: data.max_edit_distance defaults to null (the released annotations as they are)
    Config = TasksConfig
    inputs = ("data",)

    def run(self, inputs: dict[str, Artifact], cfg: TasksConfig, out: Path) -> dict[str, Any]:
        data = inputs["data"]
        mbpp = {r["task_id"]: r for r in read_jsonl(data.file("mbpp.jsonl"))}
        anns, counts = filter_annotations(read_jsonl(data.file("annotations.jsonl")), cfg)
        for a in anns:
            if a.task_id not in mbpp:
                raise DataError(f"annotation for task {a.task_id}, which is not in MBPP")

        def split_of(task_id: int) -> str | None:
            for name in ("prompt", "test", "refine", "train"):
                lo, hi = getattr(cfg.splits, name)
                if lo <= task_id <= hi:
                    return name
            return None

        splits = {name: [i for i in mbpp if split_of(i) == name] for name in ("test", "refine", "train")}
        for name, ids in splits.items():
            if not ids:
                lo, hi = getattr(cfg.splits, name)
                raise DataError(f"data.splits.{name}=[{lo}, {hi}] holds no MBPP task (the data has task ids "
                                f"{min(mbpp, default=None)}..{max(mbpp, default=None)})")
        for split in ("refine", "train"):
            splits[f"{split}_annotated"] = [a.task_id for a in anns if split_of(a.task_id) == split]
        write_jsonl(out / "splits.jsonl", [{"split": k, "task_ids": v} for k, v in splits.items()])
        write_jsonl(out / "annotations.jsonl", [a.__dict__ for a in anns])
        write_jsonl(out / "mbpp.jsonl", list(mbpp.values()))
        return {"annotation_counts": counts, "split_sizes": {k: len(v) for k, v in splits.items()}}


@dataclass
class TaskSet:
    """A `tasks` artifact read back: tasks by id, task ids by split, annotations by task id."""

    tasks: dict[int, Task]
    splits: dict[str, list[int]]
    annotations: dict[int, Annotation]

    @classmethod
    def read(cls, art: Artifact) -> TaskSet:
        tasks = {r["task_id"]: Task.from_record(r) for r in read_jsonl(art.file("mbpp.jsonl"))}
        splits = {r["split"]: r["task_ids"] for r in read_jsonl(art.file("splits.jsonl"))}
        anns = {r["task_id"]: Annotation(**r) for r in read_jsonl(art.file("annotations.jsonl"))}
        return cls(tasks, splits, anns)


def first(ids: list[int], limit: int | None) -> list[int]:
    """The first `limit` ids (all of them when limit is null): the smaller scales' subsets."""
    return ids if limit is None else ids[:limit]
