"""Content-addressed stage cache.

A stage's artifact lives at `<cache_dir>/stages/<stage>/<key>/`, where the key hashes the stage's config slice and
its upstream keys. The directory is built under a temporary name and renamed into place only when complete, with
`meta.json` inside, so a killed stage leaves nothing that looks finished and a rerun recomputes exactly what did
not finish. Jobs of a sweep that share a slice share the artifact.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from ilf_lab.data.mbpp import read_jsonl  # noqa: F401  (the one strict JSONL reader)

# bump when a stage's artifact format or semantics change, so old caches are not reused
CACHE_VERSION = 2


def _plain(obj: Any) -> Any:
    if isinstance(obj, (DictConfig, ListConfig)):
        return OmegaConf.to_container(obj, resolve=True)
    return obj


def stage_key(stage: str, slice_: Any, upstream: dict[str, str] | None = None) -> str:
    payload = {"stage": stage, "version": CACHE_VERSION, "config": _plain(slice_), "upstream": upstream or {}}
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass
class Artifact:
    """A finished stage: its directory and the metadata the stage returned."""

    stage: str
    key: str
    path: Path
    meta: dict[str, Any] = field(default_factory=dict)
    cached: bool = False
    seconds: float = 0.0

    def file(self, name: str) -> Path:
        return self.path / name


class StageCache:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root) / "stages"

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def lookup(self, stage: str, key: str) -> Artifact | None:
        path = self.path(stage, key)
        meta_file = path / "meta.json"
        if not meta_file.is_file():
            return None
        meta = json.loads(meta_file.read_text())
        return Artifact(stage, key, path, meta.get("meta", {}), cached=True, seconds=0.0)

    def run(self, stage: str, key: str, compute: Callable[[Path], dict[str, Any]]) -> Artifact:
        """Return the cached artifact, or compute it into a temp dir and publish it atomically."""
        t0 = time.perf_counter()
        hit = self.lookup(stage, key)
        if hit is not None:
            hit.seconds = time.perf_counter() - t0
            return hit
        final = self.path(stage, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        _remove_orphans(final.parent, key)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-{_HOST}-{os.getpid()}-", dir=final.parent))
        try:
            meta = compute(tmp) or {}
            (tmp / "meta.json").write_text(json.dumps({"stage": stage, "key": key, "meta": meta}, indent=1))
            try:
                os.rename(tmp, final)
            except OSError:  # a concurrent job published the same key first: theirs is equivalent
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        art = self.lookup(stage, key)
        assert art is not None
        art.cached = False
        art.seconds = time.perf_counter() - t0
        return art


_HOST = socket.gethostname().replace("-", "_")


def _remove_orphans(parent: Path, key: str) -> None:
    """Temp dirs of this key left by a killed process of this host (a SIGKILL skips the cleanup above).

    Only this host's dead PIDs: on a shared filesystem another host's job may be writing its own temp dir."""
    for d in parent.glob(f".tmp-{key}-*"):
        parts = d.name.split("-")  # .tmp-<key>-<host>-<pid>-<random>
        if len(parts) < 5 or parts[2] != _HOST or not parts[3].isdigit():
            continue
        try:
            os.kill(int(parts[3]), 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except PermissionError:  # alive, another user's
            pass


def write_jsonl(path: str | os.PathLike, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
