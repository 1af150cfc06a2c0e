"""ilf_lab.tracking: offline W&B runs, read back from the files wandb writes (contract 5)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ilf_lab.tracking import Tracker, read_offline_run


def make_cfg(out: Path, **logger) -> OmegaConf:
    lg = {
        "name": "wandb",
        "project": "ilf_lab_test",
        "entity": None,
        "mode": "offline",
        "group": None,
        "tags": ["unit"],
        "dir": "${paths.output_dir}",
    }
    lg.update(logger)
    return OmegaConf.create(
        {
            "name": "ilf",
            "scale": "smoke",
            "seed": 0,
            "feedback": {"name": "human"},
            "train_on": {"source": "refinements"},
            "model": {"name": "tiny_random"},
            "policy": {"lr": 1e-3},
            "paths": {"output_dir": str(out), "cache_dir": str(out / "cache")},
            "logger": lg,
        }
    )


def run_dirs(root: Path) -> list[Path]:
    return sorted(root.rglob("offline-run-*"))


def test_two_runs_in_one_process_share_a_group(tmp_path, capsys):
    trackers = []
    for i in range(2):
        t = Tracker.from_config(make_cfg(tmp_path / f"job{i}", group="sweep-abc"))
        t.start()
        t.log_stage("tasks", 0.5, cached=bool(i), info={"n": 3})
        t.log_metrics({"pass@1": 0.1 * (i + 1), "pass@10": None, "counts": {"x0": 4}})
        t.log_table("eval_samples", [{"task_id": 11, "passed": True, "result": "passed", "tests": ["a"]}])
        trackers.append(t)  # both open at once: a fresh run each, never the previous one
    for t in trackers:
        t.finish()
        t.finish()  # idempotent
    infos = [t.info for t in trackers]
    assert infos[0]["run_id"] != infos[1]["run_id"]
    dirs = run_dirs(tmp_path)
    assert len(dirs) == 2
    assert {str(d) for d in dirs} == {i["run_dir"] for i in infos}
    for i, info in enumerate(infos):
        assert info["mode"] == "offline" and info["group"] == "sweep-abc"
        assert Path(info["run_dir"]).is_relative_to(tmp_path / f"job{i}")
        run = read_offline_run(info["run_dir"])
        assert run["group"] == "sweep-abc"
        assert run["summary"]["pass@1"] == pytest.approx(0.1 * (i + 1))
        assert "pass@10" not in run["summary"]
        assert run["summary"]["counts/x0"] == 4
        assert run["summary"]["stage/tasks/cached"] == i
        assert run["config"]["logger"]["group"] == "sweep-abc"
        assert run["config"]["policy"]["lr"] == 1e-3
        assert run["config"]["paths"]["output_dir"] == str(tmp_path / f"job{i}")
        assert "experiment:ilf" in run["tags"] and "unit" in run["tags"]
        assert run["name"] == "ilf" and run["exit_code"] == 0
    assert "wandb: disabled" not in capsys.readouterr().err


def test_lightning_logger_writes_into_the_run(tmp_path):
    t = Tracker.from_config(make_cfg(tmp_path)).start()
    lg = t.lightning_logger("policy")
    assert lg is not None and lg.experiment is t.run
    for step, loss in enumerate([3.0, 2.0, 1.0]):
        lg.log_metrics({"train_loss": loss}, step=step)
    t.log_metrics({"pass@1": 0.5})
    t.finish()
    run = read_offline_run(t.info["run_dir"])
    losses = [h["policy-train_loss"] for h in run["history"] if "policy-train_loss" in h]
    assert losses == [3.0, 2.0, 1.0]
    assert run["summary"]["pass@1"] == 0.5


@pytest.mark.parametrize(
    "logger",
    [
        {"mode": "bogus"},
        {"name": "tensorboard"},
        {"mode": "online", "entity": "no-such-entity-zz"},  # no API key here: fails before any network
    ],
)
def test_misconfigured_tracker_degrades_to_noop(tmp_path, capsys, monkeypatch, logger):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wbcfg"))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    t = Tracker.from_config(make_cfg(tmp_path, **logger))
    t.start()
    t.log_stage("tasks", 0.1, cached=False)
    t.log_metrics({"pass@1": 0.1})
    t.log_table("x", [{"a": 1}])
    assert t.lightning_logger("policy") is None
    t.finish()
    t.finish()
    assert t.info["mode"] == "disabled" and t.info["run_dir"] is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("wandb: disabled (")
    assert run_dirs(tmp_path) == []


def test_init_raising_degrades_to_noop(tmp_path, capsys, monkeypatch):
    import wandb

    def boom(*a, **k):
        raise wandb.errors.CommError("server unreachable")

    monkeypatch.setattr(wandb, "init", boom)
    t = Tracker.from_config(make_cfg(tmp_path)).start()
    t.log_metrics({"pass@1": 0.1})
    t.finish(1)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["wandb: disabled (CommError: server unreachable)"]


def test_logging_error_mid_run_degrades(tmp_path, capsys):
    t = Tracker.from_config(make_cfg(tmp_path)).start()
    assert t.active

    class Broken:
        def log(self, *a, **k):
            raise RuntimeError("backend died")

        def finish(self, *a, **k):
            pass

    t._run = Broken()
    t.log_metrics({"pass@1": 0.1})
    t.log_metrics({"pass@1": 0.2})
    t.finish()
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["wandb: disabled (RuntimeError: backend died)"]


def test_logger_none_creates_nothing(tmp_path, capsys):
    cfg = make_cfg(tmp_path, name="none", mode="disabled")
    t = Tracker.from_config(cfg).start()
    t.log_metrics({"pass@1": 0.1})
    t.log_stage("tasks", 0.1, cached=False)
    assert t.lightning_logger("policy") is None
    t.finish()
    assert not t.active and t.info["mode"] == "disabled"
    assert list(tmp_path.iterdir()) == []
    assert capsys.readouterr().err == ""


HYDRA_APP = """
import sys, json
import hydra
from omegaconf import OmegaConf
from ilf_lab.tracking import Tracker

@hydra.main(version_base="1.3", config_path=None, config_name=None)
def main(cfg):
    cfg = OmegaConf.create({
        "name": cfg.get("experiment", "ilf"),
        "paths": {"output_dir": hydra.core.hydra_config.HydraConfig.get().runtime.output_dir},
        "logger": {"name": "wandb", "project": "p", "mode": "offline", "group": None, "tags": [],
                   "dir": "${paths.output_dir}"},
    })
    t = Tracker.from_config(cfg).start()
    t.log_metrics({"pass@1": 0.25})
    t.finish()
    with open(sys.argv[0] + ".out", "a") as f:
        f.write(json.dumps({**t.info, "name": t.name, "job_type": t.job_type}) + "\\n")

main()
"""


def test_hydra_multirun_jobs_are_separate_runs_in_one_group(tmp_path):
    app = tmp_path / "app.py"
    app.write_text(textwrap.dedent(HYDRA_APP))
    sweep = tmp_path / "sweep"
    p = subprocess.run(
        [sys.executable, str(app), "-m", "+experiment=ilf,zero_shot", f"hydra.sweep.dir={sweep}"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    import json

    infos = [json.loads(ln) for ln in (tmp_path / "app.py.out").read_text().splitlines()]
    assert len(infos) == 2
    assert infos[0]["run_id"] != infos[1]["run_id"]
    groups = {i["group"] for i in infos}
    assert groups == {f"{tmp_path.name}-sweep"}
    assert [i["name"] for i in infos] == ["0:ilf +experiment=ilf", "1:zero_shot +experiment=zero_shot"]
    assert {i["job_type"] for i in infos} == {"sweep_job"}
    for info in infos:
        run = read_offline_run(info["run_dir"])
        assert run["group"] == info["group"] and run["summary"]["pass@1"] == 0.25
        assert run["config"]["_hydra"]["mode"] == "MULTIRUN"
