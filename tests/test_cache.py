"""The stage cache serves only what it published: artifacts verified against their manifest (damaged ones are
recomputed with one log line), one computation per key across concurrent processes, models rebuilt when damaged."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ilf_lab.io import DamagedArtifact, publish_verified, verify
from ilf_lab.pipeline.cache import StageCache
from tests.conftest import SMOKE
from tests.test_pipeline import results, run_cli


def _write(rows: int):
    def compute(out: Path) -> dict:
        (out / "rows.jsonl").write_text("".join(json.dumps({"i": i}) + "\n" for i in range(rows)))
        (out / "sub").mkdir()
        (out / "sub" / "w.bin").write_bytes(bytes(range(256)) * 10)
        return {"rows": rows}
    return compute


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: p.joinpath("rows.jsonl").write_text('{"i": 0}\n'),  # truncated
        lambda p: p.joinpath("sub", "w.bin").write_bytes(b"\x01" + bytes(range(1, 256)) + bytes(range(256)) * 9),
        lambda p: p.joinpath("sub", "w.bin").unlink(),  # missing
        lambda p: p.joinpath("meta.json").write_text("{not json"),  # unreadable record
        lambda p: p.joinpath("meta.json").write_text(json.dumps({"meta": {"rows": 5}})),  # no manifest
    ],
    ids=["truncated", "altered", "missing", "bad-meta", "no-manifest"],
)
def test_damaged_artifact_is_recomputed_with_one_line(tmp_path, caplog, damage):
    cache = StageCache(tmp_path)
    first = cache.run("evaluate", "k1", _write(5))
    assert not first.cached and first.meta == {"rows": 5}
    assert cache.run("evaluate", "k1", _write(99)).cached  # intact: served, not recomputed
    damage(first.path)
    with caplog.at_level(logging.WARNING, logger="ilf_lab.pipeline"):
        again = cache.run("evaluate", "k1", _write(5))
    assert not again.cached and again.meta == {"rows": 5}
    assert len((again.path / "rows.jsonl").read_text().splitlines()) == 5
    lines = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert len(lines) == 1 and "evaluate k1" in lines[0] and "recomputing" in lines[0]
    assert not list(tmp_path.glob("stages/evaluate/.bad-*"))


def test_manifest_paths_cannot_point_outside(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "meta.json").write_text(json.dumps({"meta": {}, "files": {"../x": [1, "0"]}}))
    with pytest.raises(DamagedArtifact, match="outside"):
        verify(tmp_path / "a" / "meta.json")


def _slow_compute(args: tuple[str, str]) -> bool:
    root, log_file = args

    def compute(out: Path) -> dict:
        with open(log_file, "a") as f:
            f.write("computed\n")
        time.sleep(1.5)
        (out / "x.txt").write_text("x")
        return {}

    return StageCache(root).run("refine", "same", compute).cached


def test_a_key_being_computed_is_waited_for_not_recomputed(tmp_path):
    log_file = tmp_path / "log.txt"
    with mp.get_context("spawn").Pool(2) as pool:
        cached = pool.map(_slow_compute, [(str(tmp_path), str(log_file))] * 2)
    assert log_file.read_text().splitlines() == ["computed"]
    assert sorted(cached) == [False, True]


def test_damaged_model_dir_is_rebuilt(tmp_path):
    built = []

    def build(d: Path) -> None:
        built.append(1)
        (d / "weights.bin").write_bytes(b"w" * 100)

    final = publish_verified(tmp_path / "m", build)
    publish_verified(tmp_path / "m", build)
    assert len(built) == 1
    (final / "weights.bin").write_bytes(b"w" * 99)
    publish_verified(tmp_path / "m", build)
    assert len(built) == 2 and (final / "weights.bin").read_bytes() == b"w" * 100


def test_truncated_samples_are_recomputed_in_a_run(mini_data, tmp_path):
    """The finding: a truncated eval_samples.jsonl was served (results.json still said 10 samples per task)."""
    r = run_cli(SMOKE, mini_data, tmp_path / "c", tmp_path / "a")
    assert r.returncode == 0, r.stderr[-3000:]
    first = results(tmp_path / "a")
    (samples,) = (tmp_path / "c" / "stages" / "evaluate").glob("[0-9a-f]*/eval_samples.jsonl")
    samples.write_text("".join(samples.read_text().splitlines(keepends=True)[:7]))
    r = run_cli(SMOKE, mini_data, tmp_path / "c", tmp_path / "b")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "damaged" in r.stdout + r.stderr
    second = results(tmp_path / "b")
    st = {s["name"]: s for s in second["stages"]}
    assert not st["evaluate"]["cached"] and st["refine"]["cached"]
    assert len((tmp_path / "b" / "eval_samples.jsonl").read_text().splitlines()) == 30
    assert {k: second[k] for k in ("pass@1", "n_samples", "per_task")} == {
        k: first[k] for k in ("pass@1", "n_samples", "per_task")}


def test_two_concurrent_runs_compute_each_stage_once(mini_data, tmp_path):
    import os

    env = {**os.environ, "ILF_LAB_DATA_DIR": str(mini_data), "PYTHONHASHSEED": "0"}
    procs = [
        subprocess.Popen([sys.executable, "-m", "ilf_lab", *SMOKE, f"paths.cache_dir={tmp_path / 'c'}",
                          f"hydra.run.dir={tmp_path / name}"], env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
        for name in ("a", "b")
    ]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    runs = [results(tmp_path / name) for name in ("a", "b")]
    computed: dict[str, int] = {}
    for res in runs:
        for s in res["stages"]:
            if s["key"]:
                computed[s["name"]] = computed.get(s["name"], 0) + (not s["cached"])
    assert computed and all(v == 1 for v in computed.values()), computed
    assert runs[0]["per_task"] == runs[1]["per_task"]


def test_edited_or_copied_metadata_is_not_served(tmp_path):
    """meta.json (the numbers results.json is built from) is covered too: an edited value, or an artifact
    copied under another key, is recomputed."""
    import shutil

    cache = StageCache(tmp_path)
    art = cache.run("evaluate", "k1", _write(5))
    record = json.loads((art.path / "meta.json").read_text())
    record["meta"]["rows"] = 6
    (art.path / "meta.json").write_text(json.dumps(record))
    assert cache.lookup("evaluate", "k1") is None
    art = cache.run("evaluate", "k1", _write(5))
    shutil.copytree(art.path, art.path.parent / "k2")
    assert cache.lookup("evaluate", "k2") is None and cache.lookup("evaluate", "k1") is not None


def test_atomic_write_gives_the_usual_file_mode(tmp_path):
    """Published results are readable like any file the user writes (mkstemp alone leaves 0600)."""
    from ilf_lab.io import atomic_write_text

    out = tmp_path / "results.json"
    atomic_write_text(out, "{}")
    mask = os.umask(0o022)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~mask
    assert not list(tmp_path.glob(".results.json.*"))  # no temp file left behind
