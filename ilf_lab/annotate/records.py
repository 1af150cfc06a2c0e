"""The released ILF annotation schema (surge_annotations.jsonl), its CSV form, and strict, atomic file I/O.

`serve` writes this schema directly and `import` converts/validates into it, so a file made here feeds
`feedback=human data.annotations_file=PATH` with no conversion. Every read error names the file and line.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ilf_lab.data.mbpp import iter_jsonl
from ilf_lab.errors import DataError, reraise_as
from ilf_lab.io import atomic_write_text

# key order as in the released file
RELEASED_KEYS = (
    "task_id",
    "prompt",
    "test",
    "Feedback",
    "completion",
    "result",
    "passed",
    "unedited_annotator_completion",
    "original_model_completion",
    "refinement_edit_distance",
    "worker_id",
)
REQUIRED_KEYS = (
    "task_id",
    "prompt",
    "Feedback",
    "original_model_completion",
    "unedited_annotator_completion",
)
# the paper keeps refinements that change less than half of the original program
MAX_EDIT_DISTANCE = 0.5


class AnnotateError(DataError):
    """A missing or malformed items/annotations file, or an invalid record (message names file and line)."""


# ------------------------------------------------------------------------------------------ edit distance


def levenshtein(a: str, b: str) -> int:
    """Character edit distance (insert/delete/substitute = 1), in C (rapidfuzz): a 60 KB program is milliseconds."""
    from rapidfuzz.distance import Levenshtein

    return Levenshtein.distance(a, b)


def body(program: str, prompt: str) -> str:
    """What follows the docstring prompt (the model's/annotator's part); the whole program if it has none."""
    return program[len(prompt) :] if prompt and program.startswith(prompt) else program


def edit_distance(original: str, refinement: str, prompt: str = "") -> float:
    """The paper's normalized edit distance: levenshtein(x0 body, x1 body) / len(x0 body).

    Bodies are the text after the shared docstring prompt (the released file's values are exactly
    this over x0's body and the `completion` field). May exceed 1.0 for a rewrite of a short program.
    """
    if prompt and not (original.startswith(prompt) and refinement.startswith(prompt)):
        prompt = ""
    a, b = body(original, prompt), body(refinement, prompt)
    if not a:
        return 0.0 if not b else 1.0
    return levenshtein(a, b) / len(a)


# ---------------------------------------------------------------------------------------------- records


def make_record(
    *,
    task_id: int,
    prompt: str,
    tests: Sequence[str],
    feedback: str,
    refinement: str,
    original: str,
    passed: bool,
    result: str,
    worker_id: str | None,
) -> dict[str, Any]:
    """One annotation in the released schema (key order included)."""
    return {
        "task_id": int(task_id),
        "prompt": prompt,
        "test": "\n".join(tests),
        "Feedback": feedback,
        "completion": body(refinement, prompt),
        "result": result,
        "passed": bool(passed),
        "unedited_annotator_completion": refinement,
        "original_model_completion": original,
        "refinement_edit_distance": edit_distance(original, refinement, prompt),
        "worker_id": worker_id,
    }


def normalize_record(row: dict[str, Any], where: str) -> dict[str, Any]:
    """Check one annotation and fill what can be derived (completion, edit distance); `where`='file line N'."""
    missing = [k for k in REQUIRED_KEYS if k not in row or row[k] is None]
    if missing:
        raise AnnotateError(f"{where}: missing key {missing[0]!r}")
    try:
        task_id = int(row["task_id"])
    except (TypeError, ValueError):
        raise AnnotateError(f"{where}: task_id must be an integer, got {row['task_id']!r}") from None
    if isinstance(row["task_id"], float) and row["task_id"] != task_id:
        raise AnnotateError(f"{where}: task_id must be an integer, got {row['task_id']!r}")
    for k in ("prompt", "Feedback", "original_model_completion", "unedited_annotator_completion"):
        if not isinstance(row[k], str):
            raise AnnotateError(f"{where}: {k} must be a string")
    if not row["Feedback"].strip():
        raise AnnotateError(f"{where}: empty Feedback")
    if not row["unedited_annotator_completion"].strip():
        raise AnnotateError(f"{where}: empty unedited_annotator_completion (the refinement)")
    prompt, refinement = row["prompt"], row["unedited_annotator_completion"]
    passed = row.get("passed")
    if isinstance(passed, str):
        passed = _parse_bool(passed, where)
    if passed is None:
        raise AnnotateError(f"{where}: 'passed' is unknown: run the tests (import --verify with tests)")
    if not isinstance(passed, bool):
        raise AnnotateError(f"{where}: passed must be true or false, got {passed!r}")
    result = row.get("result")  # null in part of the released file: kept as it is
    if result is not None and not isinstance(result, str):
        raise AnnotateError(f"{where}: result must be a string or null")
    dist = row.get("refinement_edit_distance")
    if dist is None or dist == "":
        dist = edit_distance(row["original_model_completion"], refinement, prompt)
    try:
        dist = float(dist)
    except (TypeError, ValueError):
        raise AnnotateError(f"{where}: refinement_edit_distance must be a number, got {dist!r}") from None
    if math.isnan(dist) or dist < 0:
        raise AnnotateError(f"{where}: refinement_edit_distance must be >= 0, got {dist!r}")
    worker = row.get("worker_id")
    if worker is not None and not isinstance(worker, str):
        worker = str(worker)
    test = row.get("test")
    completion = row.get("completion")
    return {
        "task_id": task_id,
        "prompt": prompt,
        "test": test if isinstance(test, str) else "",
        "Feedback": row["Feedback"],
        "completion": completion if isinstance(completion, str) else body(refinement, prompt),
        "result": result,
        "passed": passed,
        "unedited_annotator_completion": refinement,
        "original_model_completion": row["original_model_completion"],
        "refinement_edit_distance": dist,
        "worker_id": worker if worker != "" else None,
    }


def _parse_bool(value: str, where: str) -> bool | None:
    v = value.strip().lower()
    if v in ("true", "1", "yes"):
        return True
    if v in ("false", "0", "no"):
        return False
    if v == "":
        return None
    raise AnnotateError(f"{where}: passed must be true or false, got {value!r}")


# ---------------------------------------------------------------------------------------------- file I/O


def read_jsonl_rows(path: str | os.PathLike, what: str = "file") -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) per non-blank line; a missing file or bad line -> AnnotateError naming both."""
    path = Path(path)
    if not path.is_file():
        raise AnnotateError(f"missing {what}: {path}")
    try:
        return list(iter_jsonl(path))
    except DataError as e:
        raise AnnotateError(str(e)) from None


def read_csv_rows(path: str | os.PathLike, required: Iterable[str] = ()) -> list[tuple[int, dict[str, str]]]:
    """(first line of the row, row) per CSV record (quoted fields may span lines)."""
    path = Path(path)
    if not path.is_file():
        raise AnnotateError(f"missing file: {path}")
    rows = []
    with reraise_as(AnnotateError, f"cannot read {path}", (OSError, UnicodeDecodeError)):
        text = path.read_bytes().decode("utf-8-sig")  # newlines as written: csv handles them
    with io.StringIO(text, newline="") as f:
        reader = csv.DictReader(f)
        try:
            fields = reader.fieldnames or []
            missing = [k for k in required if k not in fields]
            if missing:
                raise AnnotateError(f"{path} line 1: missing column {missing[0]!r}")
            start = reader.line_num + 1
            for row in reader:
                if None in row:
                    raise AnnotateError(f"{path} line {start}: more fields than the header has")
                if any(v is None for v in row.values()):
                    raise AnnotateError(f"{path} line {start}: fewer fields than the header has")
                if any((v or "").strip() for v in row.values()):
                    rows.append((start, row))
                start = reader.line_num + 1
        except csv.Error as e:
            raise AnnotateError(f"{path} line {reader.line_num}: malformed CSV ({e})") from None
    return rows


def write_output(path: str | os.PathLike, text: str) -> None:
    """Write atomically; a failure (no such directory, permissions, disk full) is an AnnotateError naming it."""
    with reraise_as(AnnotateError, f"cannot write {path}"):
        atomic_write_text(path, text)


def jsonl_text(rows: Iterable[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def csv_text(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """CSV with every field quoted; bools as true/false, None as empty (read back by `csv_value`)."""
    buf = io.StringIO(newline="")
    w = csv.writer(buf, quoting=csv.QUOTE_ALL, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow([_csv_cell(r.get(c)) for c in columns])
    return buf.getvalue()


def _csv_cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (list, dict)):
        return json.dumps(v, ensure_ascii=False)
    return str(v)


def records_from_csv(path: str | os.PathLike) -> list[tuple[int, dict[str, Any]]]:
    """CSV rows (released columns, or an exported items sheet filled in) as raw record dicts + line numbers.

    Rows whose Feedback is blank are not annotated yet and are left out.
    """
    out = []
    for line, row in read_csv_rows(path, required=REQUIRED_KEYS):
        if not row.get("Feedback", "").strip():
            continue
        rec: dict[str, Any] = dict(row)
        # empty means unknown for these (derived or checked later); strings such as `test` stay as written
        for k in ("passed", "refinement_edit_distance", "worker_id", "result"):
            if rec.get(k, "") == "":
                rec[k] = None
        out.append((line, rec))
    return out
