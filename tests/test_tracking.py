"""ilf_lab.tracking: offline W&B runs, read back from the files wandb writes (contract 5); the failure boundary;
which tracker a config selects; and the precedence command line > WANDB_* environment > config."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ilf_lab.tracking import NullTracker, SafeTracker, Tracker, make_tracker
from ilf_lab.tracking.wandb import WandbTracker
from tests.wandb_offline import read_offline_run

WANDB_ENV = ("WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_GROUP")


@pytest.fixture(autouse=True)
def _no_wandb_env(monkeypatch):
    """The WANDB_* settings of whoever runs the tests must not leak in: they take precedence over configs."""
    for var in WANDB_ENV:
        monkeypatch.delenv(var, raising=False)


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
        t = make_tracker(make_cfg(tmp_path / f"job{i}", group="sweep-abc"))
        assert isinstance(t, Tracker) and isinstance(t.inner, WandbTracker)
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
    t = make_tracker(make_cfg(tmp_path))
    lg = t.lightning_logger("policy")
    assert lg is not None and lg.experiment is t.inner.run
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
    t = make_tracker(make_cfg(tmp_path, **logger))
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
    t = make_tracker(make_cfg(tmp_path))
    t.log_metrics({"pass@1": 0.1})
    t.finish(1)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["wandb: disabled (CommError: server unreachable)"]


def test_logging_error_mid_run_degrades(tmp_path, capsys):
    t = make_tracker(make_cfg(tmp_path))
    assert isinstance(t.inner, WandbTracker)

    class Broken:
        def log(self, *a, **k):
            raise RuntimeError("backend died")

        def finish(self, *a, **k):
            pass

    t.inner._run = Broken()
    t.log_metrics({"pass@1": 0.1})
    t.log_metrics({"pass@1": 0.2})
    t.finish()
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["wandb: disabled (RuntimeError: backend died)"]
    assert t.info["mode"] == "disabled" and t.info["reason"] == "RuntimeError: backend died"


def test_logger_none_creates_nothing(tmp_path, capsys):
    cfg = make_cfg(tmp_path, name="none", mode="disabled")
    t = make_tracker(cfg)
    t.log_metrics({"pass@1": 0.1})
    t.log_stage("tasks", 0.1, cached=False)
    assert t.lightning_logger("policy") is None
    t.finish()
    assert isinstance(t.inner, NullTracker) and t.info == {}
    assert list(tmp_path.iterdir()) == []
    assert capsys.readouterr().err == ""


HYDRA_APP = """
import sys, json
import hydra
from omegaconf import OmegaConf
from ilf_lab.tracking import make_tracker

@hydra.main(version_base="1.3", config_path=None, config_name=None)
def main(cfg):
    cfg = OmegaConf.create({
        "name": cfg.get("experiment", "ilf"),
        "paths": {"output_dir": hydra.core.hydra_config.HydraConfig.get().runtime.output_dir},
        "logger": {"name": "wandb", "project": "p", "mode": "offline", "group": None, "tags": [],
                   "dir": "${paths.output_dir}"},
    })
    t = make_tracker(cfg)
    t.log_metrics({"pass@1": 0.25})
    t.finish()
    with open(sys.argv[0] + ".out", "a") as f:
        f.write(json.dumps(t.info) + "\\n")

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
    runs = [read_offline_run(info["run_dir"]) for info in infos]
    assert [r["name"] for r in runs] == ["0:ilf +experiment=ilf", "1:zero_shot +experiment=zero_shot"]
    assert {r["job_type"] for r in runs} == {"sweep_job"}
    for info, run in zip(infos, runs, strict=True):
        assert run["group"] == info["group"] and run["summary"]["pass@1"] == 0.25
        assert run["config"]["_hydra"]["mode"] == "MULTIRUN"


# ------------------------------------------------------------------------------------------ selection, boundary


class Recording:
    """A tracker that records its calls; `fail_on` names the method that raises."""

    calls: list[str] = []
    fail_on: str | None = None

    @classmethod
    def from_config(cls, cfg):
        cls._maybe_fail("from_config")
        return cls()

    @classmethod
    def _maybe_fail(cls, method: str) -> None:
        cls.calls.append(method)
        if cls.fail_on == method:
            raise OSError(f"{method} broke")

    @property
    def info(self):
        return {"kind": "recording"}

    def log_stage(self, name, seconds, cached, status="ok", info=None):
        self._maybe_fail("log_stage")

    def log_metrics(self, metrics, step=None):
        self._maybe_fail("log_metrics")

    def log_table(self, name, rows):
        self._maybe_fail("log_table")

    def lightning_logger(self, prefix):
        self._maybe_fail("lightning_logger")
        return "a logger"

    def finish(self, exit_code=0):
        self._maybe_fail(f"finish({exit_code})")


RECORDING = f"{__name__}.Recording"  # as pytest imported this module, so `_target_` finds this very class


@pytest.fixture
def recording(monkeypatch):
    monkeypatch.setattr(Recording, "calls", [])
    monkeypatch.setattr(Recording, "fail_on", None)
    return Recording


def target_cfg(tmp_path, target: str, name: str = "wandb"):
    return make_cfg(tmp_path, name=name, _target_=target)


def test_target_selects_the_class_over_the_name(tmp_path, recording, capsys):
    t = make_tracker(target_cfg(tmp_path, RECORDING))
    assert isinstance(t, SafeTracker) and isinstance(t.inner, Recording) and isinstance(t.inner, Tracker)
    t.log_stage("tasks", 1.0, cached=False)
    t.log_metrics({"pass@1": 0.5})
    t.log_table("x", [{"a": 1}])
    assert t.lightning_logger("policy") == "a logger"
    assert t.info == {"kind": "recording"}
    t.finish(3)
    t.finish(0)  # idempotent: the inner tracker is finished once
    assert t.info == {"kind": "recording"}  # still what the run was
    assert recording.calls == [
        "from_config",
        "log_stage",
        "log_metrics",
        "log_table",
        "lightning_logger",
        "finish(3)",
    ]
    t.log_metrics({"late": 1})  # after finish: a no-op
    assert recording.calls[-1] == "finish(3)"
    assert capsys.readouterr().err == ""
    # the class path documented for conf/logger/none.yaml (wins over name=wandb); the W&B one: the next test
    assert isinstance(
        make_tracker(target_cfg(tmp_path, "ilf_lab.tracking.base.NullTracker")).inner, NullTracker
    )
    assert list(tmp_path.iterdir()) == []


def test_target_wandb_class_path(tmp_path):
    t = make_tracker(target_cfg(tmp_path, "ilf_lab.tracking.wandb.WandbTracker", name="none"))
    assert isinstance(t.inner, WandbTracker)
    t.finish()
    assert read_offline_run(t.info["run_dir"])["exit_code"] == 0


@pytest.mark.parametrize(
    "method",
    ["from_config", "log_stage", "log_metrics", "log_table", "lightning_logger", "finish(0)"],
)
def test_any_failure_disables_once_and_the_run_goes_on(tmp_path, recording, capsys, method):
    recording.fail_on = method
    t = make_tracker(target_cfg(tmp_path, RECORDING))
    for _ in range(2):  # a second round of calls after the failure: all no-ops, no second line
        t.log_stage("tasks", 1.0, cached=False)
        t.log_metrics({"pass@1": 0.5})
        t.log_table("x", [{"a": 1}])
        logger = t.lightning_logger("policy")
    t.finish()
    t.finish()
    assert capsys.readouterr().err.splitlines() == [f"wandb: disabled (OSError: {method} broke)"]
    assert isinstance(t.inner, NullTracker) and (logger is None) == (method != "finish(0)")
    assert t.info == {
        "mode": "disabled",
        "run_dir": None,
        "run_id": None,
        "reason": f"OSError: {method} broke",
    }
    after = recording.calls[recording.calls.index(method) + 1 :]
    assert after == ([] if method == "from_config" else ["finish(1)"])  # nothing to close / closed as failed


@pytest.mark.parametrize(
    "logger, reason",
    [
        ({"_target_": "no_such_module.Tracker"}, "ImportError"),
        ({"_target_": "pathlib.Path"}, "TypeError: pathlib.Path has no from_config(cfg): not a tracker"),
        ({"name": "tensorboard"}, "ConfigError: logger.name='tensorboard' is not one of wandb, none"),
    ],
)
def test_unknown_tracker_class_disables(tmp_path, capsys, logger, reason):
    t = make_tracker(make_cfg(tmp_path, **logger))
    t.log_metrics({"pass@1": 0.1})
    t.finish()
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"wandb: disabled ({reason}")
    assert t.info["mode"] == "disabled"


def test_no_logger_section_disables(capsys):
    t = make_tracker(OmegaConf.create({"name": "ilf"}))
    t.finish()
    assert capsys.readouterr().err.splitlines() == [
        "wandb: disabled (ConfigError: no logger section in the config)"
    ]


def test_old_spelling_is_the_factory(tmp_path, capsys):
    t = Tracker.from_config(make_cfg(tmp_path, name="none", mode="disabled"))
    assert isinstance(t, SafeTracker) and isinstance(t.inner, NullTracker) and t.info == {}


# ------------------------------------------------------------------------------------------ precedence


def test_wandb_env_beats_the_config(tmp_path, monkeypatch, capsys):
    env_dir = tmp_path / "wandb_env_dir"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(env_dir))
    monkeypatch.setenv("WANDB_PROJECT", "env_project")
    monkeypatch.setenv("WANDB_RUN_GROUP", "env-group")
    # the config asks for no W&B at all, another project, group and dir: the environment wins
    t = make_tracker(make_cfg(tmp_path / "out", mode="disabled", project="cfg_project", group="cfg-group"))
    assert isinstance(t.inner, WandbTracker)
    t.log_metrics({"pass@1": 0.5})
    t.finish()
    assert t.info["mode"] == "offline" and t.info["group"] == "env-group"
    assert Path(t.info["run_dir"]).is_relative_to(env_dir)
    assert not (tmp_path / "out").exists()
    run = read_offline_run(t.info["run_dir"])
    assert run["project"] == "env_project" and run["group"] == "env-group"
    assert capsys.readouterr().err == ""


def test_wandb_mode_disabled_in_env_turns_tracking_off(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    t = make_tracker(make_cfg(tmp_path))
    t.log_metrics({"pass@1": 0.5})
    t.finish()
    assert isinstance(t.inner, NullTracker) and t.info == {}
    assert list(tmp_path.iterdir()) == [] and capsys.readouterr().err == ""


def test_bad_wandb_mode_in_env_names_the_variable(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "sideways")
    make_tracker(make_cfg(tmp_path)).finish()
    assert capsys.readouterr().err.splitlines() == [
        "wandb: disabled (ConfigError: $WANDB_MODE='sideways' is not one of offline, online, disabled)"
    ]


def test_command_line_override_beats_the_env(tmp_path, monkeypatch):
    from ilf_lab.tracking import wandb_settings

    overrides = ["logger.mode=offline", "+logger.group=cli-group", "++logger.dir=" + str(tmp_path / "cli")]
    monkeypatch.setattr(wandb_settings, "hydra_job", lambda: {"multirun": False, "overrides": overrides})
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_RUN_GROUP", "env-group")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "env"))
    monkeypatch.setenv("WANDB_PROJECT", "env_project")  # not on the command line: the env still wins
    cfg = make_cfg(
        tmp_path / "out", mode="offline", group="cli-group", dir=str(tmp_path / "cli"), project="cfg"
    )
    s = wandb_settings.run_settings(cfg)
    assert (s.mode, s.group, s.dir, s.project) == (
        "offline",
        "cli-group",
        str(tmp_path / "cli"),
        "env_project",
    )


HYDRA_PRECEDENCE_CONFIG = """
name: ilf
paths:
  output_dir: ${hydra:runtime.output_dir}
logger:
  name: wandb
  project: cfg_project
  entity: null
  mode: offline
  group: null
  tags: []
  dir: ${paths.output_dir}
"""

HYDRA_PRECEDENCE_APP = """
import json, sys
import hydra
from ilf_lab.tracking import make_tracker

@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg):
    t = make_tracker(cfg)
    t.log_metrics({"pass@1": 0.75})
    t.finish()
    with open(sys.argv[0] + ".out", "w") as f:
        f.write(json.dumps(t.info))

main()
"""


def test_under_hydra_command_line_beats_env_beats_config(tmp_path):
    """`logger.mode=offline logger.group=cli-group` on the command line win over WANDB_MODE=disabled and
    WANDB_RUN_GROUP; WANDB_DIR and WANDB_PROJECT, not on the command line, win over the config."""
    import json
    import os

    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "config.yaml").write_text(HYDRA_PRECEDENCE_CONFIG)
    app = tmp_path / "app.py"
    app.write_text(textwrap.dedent(HYDRA_PRECEDENCE_APP))
    env = {
        **os.environ,
        "WANDB_MODE": "disabled",
        "WANDB_RUN_GROUP": "env-group",
        "WANDB_DIR": str(tmp_path / "env_dir"),
        "WANDB_PROJECT": "env_project",
    }
    p = subprocess.run(
        [
            sys.executable,
            str(app),
            "logger.mode=offline",
            "logger.group=cli-group",
            f"hydra.run.dir={tmp_path / 'out'}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert "wandb: disabled" not in p.stderr
    info = json.loads((tmp_path / "app.py.out").read_text())
    assert info["mode"] == "offline" and info["group"] == "cli-group"
    assert Path(info["run_dir"]).is_relative_to(tmp_path / "env_dir")
    run = read_offline_run(info["run_dir"])
    assert (
        run["project"] == "env_project" and run["group"] == "cli-group" and run["summary"]["pass@1"] == 0.75
    )
    assert run["config"]["_hydra"]["overrides"] == ["logger.mode=offline", "logger.group=cli-group"]
