"""`import`: annotations (serve's JSONL, a released-schema CSV, or a filled-in items sheet) -> released JSONL."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ilf_lab.annotate.records import (
    RELEASED_KEYS,
    REQUIRED_KEYS,
    AnnotateError,
    body,
    edit_distance,
    normalize_record,
    read_jsonl_rows,
    records_from_csv,
)
from ilf_lab.data.prompts import Task


def load_annotations(
    path: str | Path,
    *,
    tasks: dict[int, Task] | None = None,
    verify: bool = False,
    timeout: float = 10.0,
) -> list[dict[str, Any]]:
    """Read and validate; `passed`/`result` come from the sandbox when unknown (a filled-in sheet) or `verify`.

    Tests come from the row's `tests` column (the items sheet) or from `tasks` (--data-dir).
    """
    path = Path(path)
    if path.suffix.lower() == ".csv":
        raw = records_from_csv(path)
    else:
        raw = read_jsonl_rows(path, "annotations file")
    to_run: list[tuple[int, dict[str, Any], list[str], str]] = []
    for line, row in raw:
        where = f"{path} line {line}"
        missing = [k for k in REQUIRED_KEYS if row.get(k) is None]
        if missing:  # before any sandbox time is spent
            raise AnnotateError(f"{where}: missing key {missing[0]!r}")
        if verify or row.get("passed") in (None, ""):
            tests, setup = _tests_for(row, tasks, where)
            to_run.append((line, row, tests, setup))
    if to_run:
        from ilf_lab.execution import run_programs

        verdicts = run_programs(
            [
                {
                    "task_id": r.get("task_id"),
                    "program": _str(r.get("unedited_annotator_completion"), f"{path} line {ln}"),
                    "tests": t,
                    "setup": s,
                }
                for ln, r, t, s in to_run
            ],
            timeout=timeout,
        )
        for (_, row, tests, _), v in zip(to_run, verdicts, strict=True):
            row["passed"], row["result"] = v.passed, v.result
            row["test"] = row.get("test") or "\n".join(tests)
            if verify:  # the refinement may have been edited in the sheet: derive what depends on it
                prompt, refinement = str(row.get("prompt") or ""), row["unedited_annotator_completion"]
                row["completion"] = body(refinement, prompt)
                row["refinement_edit_distance"] = edit_distance(
                    str(row.get("original_model_completion") or ""), refinement, prompt
                )
    records = [normalize_record(row, f"{path} line {line}") for line, row in raw]
    if not records:
        raise AnnotateError(f"{path}: no annotated rows (is the Feedback column filled in?)")
    return records


def _str(v: Any, where: str) -> str:
    if not isinstance(v, str):
        raise AnnotateError(f"{where}: unedited_annotator_completion must be a string")
    return v


def _tests_for(row: dict[str, Any], tasks: dict[int, Task] | None, where: str) -> tuple[list[str], str]:
    cell = row.get("tests")
    if isinstance(cell, list):
        return [str(t) for t in cell], str(row.get("setup") or "")
    if isinstance(cell, str) and cell.strip():
        try:
            tests = json.loads(cell)
        except json.JSONDecodeError as e:
            raise AnnotateError(f"{where}: the tests column is not a JSON list ({e.msg})") from None
        if not isinstance(tests, list) or not all(isinstance(t, str) for t in tests):
            raise AnnotateError(f"{where}: the tests column must be a JSON list of strings")
        return tests, str(row.get("setup") or "")
    if tasks is not None:
        try:
            task = tasks[int(row.get("task_id"))]  # type: ignore[arg-type]
        except (KeyError, TypeError, ValueError):
            raise AnnotateError(f"{where}: task {row.get('task_id')!r} is not in MBPP (--data-dir)") from None
        return list(task.tests), task.setup
    raise AnnotateError(
        f"{where}: whether the refinement passes is unknown and there are no tests to run: pass --data-dir"
    )


def released_only(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Exactly the released keys, in the released order."""
    return [{k: r[k] for k in RELEASED_KEYS} for r in records]
