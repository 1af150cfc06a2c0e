"""The paper's refinement analyses (Tables 2-3) at smoke scale: shuffled feedback, the 1-shot base-model refiner,
`stop_after=refine`, Table 3's zero-shot-programs baseline, sharing πRefine's refine stage with the ILF run, and
the report's refinement table."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ilf_lab.pipeline.stages.feedback import shuffle_feedback
from tests.conftest import REPO
from tests.test_pipeline import SMOKE, results, run_cli


@pytest.mark.parametrize("n", [2, 3, 5, 8])
def test_shuffled_feedback_is_a_seeded_derangement(n):
    rows = [{"task_id": i, "feedback": f"fix task {i}"} for i in range(n)]
    shuffle_feedback(rows, seed=3)
    assert all(
        r["feedback_from"] != r["task_id"] and r["feedback"] == f"fix task {r['feedback_from']}" for r in rows
    )
    assert sorted(r["feedback_from"] for r in rows) == list(range(n))  # every feedback used exactly once
    again = [{"task_id": i, "feedback": f"fix task {i}"} for i in range(n)]
    shuffle_feedback(again, seed=3)
    assert again == rows


def test_one_row_keeps_its_feedback():
    rows = [{"task_id": 1, "feedback": "f"}]
    shuffle_feedback(rows, seed=0)
    assert rows == [{"task_id": 1, "feedback": "f"}]


@pytest.fixture(scope="module")
def analysis(mini_data, tmp_path_factory):
    """The refine_analysis sweep (4 jobs), then an ILF run on the same cache."""
    tmp = tmp_path_factory.mktemp("analysis")
    args = ["-m", "--config-dir", str(REPO / "sweeps"), "--config-name", "refine_analysis", *SMOKE]
    r = run_cli(args, mini_data, tmp / "cache", tmp / "sweep")
    assert r.returncode == 0, r.stderr[-3000:]
    jobs = {
        j["experiment"]: j for j in (json.loads(p.read_text()) for p in (tmp / "sweep").rglob("results.json"))
    }
    r = run_cli(SMOKE, mini_data, tmp / "cache", tmp / "ilf")
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp, jobs, results(tmp / "ilf")


REFINERS = ("refine_trained", "refine_base_1shot", "refine_base_1shot_shuffled")


def test_analysis_runs_stop_after_refine_with_refinement_metrics(analysis):
    _, jobs, _ = analysis
    assert set(jobs) == {*REFINERS, "zero_shot_mbpptrain"}
    for j in (jobs[e] for e in REFINERS):
        assert [s["name"] for s in j["stages"]][-1] == "refine"
        assert j["stopped_after"] == "refine"
        assert j["pass@1"] is None and j["pass@10"] is None  # no policy was evaluated
        b = j["refine"]
        assert b["tasks"] > 0 and b["samples_per_task"] == 2
        assert 0.0 <= b["pass@1"] <= 1.0 and b["pass@10"] is None  # 2 samples per task: pass@10 undefined
        assert 0.0 <= b["frac_tasks_with_passing"] <= 1.0
    stages = {e: {s["name"]: s for s in j["stages"]} for e, j in jobs.items()}
    assert stages["refine_trained"]["train_refiner"]["status"] == "ok"
    for e in ("refine_base_1shot", "refine_base_1shot_shuffled"):
        assert stages[e]["train_refiner"]["status"] == "skipped"
        assert jobs[e]["refine"]["refiner"] == "base" and jobs[e]["refine"]["shots"] == 1
    assert jobs["refine_base_1shot_shuffled"]["refine"]["feedback_shuffled"] is True
    # shuffling changes the feedback stage, so its refinements are sampled anew
    shuffled, related = stages["refine_base_1shot_shuffled"], stages["refine_base_1shot"]
    assert shuffled["feedback"]["key"] != related["feedback"]["key"]
    assert shuffled["refine"]["key"] != related["refine"]["key"]
    # Table 3's baseline: the base model's own programs on the same (annotated MBPPTrain) tasks
    zs = jobs["zero_shot_mbpptrain"]
    assert zs["eval_split"] == "train" and zs["num_tasks"] == jobs["refine_trained"]["refine"]["tasks"]


def test_shuffled_feedback_reaches_the_refiner_only_on_mbpptrain(analysis):
    _, jobs, _ = analysis
    rows = [
        json.loads(x)
        for x in Path(jobs["refine_base_1shot_shuffled"]["artifacts"]["feedback"]).read_text().splitlines()
    ]
    train = [r for r in rows if r["split"] == "train"]
    assert len(train) >= 2 and all(r["feedback_from"] != r["task_id"] for r in train)
    assert all(
        "feedback_from" not in r for r in rows if r["split"] == "refine"
    )  # πRefine's data is untouched


def test_ilf_reuses_the_analysis_refiner_and_refinements(analysis):
    """Table 3's πRefine row is the ILF run's own refine stage: computed once, whichever runs first."""
    _, jobs, ilf = analysis
    by_name = {s["name"]: s for s in ilf["stages"]}
    assert by_name["train_refiner"]["cached"] and by_name["refine"]["cached"]
    assert ilf["refine"] == jobs["refine_trained"]["refine"]
    assert ilf["pass@1"] is not None


def test_report_shows_tables_2_3_and_keeps_analyses_out_of_table_4(analysis):
    tmp, _, _ = analysis
    rep = subprocess.run(
        [sys.executable, "-m", "ilf_lab.report", str(tmp / "sweep")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rep.returncode == 0, rep.stderr
    assert "Tables 2-3" in rep.stdout and "Table 4" not in rep.stdout  # analysis runs are no Table 4 rows
    assert (
        "shuffled (unrelated)" in rep.stdout
        and "πRefine" in rep.stdout
        and "base model, 1-shot" in rep.stdout
        and "the base model's own programs" in rep.stdout
    )
    assert (tmp / "sweep" / "refinements.csv").exists() and (tmp / "sweep" / "refinements.png").exists()
    assert not (tmp / "sweep" / "table.csv").exists()

    both = subprocess.run(
        [
            sys.executable,
            "-m",
            "ilf_lab.report",
            str(tmp / "sweep"),
            str(tmp / "ilf"),
            "--out",
            str(tmp / "both"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert both.returncode == 0, both.stderr
    assert "Table 4" in both.stdout and "Tables 2-3" in both.stdout
    recs = list(csv.DictReader(open(tmp / "both" / "refinements.csv")))
    assert len(recs) == 4  # the ILF run and refine_trained share one refine stage: counted once
    trained = next(r for r in recs if r["refiner"] == "trained")
    assert trained["runs"] == "1" and trained["samples_per_task"] == "2"
