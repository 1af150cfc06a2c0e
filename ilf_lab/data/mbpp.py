"""MBPP and the ILF human annotations: loading (hub or local dir), the paper's splits, the paper's filters."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ilf_lab.data.prompts import Task
from ilf_lab.errors import DataError
from ilf_lab.io import iter_jsonl, read_jsonl  # noqa: F401  (re-exported: the one strict reader)

log = logging.getLogger(__name__)

_STR, _INT, _LIST = (str,), (int,), (list,)
# the fields the harness reads, with their JSON types (a wrong type fails naming file, line and key)
MBPP_KEYS = {
    "task_id": (_INT, True),
    "text": (_STR, True),
    "code": (_STR, True),
    "test_list": (_LIST, True),
    "test_setup_code": ((str, type(None)), False),
    "challenge_test_list": ((list, type(None)), False),
}
ANNOTATION_KEYS = {
    "task_id": (_INT, True),
    "prompt": (_STR, True),
    "Feedback": ((str, type(None)), True),
    "original_model_completion": (_STR, True),
    "unedited_annotator_completion": ((str, type(None)), True),
    "passed": ((bool,), False),
    "refinement_edit_distance": ((int, float, type(None)), False),
}
SPLIT_NAMES = ("prompt", "test", "refine", "train")


def _data_dir(data_cfg: Any) -> Path | None:
    d = data_cfg.get("dir") if hasattr(data_cfg, "get") else getattr(data_cfg, "dir", None)
    if not d:
        return None
    path = Path(d).expanduser()
    if not path.is_dir():
        raise DataError(f"data.dir does not exist: {path}")
    return path


def load_mbpp_records(data_cfg: Any) -> list[dict[str, Any]]:
    """All 974 MBPP records, through `datasets` (local JSONL when data.dir is set, else the hub)."""
    import datasets

    local = _data_dir(data_cfg)
    if local is not None:
        ds = datasets.Dataset.from_list(read_jsonl(local / "mbpp" / "mbpp.jsonl", MBPP_KEYS))
    else:
        try:
            dd = datasets.load_dataset(data_cfg.hub_id, data_cfg.hub_config)
        except Exception as e:  # no network, no such dataset: say where to point instead
            raise DataError(
                f"could not load {data_cfg.hub_id!r} from the hub ({type(e).__name__}); "
                "set data.dir or ILF_LAB_DATA_DIR to a directory with mbpp/mbpp.jsonl"
            ) from None
        ds = datasets.concatenate_datasets([dd[k] for k in dd])
    return sorted((dict(r) for r in ds), key=lambda r: int(r["task_id"]))


def load_mbpp(data_cfg: Any) -> dict[int, Task]:
    """All 974 MBPP tasks by task_id."""
    return {t.task_id: t for t in map(Task.from_record, load_mbpp_records(data_cfg))}


def split_ids(data_cfg: Any, split: str) -> list[int]:
    lo, hi = data_cfg.splits[split]
    return list(range(int(lo), int(hi) + 1))


def split_of(data_cfg: Any, task_id: int) -> str | None:
    for name in SPLIT_NAMES:
        lo, hi = data_cfg.splits[name]
        if lo <= task_id <= hi:
            return name
    return None


@dataclass(frozen=True)
class Annotation:
    """One human-feedback record: x0 (incorrect program), feedback f, refinement x1 (full programs)."""

    task_id: int
    old_code: str  # x0: prompt + the model's completion
    feedback: str
    refinement: str  # x1: prompt + the annotator's completion
    passed: bool
    edit_distance: float
    annotator: str | None = None

    @classmethod
    def from_record(cls, r: dict[str, Any]) -> Annotation:
        return cls(
            task_id=int(r["task_id"]),
            old_code=r["original_model_completion"].replace("\r\n", "\n"),
            feedback=r["Feedback"].strip(),
            refinement=(r.get("unedited_annotator_completion") or "").replace("\r\n", "\n"),
            passed=bool(r.get("passed", False)),
            edit_distance=float(r.get("refinement_edit_distance") or 0.0),
            annotator=r.get("worker_id"),
        )


def load_annotation_records(data_cfg: Any) -> list[dict[str, Any]]:
    """The raw annotation rows: data.annotations_file, else data.dir/ilf/..., else the ILF repository. An empty
    file is an error: ILF on no feedback would silently be the zero-shot row."""
    local = _data_dir(data_cfg)
    if data_cfg.get("annotations_file") or local is not None:
        path = Path(data_cfg.get("annotations_file") or local / "ilf" / "surge_annotations.jsonl")
        rows = read_jsonl(path, ANNOTATION_KEYS)
        if not rows:
            raise DataError(f"{path}: no annotations (the file is empty)")
        return rows
    import datasets

    try:
        ds = datasets.load_dataset("json", data_files=data_cfg.annotations_url, split="train")
    except Exception as e:
        raise DataError(
            f"could not download the ILF annotations ({type(e).__name__}); set data.dir or ILF_LAB_DATA_DIR "
            "to a directory with ilf/surge_annotations.jsonl"
        ) from None
    return list(ds)


def paper_edit_ratio(original: str, refinement: str) -> float:
    """The paper's rule (§3, "Human Annotation"): Levenshtein distance between the refinement and the original
    program over max(len(refinement), len(original)), on the whole programs. (The released file's
    `refinement_edit_distance` field is normalised differently — by the original body's length — so it is
    not used.)"""
    from rapidfuzz.distance import Levenshtein

    longest = max(len(original), len(refinement))
    return Levenshtein.distance(original, refinement) / longest if longest else 0.0


def filter_annotations(
    records: list[dict[str, Any]], data_cfg: Any
) -> tuple[list[Annotation], dict[str, int]]:
    """The configured filters, in order; returns the survivors and how many remain after each filter.

    By default the released 195 are used as they are: they already are the paper's final dataset (§3; 44 in
    MBPPRefine, 128 in MBPPTrain, all passing, one per task). `max_edit_distance` opts into re-applying the
    paper's edit-distance rule, computed from the programs (`paper_edit_ratio`)."""
    anns = [Annotation.from_record(r) for r in records if (r.get("Feedback") or "").strip()]
    counts = {"all": len(records), "has_feedback": len(anns)}
    if data_cfg.require_refinement_passes:
        anns = [a for a in anns if a.passed and a.refinement.strip()]
        counts["refinement_passes"] = len(anns)
    if data_cfg.max_edit_distance is not None:
        anns = [a for a in anns if paper_edit_ratio(a.old_code, a.refinement) < data_cfg.max_edit_distance]
        counts["edit_distance"] = len(anns)
    if data_cfg.one_per_task:
        seen: dict[int, Annotation] = {}
        for a in anns:
            seen.setdefault(a.task_id, a)
        anns = list(seen.values())
        counts["one_per_task"] = len(anns)
    anns.sort(key=lambda a: a.task_id)
    return anns, counts
