"""ilf_lab.report / ilf_lab.paper on results.json files written here (contract 2's schema)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ilf_lab import paper, report

EXPERIMENTS = {  # experiment -> (feedback, train_on), as conf/experiment/*.yaml set them
    "ilf": ("human", "refinements"),
    "instructgpt_1shot": ("instructgpt_1shot", "refinements"),
    "instructgpt_2shot": ("instructgpt_2shot", "refinements"),
    "mbpp_gold": ("human", "mbpp_gold"),
    "human_refinements": ("human", "human_refinements"),
    "zero_shot": ("human", "none"),
}


def make_result(
    experiment: str = "ilf",
    pass1: float | None = 0.05,
    pass10: float | None = 0.2,
    *,
    seed: int = 0,
    overrides: list[str] | None = None,
    model: str = "tiny_random",
    scale: str = "smoke",
    rounds: int = 1,
    humaneval: tuple[float, float] | None = None,
    **extra,
) -> dict:
    feedback, train_on = EXPERIMENTS.get(experiment, ("human", "refinements"))
    r = {
        "experiment": experiment,
        "feedback": feedback,
        "train_on": train_on,
        "model": model,
        "scale": scale,
        "pass@1": pass1,
        "pass@10": pass10,
        "n_samples": 10,
        "num_tasks": 3,
        "temperature": 0.8,
        "seed": seed,
        "rounds": rounds,
        "per_task": {"11": {"n": 10, "c": 1}},
        "benchmarks": {"mbpp": {"pass@1": pass1, "pass@10": pass10, "num_tasks": 3, "n_samples": 10}},
        "stages": [
            {"name": "tasks", "cached": False, "seconds": 0.1, "key": "ab", "status": "ok", "info": {}}
        ],
        "counts": {},
        "training": {"policy": {"losses": [3.0, 2.5, 2.0], "steps": 3}},
        "artifacts": {},
        "overrides": [f"experiment={experiment}", f"model={model}", f"scale={scale}", "logger=none"]
        + (overrides or []),
        "wall_seconds": 1.0,
    }
    if humaneval:
        r["benchmarks"]["humaneval"] = {"pass@1": humaneval[0], "pass@10": humaneval[1], "num_tasks": 5}
    r.update(extra)
    return r


def write(root: Path, name: str, result: dict | str) -> Path:
    p = root / name / "results.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(result if isinstance(result, str) else json.dumps(result))
    return p


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ilf_lab.report", *args], capture_output=True, text=True, timeout=120
    )


# ---------------------------------------------------------------------------------------------- paper


def test_paper_table4_is_the_papers():
    got = {r.experiment: (r.pass1, r.pass10) for r in paper.TABLE4}
    assert got == {
        "ilf": (36, 68),
        "instructgpt_1shot": (19, 55),
        "instructgpt_2shot": (25, 59),
        "mbpp_gold": (22, 63),
        "human_refinements": (33, 68),
        "zero_shot": (26, 59),
    }


@pytest.mark.parametrize("experiment", list(EXPERIMENTS))
def test_row_for_maps_each_experiment(experiment):
    assert paper.row_for(make_result(experiment)).experiment == experiment


def test_row_for_ignores_feedback_where_the_row_does():
    for train_on, exp in (
        ("none", "zero_shot"),
        ("mbpp_gold", "mbpp_gold"),
        ("human_refinements", "human_refinements"),
    ):
        r = make_result(exp, feedback="instructgpt_2shot", train_on=train_on)
        assert paper.row_for(r).experiment == exp
    assert paper.row_for(make_result("ilf", feedback="instructgpt_2shot")).experiment == "instructgpt_2shot"
    assert paper.row_for(make_result("ilf", rounds=3)) is None
    assert paper.row_for(make_result("ilf", feedback="someone_else")) is None


# ---------------------------------------------------------------------------------------------- table


def test_table_means_seeds_and_shows_missing_rows(tmp_path):
    write(tmp_path, "a", make_result("ilf", 0.10, 0.30, seed=0))
    write(tmp_path, "b", make_result("ilf", 0.20, 0.50, seed=1))
    write(tmp_path, "c", make_result("zero_shot", 0.0, None))
    rows = report.table(report.collect([tmp_path]))
    by = {r.experiment: r for r in rows if r.section == "paper"}
    assert len(by) == 6
    mean, std, n = by["ilf"].stat("pass@1")
    assert (round(mean, 6), round(std, 4), n) == (15.0, 7.0711, 2)
    assert by["ilf"].stat("pass@10")[0] == pytest.approx(40.0)
    assert by["zero_shot"].stat("pass@10") == (None, None, 0)  # null pass@10 (n_samples < k) stays missing
    assert by["mbpp_gold"].runs == []

    md = report.to_markdown(rows)
    assert "model=tiny_random, scale=smoke" in md
    line = {ln.split("|")[1].strip(): ln for ln in md.splitlines() if ln.startswith("| ")}
    assert (
        "15.0 ± 7.1" in line["ILF"]
        and "| 36 | 68 |" in line["ILF"]
        and line["ILF"].rstrip().endswith("| 2 |")
    )
    cells = [c.strip() for c in line["Fine-tuned on MBPP gold"].split("|")[1:-1]]
    assert cells[3:5] == ["—", "—"] and cells[5:7] == ["22", "63"]  # missing, not zero
    zs = [c.strip() for c in line["Zero-shot"].split("|")[1:-1]]
    assert zs[3:5] == ["0.0", "—"]


def test_delta_vs_zero_shot_is_a_paired_bootstrap_over_tasks(tmp_path):
    # 40 shared tasks: ILF solves 4 more of 10 samples on tasks 0-9 and is equal elsewhere -> +10 points on average
    zero = {str(t): {"n": 10, "c": 2 if t % 3 == 0 else 0} for t in range(40)}
    ilf = {t: {"n": 10, "c": v["c"] + (4 if int(t) < 10 else 0)} for t, v in zero.items()}
    write(tmp_path, "z", make_result("zero_shot", 0.05, 0.2, per_task=zero))
    write(tmp_path, "i", make_result("ilf", 0.15, 0.3, per_task=ilf))
    write(tmp_path, "g", make_result("mbpp_gold", 0.05, 0.2, per_task=zero))
    rows = report.table(report.collect([tmp_path]))
    by = {r.experiment: r for r in rows if r.section == "paper"}
    mean, lo, hi = report.paired_delta(by["ilf"].runs, by["zero_shot"].runs)
    assert mean == pytest.approx(10.0) and 0 < lo < 10 < hi < 25
    assert report.paired_delta(by["mbpp_gold"].runs, by["zero_shot"].runs) == (0.0, 0.0, 0.0)
    assert report.paired_delta(by["ilf"].runs, [make_result("zero_shot", per_task={"999": {"n": 1, "c": 0}})]) is None
    line = {ln.split("|")[1].strip(): ln for ln in report.to_markdown(rows).splitlines() if ln.startswith("| ")}
    assert "| +10.0 [+" in line["ILF"] and "| +0.0 [+0.0, +0.0] |" in line["Fine-tuned on MBPP gold"]
    assert "| — |" in line["Zero-shot"]  # no delta against itself
    recs = {r["experiment"]: r for r in report.to_records(rows)}
    assert recs["ilf"]["delta_pass@1_vs_zero_shot"] == pytest.approx(10.0)
    assert recs["zero_shot"]["delta_pass@1_vs_zero_shot"] is None


def test_results_off_the_table_go_to_their_own_section(tmp_path):
    write(tmp_path, "hp1", make_result("ilf", 0.1, 0.2, overrides=["policy.lr=1e-06", "policy.epochs=1"]))
    write(
        tmp_path,
        "hp2",
        make_result("ilf", 0.3, 0.4, overrides=["policy.lr=1e-06", "policy.epochs=1"], seed=1),
    )
    write(tmp_path, "fb50", make_result("instructgpt_2shot", 0.1, 0.2, overrides=["feedback.num_tasks=50"]))
    write(
        tmp_path, "fb100", make_result("instructgpt_2shot", 0.2, 0.3, config={"feedback": {"num_tasks": 100}})
    )
    write(tmp_path, "iter", make_result("ilf", 0.2, 0.3, rounds=2))
    write(tmp_path, "seedonly", make_result("ilf", 0.5, 0.6, overrides=["seed=3", "paths.cache_dir=/x"]))
    rows = report.table(report.collect([tmp_path]))
    paper_rows = {r.experiment: r for r in rows if r.section == "paper"}
    assert len(paper_rows["ilf"].runs) == 1  # only the seed=3 run is the ILF row
    other = {r.label: r for r in rows if r.section == "other"}
    assert set(other) == {
        "policy.epochs=1 policy.lr=1e-06",
        "feedback.num_tasks=50",
        "feedback.num_tasks=100",
        "rounds=2",
    }
    assert len(other["policy.epochs=1 policy.lr=1e-06"].runs) == 2
    md = report.to_markdown(rows)
    assert "Other results" in md and "rounds=2" in md
    assert report.feedback_scaling(report.collect([tmp_path])) == {
        "instructgpt_2shot": [
            (50, pytest.approx(10.0), pytest.approx(20.0), 1),
            (100, pytest.approx(20.0), pytest.approx(30.0), 1),
        ]
    }
    p = run_cli(str(tmp_path), "--out", str(tmp_path / "out"))  # the CLI draws Figure 4 when it has the data
    assert p.returncode == 0 and (tmp_path / "out" / "feedback_scaling.png").is_file(), p.stderr


def test_one_table_per_model_and_scale_and_humaneval_columns(tmp_path):
    write(tmp_path, "a", make_result("ilf", 0.1, 0.2))
    write(
        tmp_path,
        "b",
        make_result("ilf", 0.3, 0.6, model="smollm2_135m_instruct", scale="demo", humaneval=(0.05, 0.1)),
    )
    rows = report.table(report.collect([tmp_path]))
    md = report.to_markdown(rows)
    assert md.count("### Table 4") == 2
    demo = md.split("model=smollm2_135m_instruct, scale=demo")[1]
    assert "HumanEval pass@1" in demo
    ilf = next(ln for ln in demo.splitlines() if ln.startswith("| ILF"))
    assert "| 5.0 | 10.0 |" in ilf
    smoke = md.split("model=tiny_random, scale=smoke")[1].split("### Table 4")[0]
    assert "HumanEval" not in smoke


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_prints_table_and_writes_csv_png(tmp_path):
    root = tmp_path / "multirun"
    for i, exp in enumerate(EXPERIMENTS):
        counts = {"policy_examples": 0 if exp.startswith("instructgpt") else 3}
        write(root, f"{i}_experiment={exp}", make_result(exp, 0.01 * (i + 1), 0.1 * (i + 1), counts=counts))
    p = run_cli(str(root))
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("\n| ") >= 7 and "| ILF | Humans |" in p.stdout
    assert "—" not in p.stdout.split("| ILF")[1].splitlines()[0]
    assert "| 0 (base policy) |" in p.stdout.split("| 1-shot InstructGPT")[1].splitlines()[0]
    with open(root / "table.csv") as f:
        recs = list(csv.DictReader(f))
    assert len(recs) == 6
    ilf = next(r for r in recs if r["experiment"] == "ilf")
    assert float(ilf["pass@1_mean"]) == pytest.approx(1.0) and float(ilf["paper_pass@1"]) == 36
    png = root / "table.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_cli_out_dir_and_several_dirs(tmp_path):
    write(tmp_path / "r1", "x", make_result("ilf"))
    write(tmp_path / "r2", "y", make_result("zero_shot"))
    out = tmp_path / "out"
    p = run_cli(str(tmp_path / "r1"), str(tmp_path / "r2"), "--out", str(out))
    assert p.returncode == 0, p.stderr
    assert (out / "table.csv").is_file() and (out / "table.png").is_file()
    assert not (tmp_path / "r1" / "table.csv").exists()
    recs = list(csv.DictReader(open(out / "table.csv")))
    assert {r["experiment"] for r in recs if r["runs"] != "0"} == {"ilf", "zero_shot"}


def test_cli_no_results_is_one_error_line(tmp_path):
    p = run_cli(str(tmp_path))
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "no results.json" in p.stderr
    assert p.stdout == ""


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "[1, 2]",
        json.dumps({k: v for k, v in make_result().items() if k != "pass@1"}),
        json.dumps(make_result(pass1=3.5)),
        json.dumps(make_result(pass1="high")),
        json.dumps(make_result(n_samples="ten")),
    ],
)
def test_cli_malformed_result_names_the_file(tmp_path, content):
    write(tmp_path, "good", make_result())
    bad = write(tmp_path, "bad", content)
    p = run_cli(str(tmp_path))
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0, p.stderr
    assert str(bad) in p.stderr


def test_missing_dir_is_an_error(tmp_path):
    with pytest.raises(report.ReportError, match="no such"):
        report.collect([tmp_path / "nope"])


def test_figure_data(tmp_path):
    ppl = tmp_path / "ppl.jsonl"
    ppl.write_text(
        "\n".join(
            json.dumps({"source": s, "task_id": i, "ppl": 1.5 + i})
            for s in ("mbpp_gold", "refinements")
            for i in range(5)
        )
    )
    results = [make_result("ilf", artifacts={"perplexity": str(ppl)}), make_result("zero_shot", training={})]
    curves = report.training_curves(results)
    assert list(curves) == ["ilf seed=0"] and curves["ilf seed=0"]["policy"] == [3.0, 2.5, 2.0]
    assert set(report.perplexities(results)) == {"mbpp_gold", "refinements"}
    assert report.plot_training(results, tmp_path / "t.png") is not None and (tmp_path / "t.png").is_file()
    assert report.plot_perplexity(results, tmp_path / "p.png") is not None
    assert report.perplexities([make_result()]) == {} and report.plot_perplexity([make_result()]) is None
    assert report.feedback_scaling(results) == {} and report.plot_feedback_scaling(results) is None
