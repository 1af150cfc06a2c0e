"""Files the project publishes, written once: JSONL read/write, atomic text files and atomic directories.

Every artifact is written beside its final place under a temporary name and renamed into place, so a reader (or
a rerun after a kill) never sees half of one.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ilf_lab.errors import DataError


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write via a temp file in the same directory + rename: readers never see half a file. The file gets the
    mode a plain open() would (mkstemp's is 0600: results others could not read)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _umask() -> int:
    """The process umask, read without setting it (setting it, even briefly, races other threads' file creation)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # no /proc: the only portable way
    os.umask(mask)
    return mask


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


class DamagedArtifact(Exception):
    """A published directory whose files do not match the manifest recorded when it was published."""


_FULL_HASH_LIMIT = 64 << 20
_BLOCK = 1 << 20


def _digest(path: Path, size: int) -> str:
    """sha256 of the file, or for a file over 64 MB of its size and three 1 MB blocks (start, middle, end)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= _FULL_HASH_LIMIT:
            for block in iter(lambda: f.read(_BLOCK), b""):
                h.update(block)
            return h.hexdigest()
        h.update(str(size).encode())
        for offset in (0, size // 2, size - _BLOCK):
            f.seek(offset)
            h.update(f.read(_BLOCK))
    return "sampled:" + h.hexdigest()


def manifest(root: Path) -> dict[str, list]:
    """{relative path: [size, digest]} for every file under `root` (meta.json is written after)."""
    out = {}
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        size = f.stat().st_size
        out[str(f.relative_to(root))] = [size, _digest(f, size)]
    return out


def verify(record_file: Path) -> dict[str, Any]:
    """The JSON record (with a `files` manifest of its directory) after checking every recorded file's size and
    digest; raises DamagedArtifact naming the first mismatch."""
    path = record_file.parent
    try:
        record = json.loads(record_file.read_text())
        files = record["files"]
        assert isinstance(files, dict)
        entries = [(rel, int(size), str(digest)) for rel, (size, digest) in files.items()]
    except (OSError, ValueError, KeyError, AssertionError, TypeError):
        raise DamagedArtifact(f"{record_file.name} is missing or unreadable") from None
    for rel, size, digest in entries:
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise DamagedArtifact(f"{record_file.name} names a file outside its directory: {rel}")
        f = path / rel
        try:
            actual = f.stat().st_size
        except OSError:
            raise DamagedArtifact(f"{rel} is missing") from None
        if actual != size:
            raise DamagedArtifact(f"{rel} has {actual} bytes, {size} were published")
        if _digest(f, size) != digest:
            raise DamagedArtifact(f"{rel} differs from what was published")
    return record


def publish_verified(final: Path, build: Callable[[Path], Any], record: str = "manifest.json") -> Path:
    """`final` if it exists and matches its manifest; else built (again) and published with a manifest."""
    if final.exists():
        try:
            verify(final / record)
            return final
        except DamagedArtifact as e:
            logging.getLogger(__name__).warning("%s is damaged (%s); building it again", final, e)
            aside = final.with_name(f".bad-{final.name}-{os.getpid()}")
            os.rename(final, aside)
            shutil.rmtree(aside, ignore_errors=True)

    def build_and_record(tmp: Path) -> None:
        build(tmp)
        (tmp / record).write_text(json.dumps({"files": manifest(tmp)}, indent=1))

    publish_dir(final, build_and_record)
    return final


def write_jsonl(path: str | os.PathLike, rows: Sequence[dict[str, Any]]) -> None:
    """One JSON object per line (the stage cache publishes the directory around it atomically)."""
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


# a JSONL schema: key -> (allowed types, required); `int` never admits `bool` (JSON true is no task id)
Schema = Mapping[str, tuple[tuple[type, ...], bool]]


def iter_jsonl(
    path: str | os.PathLike, required: Iterable[str] | Schema = ()
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) per non-blank line of a .jsonl or .jsonl.gz file; the one strict JSONL reader:
    a missing file, a directory, a bad line, a missing key or (with a Schema) a value of the wrong type stops
    with one DataError naming file, line and key."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a directory, not a JSONL file")
    if not path.is_file():
        raise DataError(f"missing data file: {path}")
    schema: Schema = required if isinstance(required, Mapping) else {k: ((object,), True) for k in required}
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
                _check_row(row, schema, f"{path} line {lineno}")
                yield lineno, row
    except (OSError, EOFError, UnicodeDecodeError) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"cannot read {path}: {e}") from None


def _check_row(row: dict[str, Any], schema: Schema, where: str) -> None:
    for key, (types, needed) in schema.items():
        if key not in row:
            if needed:
                raise DataError(f"{where}: missing key {key!r}")
            continue
        v = row[key]
        ok = isinstance(v, types) and not (isinstance(v, bool) and bool not in types and object not in types)
        if isinstance(v, float) and not math.isfinite(v):
            ok = False
        if ok and isinstance(v, list) and key.endswith("_list"):
            ok = all(isinstance(x, str) for x in v)
        if not ok:
            names = "/".join("null" if t is type(None) else t.__name__ for t in types)
            raise DataError(f"{where}: {key}={v!r:.60} is not {names}")


def read_jsonl(path: str | os.PathLike, required: Iterable[str] = ()) -> list[dict[str, Any]]:
    return [row for _, row in iter_jsonl(path, required)]


