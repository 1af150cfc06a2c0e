"""Test helper: read an offline W&B run back from the files wandb wrote, to check what a run recorded.

Only tests need this (it parses wandb's private file format), so it lives beside them, not in the package.
"""

from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path
from typing import Any


def read_offline_run(run_dir: str | os.PathLike, wait: float = 15.0) -> dict[str, Any]:
    """Read an offline run back from its `run-<id>.wandb` file: config, summary, group, name, tags, history.

    wandb 0.31 writes no `wandb-summary.json` offline; the records live only in the LevelDB-style log (a 7-byte
    W&B header, then 32 KiB blocks of `crc32c(4) length(2) type(1)` chunks holding protobuf `Record`s).
    Useful for tests and for checking what a run recorded before `wandb sync`. wandb-core writes the file
    asynchronously, even after `run.finish()` returned: wait up to `wait` seconds for the run's exit record.
    """
    deadline = time.monotonic() + wait
    while True:
        out = _read_offline_once(Path(run_dir))
        if out["exit_code"] is not None or time.monotonic() >= deadline:
            return out
        time.sleep(0.1)


def _read_offline_once(run_dir: Path) -> dict[str, Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    files = sorted(run_dir.glob("run-*.wandb"))
    if not files:
        raise FileNotFoundError(f"no run-*.wandb file in {run_dir}")
    data = files[0].read_bytes()
    out: dict[str, Any] = {
        "config": {},
        "summary": {},
        "history": [],
        "group": None,
        "name": None,
        "tags": [],
        "job_type": None,
        "run_id": None,
        "project": None,
        "exit_code": None,
    }
    for payload in _leveldb_records(data):
        rec = pb.Record()
        rec.ParseFromString(payload)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run
            out.update(
                group=r.run_group or None,
                name=r.display_name or None,
                tags=list(r.tags),
                job_type=r.job_type or None,
                run_id=r.run_id,
                project=r.project,
            )
            _apply_config(out["config"], r.config)
        elif kind == "config":
            _apply_config(out["config"], rec.config)
        elif kind == "summary":
            for item in rec.summary.update:
                keys = list(item.nested_key) or [item.key]
                _set_nested(out["summary"], keys, json.loads(item.value_json))
        elif kind == "history":
            row: dict[str, Any] = {}
            for item in rec.history.item:
                keys = list(item.nested_key) or [item.key]
                row["/".join(keys)] = json.loads(item.value_json)
            out["history"].append(row)
        elif kind == "exit":
            out["exit_code"] = rec.exit.exit_code
    return out


def _apply_config(target: dict[str, Any], config: Any) -> None:
    for item in config.update:
        keys = list(item.nested_key) or [item.key]
        _set_nested(target, keys, json.loads(item.value_json))


def _set_nested(target: dict[str, Any], keys: list[str], value: Any) -> None:
    for k in keys[:-1]:
        target = target.setdefault(k, {})
    target[keys[-1]] = value


def _leveldb_records(data: bytes, block: int = 32768) -> list[bytes]:
    records: list[bytes] = []
    pos, pending = 7, b""  # skip the ':W&B' + magic + version header
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        chunk = data[pos : pos + length]
        pos += length
        if kind == 0 and length == 0:
            break
        if kind == 1:  # FULL
            records.append(chunk)
        elif kind == 2:  # FIRST
            pending = chunk
        elif kind == 3:  # MIDDLE
            pending += chunk
        elif kind == 4:  # LAST
            records.append(pending + chunk)
            pending = b""
    return records
