"""Annotation items from a run's x0 samples: one failing program per task, with why it fails.

An item carries everything the annotator (or the spreadsheet) needs: the task text, its tests, the
paper's docstring prompt, the incorrect program x0 and the sandbox's verdict on it, overall and per test.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

from ilf_lab.annotate.records import AnnotateError, csv_text, read_jsonl_rows
from ilf_lab.data.prompts import Task, docstring_prompt

ITEM_KEYS = ("item", "task_id", "text", "tests", "setup", "prompt", "program", "result")
# the items sheet: released-schema names where a column becomes part of the annotation
ITEM_CSV_COLUMNS = (
    "item",
    "task_id",
    "split",
    "text",
    "tests",
    "setup",
    "prompt",
    "original_model_completion",
    "failing_result",
    "failing_stdout",
    "Feedback",
    "unedited_annotator_completion",
    "worker_id",
)


def find_x0_file(run_dir: str | Path) -> Path:
    """x0_samples.jsonl of a run (results.json's artifacts, else beside it), else its x0.jsonl."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise AnnotateError(f"missing run directory: {run_dir}")
    candidates: list[Path] = []
    results = run_dir / "results.json"
    if results.is_file():
        try:
            arts = json.loads(results.read_text(encoding="utf-8")).get("artifacts") or {}
        except (json.JSONDecodeError, AttributeError) as e:
            raise AnnotateError(f"{results}: malformed JSON ({e})") from None
        candidates += [Path(arts[k]) for k in ("x0_samples", "x0") if arts.get(k)]
    candidates += [run_dir / "x0_samples.jsonl", run_dir / "x0.jsonl"]
    for c in candidates:
        if c.is_file():
            return c
    raise AnnotateError(
        f"{run_dir}: no x0_samples.jsonl or x0.jsonl (run the pipeline with x0=policy to sample the policy's x0)"
    )


def failing_programs(path: Path, tasks: dict[int, Task]) -> dict[int, list[dict[str, Any]]]:
    """task_id -> the failing samples in file order (x0_samples rows, or x0.jsonl rows: failing by definition)."""
    by_task: dict[int, list[dict[str, Any]]] = {}
    for lineno, row in read_jsonl_rows(path, "x0 file"):
        where = f"{path} line {lineno}"
        program = row.get("program", row.get("old_code"))
        if "task_id" not in row:
            raise AnnotateError(f"{where}: missing key 'task_id'")
        if not isinstance(program, str):
            raise AnnotateError(f"{where}: missing key 'program' (or 'old_code')")
        try:
            task_id = int(row["task_id"])
        except (TypeError, ValueError):
            raise AnnotateError(f"{where}: task_id must be an integer, got {row['task_id']!r}") from None
        if task_id not in tasks:
            raise AnnotateError(f"{where}: task {task_id} is not in MBPP (wrong --data-dir?)")
        if row.get("passed") is True or not program.strip():
            continue
        by_task.setdefault(task_id, []).append(
            {"program": program, "result": row.get("result"), "split": row.get("split")}
        )
    return by_task


def build_items(
    x0_path: Path,
    tasks: dict[int, Task],
    *,
    pick: str = "shortest",
    seed: int = 0,
    timeout: float = 10.0,
    splits: dict[int, str] | None = None,
) -> list[dict[str, Any]]:
    """One item per task with a failing sample; the verdicts come from re-running x0 in the sandbox."""
    from ilf_lab.execution import run_programs

    if pick not in ("shortest", "random"):
        raise AnnotateError(f"--pick must be shortest or random, got {pick!r}")
    failing = failing_programs(x0_path, tasks)
    total = {tid: len(v) for tid, v in failing.items()}
    rng = random.Random(seed)
    chosen: list[tuple[Task, dict[str, Any]]] = []
    for tid in sorted(failing):
        progs = failing[tid]
        # shortest: what the pipeline's x0 stage takes (the paper's annotators fixed easy samples)
        sample = min(progs, key=lambda p: len(p["program"])) if pick == "shortest" else rng.choice(progs)
        chosen.append((tasks[tid], sample))
    jobs: list[dict[str, Any]] = []
    for task, sample in chosen:
        jobs.append(
            {
                "task_id": task.task_id,
                "program": sample["program"],
                "tests": list(task.tests),
                "setup": task.setup,
            }
        )
        for t in task.tests:
            jobs.append(
                {"task_id": task.task_id, "program": sample["program"], "tests": [t], "setup": task.setup}
            )
    verdicts = iter(run_programs(jobs, timeout=timeout) if jobs else [])
    items: list[dict[str, Any]] = []
    for task, sample in chosen:
        whole = next(verdicts)
        per_test = [next(verdicts) for _ in task.tests]
        if whole.passed:
            print(
                f"note: task {task.task_id}: its sampled failing program passes now; left out",
                file=sys.stderr,
            )
            continue
        items.append(
            {
                "item": len(items),
                "task_id": task.task_id,
                "split": sample.get("split") or (splits or {}).get(task.task_id),
                "text": task.text,
                "tests": list(task.tests),
                "setup": task.setup,
                "prompt": docstring_prompt(task),
                "program": sample["program"],
                "result": whole.result,
                "stdout": whole.stdout,
                "test_results": [
                    {"test": t, "passed": v.passed, "result": v.result}
                    for t, v in zip(task.tests, per_test, strict=True)
                ],
                "n_samples_failing": total[task.task_id],
                "pick": pick,
                "source": str(x0_path),
            }
        )
    return items


def items_csv(items: list[dict[str, Any]]) -> str:
    """The spreadsheet form: fill Feedback, edit unedited_annotator_completion, then `import` it."""
    rows = [
        {
            "item": it["item"],
            "task_id": it["task_id"],
            "split": it.get("split"),
            "text": it["text"],
            "tests": it["tests"],
            "setup": it.get("setup", ""),
            "prompt": it["prompt"],
            "original_model_completion": it["program"],
            "failing_result": it["result"],
            "failing_stdout": it.get("stdout", ""),
            "Feedback": "",
            "unedited_annotator_completion": it["program"],
            "worker_id": "",
        }
        for it in items
    ]
    return csv_text(rows, ITEM_CSV_COLUMNS)


def read_items(path: str | Path) -> list[dict[str, Any]]:
    """The items file written by export, checked (one item per task; errors name file and line)."""
    path = Path(path)
    items = []
    seen: dict[int, int] = {}
    for lineno, row in read_jsonl_rows(path, "items file"):
        where = f"{path} line {lineno}"
        for k in ITEM_KEYS:
            if k not in row:
                raise AnnotateError(f"{where}: missing key {k!r}")
        if not isinstance(row["task_id"], int):
            raise AnnotateError(f"{where}: task_id must be an integer")
        if not isinstance(row["tests"], list) or not all(isinstance(t, str) for t in row["tests"]):
            raise AnnotateError(f"{where}: tests must be a list of strings")
        for k in ("text", "prompt", "program", "result"):
            if not isinstance(row[k], str):
                raise AnnotateError(f"{where}: {k} must be a string")
        if row["task_id"] in seen:
            raise AnnotateError(
                f"{where}: task {row['task_id']} again (first on line {seen[row['task_id']]})"
            )
        seen[row["task_id"]] = lineno
        items.append(row)
    if not items:
        raise AnnotateError(f"{path}: no items")
    return items
