"""Logs a person can read (ilf_lab/logs.py) and every command's --help."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from ilf_lab.logs import LogProgress
from tests.conftest import SMOKE


def test_log_progress_is_rate_limited(caplog, monkeypatch):
    monkeypatch.setenv("ILF_LAB_PROGRESS_SECONDS", "3600")
    with caplog.at_level(logging.INFO, logger="ilf_lab.progress"):
        bar = LogProgress(100, "sampling", "sample")
        for _ in range(100):
            bar.update(1)
        bar.set_postfix_str("250 tok/s")
        bar.close()
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [lines[-1]] and lines[0].startswith("sampling: 100/100 sample (100 %)") and "250 tok/s" in lines[0]


def test_log_progress_says_done_once(caplog, monkeypatch):
    """The last update and close() used to log two 100 % lines ("about 0.0 min left", then "done")."""
    monkeypatch.setenv("ILF_LAB_PROGRESS_SECONDS", "1")
    with caplog.at_level(logging.INFO, logger="ilf_lab.progress"):
        bar = LogProgress(2, "executing", "prog")
        bar.update(1)
        bar.last -= 2  # the rate limit has passed: the next update may log
        bar.update(1)
        bar.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "2/2 prog (100 %)" in lines[0] and "done in" in lines[0]


def test_a_run_logged_to_a_file_is_quiet_and_shows_progress(mini_data, tmp_path):
    """Not a TTY (a log file): one line per stage start and end, progress lines for sampling and training, and
    none of Lightning's tips, GPU banners or dependencies' deprecation warnings."""
    env = {**os.environ, "ILF_LAB_DATA_DIR": str(mini_data), "ILF_LAB_PROGRESS_SECONDS": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "ilf_lab", *SMOKE, "experiment=mbpp_gold_all_tasks", "trainer.enable_progress_bar=true",
         "policy.epochs=3", f"paths.cache_dir={tmp_path / 'c'}", f"hydra.run.dir={tmp_path / 'o'}"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    for noise in ("Tip:", "GPU available", "deprecated", "Loading weights", "Writing model shards", "\r"):
        assert noise not in out, noise
    for stage in ("tasks", "train_policy", "evaluate"):
        assert f"stage {stage:<14} start" in out and f"stage {stage:<14} ok" in out
    assert "sampling: 30/30 sample (100 %)" in out and "training policy: " in out
    log_file = (tmp_path / "o" / "__main__.log").read_text()  # Hydra's job log has the same lines
    assert "sampling: 30/30" in log_file and "stage evaluate" in log_file


def test_execution_progress_in_a_log_file_is_lines(caplog, monkeypatch):
    """The sandbox's progress (shown above 50 programs in a run) is log lines when stderr is not a terminal: a
    tqdm bar written to a log file is one long line of carriage returns (seen in a default run's log)."""
    from ilf_lab.execution.sandbox import run_programs

    monkeypatch.setenv("ILF_LAB_PROGRESS_SECONDS", "1")
    items = [{"program": "x = 1", "tests": ["assert x == 1"]}] * 3
    with caplog.at_level(logging.INFO, logger="ilf_lab.progress"):
        verdicts = run_programs(items, timeout=10, progress=True)
    assert all(v.passed for v in verdicts)
    assert "executing: 3/3 prog (100 %)" in caplog.text


@pytest.mark.parametrize(
    "module,expect",
    [
        ("ilf_lab", ["== Config groups", "experiment:", "train_on:", "Examples:"]),
        ("ilf_lab.report", ["--out", "examples:"]),
        ("ilf_lab.annotate", ["export", "serve", "import", "example:"]),
        ("ilf_lab.a1", ["--grid", "example:"]),
        ("ilf_lab.execution", ["--input", "--timeout"]),
    ],
)
def test_every_command_has_help(module, expect):
    r = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for text in expect:
        assert text in r.stdout, (module, text)
