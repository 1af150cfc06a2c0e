"""The stage store: `<cache_dir>/stages/<stage>/<key>/`, published atomically.

Keys are derived in `stage.py` (from the slice, the upstream keys and the code version, never from file names,
sizes or mtimes). This module only stores: a stage computes into a temp dir that is renamed into place with
`meta.json` inside, so a killed stage leaves nothing that looks finished and a rerun recomputes exactly what did
not finish. A stage that wants to survive a kill mid-way (training) gets a per-key `scratch` dir that is kept
until its artifact is published. Verifying an artifact before it is served and a lock per key slot into
`_verified` and `run` (the integrity work).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ilf_lab.io import publish_dir
from ilf_lab.pipeline.stage import Artifact

_HOST = socket.gethostname().replace("-", "_")


class StageCache:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root) / "stages"

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def scratch(self, stage: str, key: str) -> Path:
        """A dir that survives a killed run of this key (checkpoints to resume from); removed on publish."""
        d = self.root / stage / f".scratch-{key}"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def lookup(self, stage: str, key: str) -> Artifact | None:
        path = self.path(stage, key)
        meta = self._verified(path)
        if meta is None:
            return None
        return Artifact(stage, key, path, meta.get("meta", {}), cached=True)

    def _verified(self, path: Path) -> dict[str, Any] | None:
        meta_file = path / "meta.json"
        if not meta_file.is_file():
            return None
        return json.loads(meta_file.read_text())

    def run(self, stage: str, key: str, compute: Callable[[Path], dict[str, Any]]) -> Artifact:
        """The cached artifact, or `compute(tmp_dir) -> meta` published atomically under the key."""
        t0 = time.perf_counter()
        hit = self.lookup(stage, key)
        if hit is not None:
            return _with(hit, seconds=time.perf_counter() - t0)
        final = self.path(stage, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        _remove_orphans(final.parent, key)

        def build(tmp: Path) -> None:
            meta = compute(tmp) or {}
            (tmp / "meta.json").write_text(json.dumps({"stage": stage, "key": key, "meta": meta}, indent=1))

        publish_dir(final, build, prefix=f".tmp-{key}-{_HOST}-{os.getpid()}-")
        shutil.rmtree(final.parent / f".scratch-{key}", ignore_errors=True)
        art = self.lookup(stage, key)
        assert art is not None
        return _with(art, cached=False, seconds=time.perf_counter() - t0)


def _with(art: Artifact, **changes: Any) -> Artifact:
    from dataclasses import replace

    return replace(art, **changes)


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
