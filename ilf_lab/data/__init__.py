"""MBPP splits, the human annotations and the prompt formats (each defined once)."""

from ilf_lab.data.mbpp import (
    Annotation,
    filter_annotations,
    load_annotation_records,
    load_mbpp,
    read_jsonl,
    split_ids,
    split_of,
)
from ilf_lab.data.prompts import Task

__all__ = [
    "Annotation",
    "Task",
    "filter_annotations",
    "load_annotation_records",
    "load_mbpp",
    "read_jsonl",
    "split_ids",
    "split_of",
]
