"""Every notebook runs top to bottom (nbclient, the venv's python3 kernel) on a results folder.

Two inputs: results.json files written here (always), and a real smoke-scale sweep of the pipeline (skipped,
with the reason, while `ilf_lab.pipeline` cannot run yet).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

sys.path.insert(0, str(Path(__file__).parent))
from test_report import EXPERIMENTS, make_result, write  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
# the pipeline or a module it imports is not written yet (other engineers' work in progress)
PIPELINE_MISSING = re.compile(
    r"(ModuleNotFoundError: No module named '?ilf_lab[\w.]*'?|ImportError: cannot import name '?\w+'? from '?ilf_lab[\w.]*)"
)


def execute(path: Path, results: list[Path], out: Path) -> nbformat.NotebookNode:
    """Run a notebook in its own folder with ILF_LAB_RESULTS pointing at `results`."""
    nb = nbformat.read(path, as_version=4)
    env = {"ILF_LAB_RESULTS": os.pathsep.join(map(str, results)), "ILF_LAB_REPORT_OUT": str(out)}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        NotebookClient(
            nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
        ).execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return nb


def outputs_text(nb: nbformat.NotebookNode) -> str:
    parts = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            parts.append(o.get("text", ""))
            parts.extend(str(v) for k, v in o.get("data", {}).items() if k.startswith("text/"))
    return "\n".join(parts)


def image_count(nb: nbformat.NotebookNode) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))


def test_notebooks_exist():
    assert {p.name for p in NOTEBOOKS} >= {"table.ipynb", "figures.ipynb"}
    for p in NOTEBOOKS:  # stored without outputs: small diffs, no stale figures
        nb = nbformat.read(p, as_version=4)
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), p


@pytest.fixture(scope="module")
def synthetic_results(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("results")
    ppl = root / "perplexity.jsonl"
    ppl.write_text(
        "\n".join(
            json.dumps({"source": s, "task_id": 311 + i, "ppl": b + 0.3 * i})
            for s, b in (("mbpp_gold", 3.0), ("refinements", 1.8))
            for i in range(8)
        )
    )
    for i, exp in enumerate(EXPERIMENTS):
        refine = {"refiner": "trained", "feedback": "human", "feedback_shuffled": False, "tasks": 4,
                  "samples_per_task": 10, "pass@1": 0.3, "pass@10": 0.75, "frac_tasks_with_passing": 0.75}
        extra = {"artifacts": {"perplexity": str(ppl)}, "refine": refine} if exp == "ilf" else {}
        write(root, f"{i}_experiment={exp}", make_result(exp, 0.02 * (i + 1), 0.1 * (i + 1), **extra))
    for j, n in enumerate((50, 100, 200)):
        write(
            root,
            f"fb_{n}",
            make_result(
                "instructgpt_2shot", 0.05 * (j + 1), 0.2 * (j + 1), overrides=[f"feedback.num_tasks={n}"]
            ),
        )
    return root


@pytest.mark.parametrize("name", ["table.ipynb", "figures.ipynb"])
def test_notebook_runs_on_results(synthetic_results, tmp_path, name):
    nb = execute(ROOT / "notebooks" / name, [synthetic_results], tmp_path)
    text = outputs_text(nb)
    if name == "table.ipynb":
        assert (
            "| ILF | Humans |" in text
            and (tmp_path / "table.csv").is_file()
            and (tmp_path / "table.png").is_file()
        )
        assert image_count(nb) == 1
    else:
        assert "absent" not in text
        assert image_count(nb) == 4
        assert {p.name for p in tmp_path.glob("*.png")} == {
            "training_curves.png",
            "perplexity.png",
            "feedback_scaling.png",
            "refinements.png",
        }
        assert "| πRefine | human | 4 | 10 | 30.0 | 75.0 | 75.0 | 1 |" in text


def test_figures_notebook_says_what_is_absent(tmp_path):
    write(tmp_path / "res", "z", make_result("zero_shot", training={}))
    nb = execute(ROOT / "notebooks" / "figures.ipynb", [tmp_path / "res"], tmp_path / "out")
    text = outputs_text(nb)
    assert text.count("absent:") == 4 and image_count(nb) == 0


# ---------------------------------------------------------------------------------------------- a real sweep


@pytest.fixture(scope="session")
def smoke_sweep(tmp_path_factory) -> Path:
    """`python -m ilf_lab -m experiment=ilf,zero_shot model=tiny_random scale=smoke logger=none` into a tmp dir."""
    tmp = tmp_path_factory.mktemp("smoke_sweep")
    sweep = tmp / "multirun"
    env = dict(os.environ)
    data = ROOT.parent / "shared" / "data"
    if data.is_dir():
        env.setdefault("ILF_LAB_DATA_DIR", str(data))
    cmd = [
        sys.executable,
        "-m",
        "ilf_lab",
        "-m",
        "experiment=ilf,zero_shot",
        "model=tiny_random",
        "scale=smoke",
        "logger=none",
        f"paths.cache_dir={tmp / 'cache'}",
        f"hydra.sweep.dir={sweep}",
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, cwd=tmp, env=env)
    if p.returncode != 0:
        out = p.stdout + p.stderr
        missing = PIPELINE_MISSING.search(out)
        if missing:
            pytest.skip(f"the pipeline cannot run yet ({missing.group(0)})")
        pytest.fail(f"smoke sweep failed (rc={p.returncode}):\n{out[-4000:]}")
    return sweep


def test_smoke_sweep_reports(smoke_sweep, tmp_path):
    found = sorted(smoke_sweep.rglob("results.json"))
    assert len(found) == 2
    p = subprocess.run(
        [sys.executable, "-m", "ilf_lab.report", str(smoke_sweep), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    line = {ln.split("|")[1].strip(): ln for ln in p.stdout.splitlines() if ln.startswith("| ")}
    for method in ("ILF", "Zero-shot"):  # both runs land on their Table 4 rows, with a number
        cells = [c.strip() for c in line[method].split("|")[1:-1]]
        assert cells[3] != "—" and cells[-1] == "1", line[method]
    assert "model=tiny_random, scale=smoke" in p.stdout


@pytest.mark.parametrize("name", ["table.ipynb", "figures.ipynb"])
def test_notebook_runs_on_smoke_sweep(smoke_sweep, tmp_path, name):
    nb = execute(ROOT / "notebooks" / name, [smoke_sweep], tmp_path)
    assert image_count(nb) >= (1 if name == "table.ipynb" else 0)
    if name == "figures.ipynb":  # the ILF run sampled refinements: Tables 2-3 have a πRefine row
        assert (tmp_path / "refinements.png").is_file() and "πRefine" in outputs_text(nb)


@pytest.mark.parametrize("name", ["table.ipynb", "figures.ipynb"])
def test_notebooks_open_on_a_fresh_clone(name, tmp_path):
    """No local runs (ILF_LAB_RESULTS points nowhere): the notebooks show the published runs committed under
    results/, say so, and the table notebook shows the README's CPU-scale table marked as earlier runs."""
    published = sorted((ROOT / "results").rglob("results.json"))
    assert published, "results/ must hold the published runs' results.json"
    nb = execute(ROOT / "notebooks" / name, [tmp_path / "no_runs_here"], tmp_path / "out")
    text = outputs_text(nb)
    assert f"showing the {len(published)} published runs committed under ../results" in text
    if name == "table.ipynb":
        assert "| ILF | Humans |" in text and "Earlier runs (protocol before docs/protocol.md)" in text
        assert "| Fine-tuned on MBPP gold |" in text.split("Earlier runs")[1]
        assert image_count(nb) == 1
    assert not list((ROOT / "results").rglob("table.png.tmp*"))
