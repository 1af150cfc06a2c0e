"""`python -m ilf_lab` works from a normal (non-editable) install: conf/ ships inside the wheel."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
import zipfile

from tests.conftest import REPO


def test_every_package_is_listed_in_pyproject():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(p.parent.relative_to(REPO).parts)
        for p in (REPO / "ilf_lab").rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    assert found <= listed, f"add to pyproject [tool.setuptools] packages: {sorted(found - listed)}"


def test_wheel_ships_conf_and_runs_outside_the_repo(tmp_path):
    wheel_dir, site = tmp_path / "wheel", tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheel_dir), str(REPO)],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = wheel_dir.glob("ilf_lab-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "ilf_lab/conf/config.yaml" in names and "ilf_lab/conf/experiment/ilf.yaml" in names
    for src in ("decode_attention.cpp", "prefill_attention.cpp", "top_p.cpp", "vec.h", "attend.h"):  # built on use
        assert f"ilf_lab/generation/csrc/{src}" in names
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        check=True, capture_output=True, timeout=300,
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    run = tmp_path / "elsewhere"
    run.mkdir()
    r = subprocess.run(
        [sys.executable, "-c", "import ilf_lab; print(ilf_lab.__file__)"], cwd=run, env=env, capture_output=True,
        text=True, check=True,
    )
    assert r.stdout.startswith(str(site))
    r = subprocess.run(
        [sys.executable, "-m", "ilf_lab", "--cfg", "job", "experiment=mbpp_gold"], cwd=run, env=env,
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "name: mbpp_gold" in r.stdout
