"""The stage store: `<cache_dir>/stages/<stage>/<key>/`, published atomically.

Keys are derived in `stage.py` (from the slice, the upstream keys and the code version, never from file names,
sizes or mtimes). This module only stores: a stage computes into a temp dir that is renamed into place with
`meta.json` inside, so a killed stage leaves nothing that looks finished and a rerun recomputes exactly what did
not finish. A stage that wants to survive a kill mid-way (training) gets a per-key `scratch` dir that is kept
until its artifact is published.

Integrity: `meta.json` records every file's size and sha256 at publish; an artifact is served only after they
match (files over 64 MB: size + sha256 of three sampled 1 MB blocks, so a lookup of a multi-GB checkpoint costs
milliseconds, not seconds). A damaged artifact (truncated, altered, missing file, unreadable meta) is moved aside and
recomputed, with one log line. One lock per key (`flock` on `<stage>/.lock-<key>`): a stage that a live process is
computing is waited for, then served from the cache, never computed twice (on one host, or on a filesystem whose
locks span hosts).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ilf_lab.io import DamagedArtifact, manifest, publish_dir, verify
from ilf_lab.pipeline.stage import Artifact

_HOST = socket.gethostname().replace("-", "_")
log = logging.getLogger("ilf_lab.pipeline")


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
        """The artifact if it exists and verifies; a damaged one is moved aside (and None returned)."""
        path = self.path(stage, key)
        if not path.exists():
            return None
        try:
            meta = verify(path / "meta.json")
            if (meta.get("stage"), meta.get("key")) != (stage, key):
                raise DamagedArtifact(f"meta.json belongs to {meta.get('stage')} {meta.get('key')}")
            if not isinstance(meta.get("meta"), dict) or meta.get("digest") != _record_digest(meta):
                raise DamagedArtifact("meta.json's metadata differs from what was published")
        except DamagedArtifact as e:
            log.warning("stage %s %s: cached artifact is damaged (%s); recomputing", stage, key, e)
            _discard(path)
            return None
        return Artifact(stage, key, path, meta.get("meta", {}), cached=True)

    def run(self, stage: str, key: str, compute: Callable[[Path], dict[str, Any]]) -> Artifact:
        """The cached artifact, or `compute(tmp_dir) -> meta` published atomically under the key; while another
        live process computes the same key, wait for it and serve its artifact."""
        t0 = time.perf_counter()
        hit = self.lookup(stage, key)
        if hit is not None:
            return _with(hit, seconds=time.perf_counter() - t0)
        final = self.path(stage, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        with self._lock(stage, key):
            hit = self.lookup(stage, key)  # computed by the process we waited for
            if hit is not None:
                return _with(hit, seconds=time.perf_counter() - t0)
            _remove_orphans(final.parent, key)

            def build(tmp: Path) -> None:
                meta = compute(tmp) or {}
                record = {"stage": stage, "key": key, "meta": meta, "files": manifest(tmp)}
                record["digest"] = _record_digest(record)
                (tmp / "meta.json").write_text(json.dumps(record, indent=1))

            publish_dir(final, build, prefix=f".tmp-{key}-{_HOST}-{os.getpid()}-")
            shutil.rmtree(final.parent / f".scratch-{key}", ignore_errors=True)
        art = self.lookup(stage, key)
        if art is None:
            raise DamagedArtifact(f"stage {stage} {key}: the artifact just published does not verify")
        return _with(art, cached=False, seconds=time.perf_counter() - t0)

    @contextmanager
    def _lock(self, stage: str, key: str) -> Iterator[None]:
        with open(self.root / stage / f".lock-{key}", "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("stage %s %s: another process is computing it; waiting", stage, key)
                fcntl.flock(f, fcntl.LOCK_EX)
            except OSError as e:  # a filesystem without locks (e.g. Lustre mounted noflock)
                log.warning("stage %s %s: cannot lock the cache (%s); concurrent runs may compute it twice",
                            stage, key, e)
                yield
                return
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


def _discard(path: Path) -> None:
    """Move a damaged artifact out of the way (rename is atomic; readers never see it half-removed)."""
    aside = path.with_name(f".bad-{path.name}-{os.getpid()}-{time.time_ns()}")
    try:
        os.rename(path, aside)
    except OSError:
        return
    shutil.rmtree(aside, ignore_errors=True)


def _record_digest(record: dict[str, Any]) -> str:
    """sha256 of the record's canonical JSON (its stage, key, metadata and manifest): catches an edited or
    truncated meta.json (integrity against accidents, not a signature against someone who can rewrite files)."""
    body = {k: record.get(k) for k in ("stage", "key", "meta", "files")}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


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
