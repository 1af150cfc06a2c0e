"""Files the project publishes, written once: JSONL read/write, atomic text files and atomic directories.

Every artifact is written beside its final place under a temporary name and renamed into place, so a reader (or
a rerun after a kill) never sees half of one.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ilf_lab.errors import DataError


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write via a temp file in the same directory + rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def publish_dir(final: str | os.PathLike, build: Callable[[Path], Any], prefix: str | None = None) -> Any:
    """Build a directory under a temp name (`prefix` + random) beside `final`, then rename it into place; if
    another process published `final` first, its (equivalent) copy is kept and ours removed. Returns what
    `build` returned."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix or f".{final.name}.", dir=final.parent))
    try:
        result = build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


def write_jsonl(path: str | os.PathLike, rows: Sequence[dict[str, Any]]) -> None:
    """One JSON object per line (the stage cache publishes the directory around it atomically)."""
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def iter_jsonl(path: str | os.PathLike, required: Iterable[str] = ()) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) per non-blank line of a .jsonl or .jsonl.gz file; the one strict JSONL reader:
    a missing file or a bad line stops with one DataError naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"missing data file: {path}")
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path} line {lineno}: malformed JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path} line {lineno}: expected a JSON object")
                missing = [k for k in required if k not in row]
                if missing:
                    raise DataError(f"{path} line {lineno}: missing key {missing[0]!r}")
                yield lineno, row
    except (OSError, EOFError, UnicodeDecodeError) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"cannot read {path}: {e}") from None


def read_jsonl(path: str | os.PathLike, required: Iterable[str] = ()) -> list[dict[str, Any]]:
    return [row for _, row in iter_jsonl(path, required)]


