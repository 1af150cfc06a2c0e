"""ilf_lab.report / ilf_lab.paper on results.json files written here (contract 2's schema)."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ilf_lab import paper, report
from ilf_lab.errors import IlfError
from ilf_lab.results import SCHEMA_VERSION, Results, ResultsError

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


def make(*args, **kwargs) -> Results:
    """`make_result` read as the report reads a results.json."""
    return Results.from_json(make_result(*args, **kwargs), "make_result")


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
    assert paper.row_for(make(experiment)).experiment == experiment


def test_row_for_ignores_feedback_where_the_row_does():
    for train_on, exp in (
        ("none", "zero_shot"),
        ("mbpp_gold", "mbpp_gold"),
        ("human_refinements", "human_refinements"),
    ):
        r = make(exp, feedback="instructgpt_2shot", train_on=train_on)
        assert paper.row_for(r).experiment == exp
    assert paper.row_for(make("ilf", feedback="instructgpt_2shot")).experiment == "instructgpt_2shot"
    assert paper.row_for(make("ilf", rounds=3)) is None
    assert paper.row_for(make("ilf", feedback="someone_else")) is None


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
    assert report.paired_delta(by["ilf"].runs, [make("zero_shot", per_task={"999": {"n": 1, "c": 0}})]) is None
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
    assert "| 0 (passing LLM-written refinements), base policy |" in p.stdout.split("| 1-shot InstructGPT")[1].splitlines()[0]
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


def _sample_dir(root: Path) -> Path:
    """Results that give every output file: Table 4, Tables 2-3 (a refine block) and Figure 4."""
    refine = {"refiner": "trained", "feedback": "human", "feedback_shuffled": False, "tasks": 4,
              "samples_per_task": 10, "pass@1": 0.3, "pass@10": 0.75, "frac_tasks_with_passing": 0.75}
    write(root, "ilf", make_result("ilf", refine=refine))
    write(root, "zero", make_result("zero_shot"))
    write(root, "fb50", make_result("instructgpt_2shot", overrides=["feedback.num_tasks=50"]))
    return root


def _malformed(change) -> str:
    r = make_result("ilf", refine={"tasks": 4, "samples_per_task": 2, "pass@1": 0.5})
    change(r)
    return json.dumps(r)


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        json.dumps(make_result(pass1=3.5)),
        _malformed(lambda r: r["refine"].update(tasks="four")),  # only Tables 2-3 read it: after table.csv
        _malformed(lambda r: r["refine"].update({"pass@1": 7})),
        _malformed(lambda r: r["per_task"].update({"12": {"n": 1, "c": 2}})),
        _malformed(lambda r: r["benchmarks"].update(humaneval={"pass@1": "x"})),
        _malformed(lambda r: r["stages"][0].update(key=["a"])),
    ],
)
def test_cli_writes_nothing_when_an_input_is_malformed(tmp_path, content):
    root = _sample_dir(tmp_path / "results")
    bad = write(root, "zz_bad", content)  # read last
    before = sorted(tmp_path.rglob("*"))
    for args in ([str(root)], [str(root), "--out", str(tmp_path / "out")]):
        p = run_cli(*args)
        assert p.returncode == 2 and p.stdout == "", p.stderr
        assert p.stderr.startswith("error: ") and p.stderr.strip().count("\n") == 0 and str(bad) in p.stderr
        assert sorted(tmp_path.rglob("*")) == before  # no CSV, PNG or folder
    write(root, "zz_bad", make_result())  # the same inputs, well-formed: every file is written
    assert run_cli(str(root), "--out", str(tmp_path / "out")).returncode == 0
    assert {f.name for f in (tmp_path / "out").iterdir()} == {
        "table.csv", "table.png", "comparisons.csv", "refinements.csv", "refinements.png", "feedback_scaling.png"
    }


def test_old_results_without_schema_version_load(tmp_path):
    """Version 1 (no schema_version): the dict shape the pipeline wrote before `Results` existed."""
    old = make_result("ilf", 0.1, 0.3, config={"eval": {"split": "refine"}, "feedback": {"num_tasks": 50}})
    old["stages"] = [{"name": "tasks", "cached": False, "seconds": 0.1}]  # stage rows before key/status
    assert "schema_version" not in old
    r = Results.load(write(tmp_path, "v1", old))
    assert r.schema_version == 1 and r.path == str(tmp_path / "v1" / "results.json")
    assert (r.metric("pass@1"), r.metric("pass@10"), r.metric("pass@1", "humaneval")) == (0.1, 0.3, None)
    assert r.per_task == {"11": {"n": 10, "c": 1}} and (r.score.n_samples, r.score.num_tasks) == (10, 3)
    assert r.eval_split == "refine" and r.setting("feedback.num_tasks") == 50 and r.setting("no.such") is None
    assert r.stages[0].key is None and r.training["policy"]["losses"] == [3.0, 2.5, 2.0]
    assert r.overrides[0] == "experiment=ilf" and r.counts == {} and r.refine == {}
    # before HumanEval: no `benchmarks`, the headline score only at the top level
    older = {k: v for k, v in make_result("zero_shot", 0.2, None).items() if k not in ("benchmarks", "stages")}
    r = Results.load(write(tmp_path, "v1_older", older))
    assert r.metric("pass@1") == 0.2 and r.metric("pass@10") is None and r.per_task == {"11": {"n": 10, "c": 1}}
    assert r.eval_split == "test" and r.rounds == 1 and r.stages == []
    # the report reads both, and the current version round-trips
    assert [len(row.runs) for row in report.table(report.collect([tmp_path])) if row.runs] == [1, 1]
    r.schema_version = SCHEMA_VERSION
    again = Results.load(write(tmp_path, "v2", json.dumps(r.to_json())))
    assert again.schema_version == SCHEMA_VERSION == 2 and again.to_json() == r.to_json()


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda r: r.update({"pass@1": 3.5}), "pass@1=3.5"),
        (lambda r: r.update(n_samples="ten"), "n_samples='ten'"),
        (lambda r: r.pop("experiment"), "experiment"),
        (lambda r: r.update(model=7), "model=7"),
        (lambda r: r.update(schema_version=99), "schema_version=99"),
        (lambda r: r["benchmarks"].update(humaneval={"pass@10": 2}), "benchmarks.humaneval.pass@10=2"),
        (lambda r: r["per_task"].update({"12": {"n": 1}}), "per_task.12="),
        (lambda r: r["stages"].append({"cached": True}), "stages[1]"),
        (lambda r: r.update(refine={"tasks": "four"}), "refine.tasks='four'"),
        (lambda r: r.update(refine={"tasks": 4, "frac_tasks_with_passing": 1.5}), "refine.frac_tasks_with_passing"),
        (lambda r: r.update(overrides="x=1"), "overrides"),
        (lambda r: r.update(rounds="two"), "rounds='two'"),
    ],
)
def test_malformed_field_names_the_file_and_the_field(tmp_path, change, field):
    r = make_result()
    change(r)
    bad = write(tmp_path, "bad", r)
    with pytest.raises(ResultsError) as e:
        report.collect([tmp_path])
    assert isinstance(e.value, IlfError) and str(e.value).startswith(f"{bad}: ") and field in str(e.value)


def test_errors_are_the_projects_user_errors(tmp_path):
    assert issubclass(report.ReportError, IlfError) and issubclass(ResultsError, IlfError)
    ppl = tmp_path / "ppl.jsonl"
    ppl.write_text('{"source": "refinements", "ppl": 1.5}\n{oops\n')
    with pytest.raises(IlfError) as e:  # a malformed artifact names its file and line, like a results.json
        report.perplexities([make(artifacts={"perplexity": str(ppl)})])
    assert str(ppl) in str(e.value) and "line 2" in str(e.value)


def _cells(line: str) -> list[str]:
    """A markdown table line's cells (an escaped `\\|` stays inside its cell)."""
    return [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]


def test_markdown_escapes_text_from_results(tmp_path):
    evil = "<img src=x onerror=alert(1)>|x\ny"
    refine = {"refiner": "trained", "feedback": evil, "tasks": 4, "samples_per_task": 2, "pass@1": 0.5}
    write(tmp_path, "a", make_result("ilf", model=evil, scale="s|1", overrides=[f"policy.note={evil}"]))
    write(tmp_path, "b", make_result("ilf", model=evil, scale="s|1", refine=refine))
    results = report.collect([tmp_path])
    md = report.to_markdown(report.table(results)) + report.refinements_markdown(report.refinement_rows(results))
    assert "<" not in md and ">" not in md and "&lt;img src=x onerror=alert(1)&gt;\\|x y" in md
    heads = [ln for ln in md.splitlines() if ln.startswith("#")]
    assert len(heads) == 3 and all("model=&lt;img" in h and "scale=s\\|1" in h for h in heads[:2])
    for table_lines in md.split("\n\n"):
        rows = [ln for ln in table_lines.splitlines() if ln.startswith("|")]
        assert len({len(_cells(ln)) for ln in rows}) <= 1, rows  # every row has the header's cells
    other = next(ln for ln in md.splitlines() if "policy.note=" in ln)
    assert _cells(other)[3] == "policy.note=&lt;img src=x onerror=alert(1)&gt;\\|x y"


def test_csv_cells_cannot_be_formulas(tmp_path):
    zero = {str(t): {"n": 10, "c": 5} for t in range(10)}
    refine = {"refiner": "trained", "feedback": "+cmd|' /C calc'!A0", "tasks": 4, "samples_per_task": 2,
              "pass@1": 0.5}
    write(tmp_path, "z", make_result("zero_shot", model="=HYPERLINK(\"http://x\")", per_task=zero))
    write(tmp_path, "i", make_result("ilf", model="=HYPERLINK(\"http://x\")", refine=refine,
                                     per_task={t: {"n": 10, "c": 0} for t in zero}))
    write(tmp_path, "o", make_result("ilf", model="=HYPERLINK(\"http://x\")", overrides=["@SUM(A1)=1"]))
    p = run_cli(str(tmp_path), "--out", str(tmp_path / "out"))
    assert p.returncode == 0, p.stderr
    recs = list(csv.DictReader(open(tmp_path / "out" / "table.csv")))
    assert {r["model"] for r in recs} == {"'=HYPERLINK(\"http://x\")"}
    assert {r["setting"] for r in recs if r["section"] == "other"} == {"'@SUM(A1)=1"}
    ilf = next(r for r in recs if r["experiment"] == "ilf")
    assert float(ilf["delta_pass@1_vs_zero_shot"]) == pytest.approx(-50.0)  # numbers stay numbers
    for rec in recs:
        assert not any(v.startswith(("=", "+", "@")) for v in rec.values())
        assert all(v.startswith("'") or not v.startswith("-") or float(v) < 0 for v in rec.values())
    (ref,) = csv.DictReader(open(tmp_path / "out" / "refinements.csv"))
    assert ref["feedback"] == "'+cmd|' /C calc'!A0" and ref["model"].startswith("'=")


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
    results = [make("ilf", artifacts={"perplexity": str(ppl)}), make("zero_shot", training={})]
    curves = report.training_curves(results)
    assert list(curves) == ["ilf seed=0"] and curves["ilf seed=0"]["policy"] == [3.0, 2.5, 2.0]
    assert set(report.perplexities(results)) == {"mbpp_gold", "refinements"}
    assert report.plot_training(results, tmp_path / "t.png") is not None and (tmp_path / "t.png").is_file()
    assert report.plot_perplexity(results, tmp_path / "p.png") is not None
    assert report.perplexities([make()]) == {} and report.plot_perplexity([make()]) is None
    assert report.feedback_scaling(results) == {} and report.plot_feedback_scaling(results) is None



def test_comparisons_pool_seeds_pair_tasks_and_state_power(tmp_path):
    """Three seeds per row, all sampled in bf16 (a setting the whole table shares: the rows stay Table 4 rows).
    ILF is +10 points over zero-shot on every seed (detected). Gold equals zero-shot on average but its seeds
    disagree (a run-wide shift of -6.7, 0, +6.7 points): its SE must carry that seed variance, which a bootstrap
    over tasks alone would not see, while human (identical to zero-shot everywhere) has no spread at all."""
    zero = {str(t): {"n": 10, "c": 2 if t % 3 == 0 else 0} for t in range(60)}
    ilf = {t: {"n": 10, "c": v["c"] + (4 if int(t) < 15 else 0)} for t, v in zero.items()}
    bf16 = ["sampling.dtype=bfloat16"]
    for seed in range(3):
        shift = (seed - 1) * 2  # -2, 0, +2 solved samples on tasks 0, 3, 6, ...: seeds disagree, mean unchanged
        gold = {t: {"n": 10, "c": v["c"] + (shift if int(t) % 3 == 0 else 0)} for t, v in zero.items()}
        write(tmp_path, f"z{seed}", make_result("zero_shot", seed=seed, per_task=zero, overrides=bf16))
        write(tmp_path, f"i{seed}", make_result("ilf", seed=seed, per_task=ilf, overrides=bf16))
        write(tmp_path, f"g{seed}", make_result("mbpp_gold", seed=seed, per_task=gold, overrides=bf16))
        write(tmp_path, f"h{seed}", make_result("human_refinements", seed=seed, per_task=zero, overrides=bf16))
    rows = report.table(report.collect([tmp_path]))
    assert {r.scale for r in rows} == {"smoke (sampling.dtype=bfloat16)"}
    assert all(len(r.runs) == 3 for r in rows if r.section == "paper" and r.experiment != "instructgpt_1shot"
               and r.experiment != "instructgpt_2shot") and not [r for r in rows if r.section == "other"]
    comps = {c.name: c for c in report.comparisons(rows)}
    assert set(comps) == {"ILF vs Zero-shot", "Fine-tuned on MBPP gold vs Zero-shot",
                          "Fine-tuned on human refinements vs Zero-shot", "ILF vs Fine-tuned on MBPP gold",
                          "ILF vs Fine-tuned on human refinements"}
    up = comps["ILF vs Zero-shot"]
    assert up.delta.mean == pytest.approx(10.0) and up.delta.lo > 0 and up.reading == "higher"
    assert (up.delta.tasks, up.delta.runs, up.delta.reference_runs) == (60, 3, 3) and up.delta.df == 59
    # the one-run paired t over tasks: SE = sd(d)/sqrt(60); d = 40 on 15 tasks, 0 elsewhere
    sd = (sum((x - 10) ** 2 for x in [40] * 15 + [0] * 45) / 59) ** 0.5
    assert up.delta.se == pytest.approx(sd / 60**0.5)
    assert up.delta.mde == pytest.approx((2.000995 + 0.847756) * up.delta.se, rel=1e-4)  # t(.975, 59) + t(.8, 59)
    noisy, same = comps["Fine-tuned on MBPP gold vs Zero-shot"], comps["Fine-tuned on human refinements vs Zero-shot"]
    assert noisy.delta.mean == pytest.approx(0.0) and noisy.delta.lo < 0 < noisy.delta.hi
    # seed means -6.7, 0, +6.7 (var 44.4) -> SE ~ sqrt(44.4 / 3) = 3.85, on 2 df: a wide interval, an honest MDE
    assert noisy.delta.se == pytest.approx((400 / 9 / 3) ** 0.5, rel=0.02) and noisy.delta.df < 3
    assert noisy.reading.startswith("not detected (|Δ| ≥ ") and f"{noisy.delta.mde:.1f}" in noisy.reading
    assert same.delta.se == 0 and same.delta.mde is None and same.reading == "identical on every task"
    assert comps["ILF vs Fine-tuned on MBPP gold"].reading.startswith("not detected")  # gold's seed noise
    assert comps["ILF vs Fine-tuned on human refinements"].reading == "higher"
    md, _, files = report.build([tmp_path])
    assert "### Paired comparisons and power" in md and "| ILF vs Zero-shot |" in md
    lines = files["comparisons.csv"].splitlines()
    assert lines[0].startswith("model,scale,comparison,a,b,delta_pass@1") and len(lines) == 6


def test_a_setting_only_some_runs_share_is_a_deviation(tmp_path):
    write(tmp_path, "z", make_result("zero_shot", overrides=["sampling.dtype=bfloat16"]))
    write(tmp_path, "i", make_result("ilf"))
    rows = report.table(report.collect([tmp_path]))
    assert {r.scale for r in rows} == {"smoke"}
    assert [r.label for r in rows if r.section == "other"] == ["sampling.dtype=bfloat16"]


def test_t_quantiles_and_degenerate_comparisons():
    from ilf_lab.report.stats import t_ppf

    for p, df, ref in [(0.975, 2, 4.302653), (0.975, 10, 2.228139), (0.8, 5, 0.919544), (0.025, 3, -3.182446),
                       (0.975, float("inf"), 1.959964)]:
        assert t_ppf(p, df) == pytest.approx(ref, abs=1e-5)
    one = report.paired([make("ilf", per_task={"11": {"n": 10, "c": 5}})],
                        [make("zero_shot", per_task={"11": {"n": 10, "c": 1}})])
    assert one is not None and one.tasks == 1 and one.mde is None and one.mean == pytest.approx(40.0)
    from ilf_lab.report.compare import Comparison

    assert Comparison("m", "s", "x", "a", "b", one).reading == "too few tasks to tell"


def test_a1_selected_points_stay_on_their_table4_row(tmp_path):
    """ilf_lab.a1 marks its Table 4 runs (hparams_from): their policy.* overrides are the row's A.1 point, shown
    beside the method; unmarked hyper-parameter overrides still move a run off the table."""
    chosen = make_result("ilf", 0.1, 0.2, overrides=["policy.lr=1e-05", "eval.split=test"],
                         config={"hparams_from": "multirun/a1/selection.json"})
    write(tmp_path, "a1", chosen)
    write(tmp_path, "free", make_result("mbpp_gold", 0.1, 0.2, overrides=["policy.lr=1e-05"]))
    rows = report.table(report.collect([tmp_path]))
    ilf = next(r for r in rows if r.section == "paper" and r.experiment == "ilf")
    assert len(ilf.runs) == 1 and ilf.hyper == "policy.lr=1e-05"
    assert "| ILF (policy.lr=1e-05) |" in report.to_markdown(rows)
    gold = next(r for r in rows if r.section == "paper" and r.experiment == "mbpp_gold")
    assert not gold.runs and any(r.label == "policy.lr=1e-05" for r in rows if r.section == "other")


def test_rows_that_ran_the_same_seeds_are_paired_seed_by_seed():
    """ILF and gold at seed s train on the same task IDs, so a seed can move both alike (here -2, 0, +2 solved
    samples on every third task). Paired seed by seed, that shared shift cancels and ILF's +1 on every task is
    seen; rows without the same seeds fall back to adding each row's own seed variance, which hides it."""
    from ilf_lab.report.stats import paired

    def rows(name, seeds, extra):
        out = []
        for seed in seeds:
            shift = (seed % 3 - 1) * 2
            per = {str(t): {"n": 10, "c": 3 + extra + (shift if t % 3 == 0 else 0)} for t in range(60)}
            out.append(make(name, seed=seed, per_task=per))
        return out

    ilf, gold = rows("ilf", [0, 1, 2], 1), rows("mbpp_gold", [2, 0, 1], 0)  # order does not matter, seeds do
    matched = paired(ilf, gold)
    assert matched.seed_matched and matched.mean == pytest.approx(10.0) and matched.se == pytest.approx(0.0)
    apart = paired(ilf, rows("mbpp_gold", [3, 4, 5], 0))
    assert not apart.seed_matched and apart.mean == pytest.approx(10.0) and apart.lo < 0 < apart.hi
    one = paired(ilf, gold[:1])  # gold ran seed 2 only: ILF's seed-2 run alone meets it
    assert one.seed_matched and (one.runs, one.reference_runs, one.left_out) == (1, 1, 2)
    assert one.mean == pytest.approx(10.0) and one.se == pytest.approx(0.0)
    assert not paired(ilf, rows("mbpp_gold", [2, 7], 0)).left_out  # seeds that only partly overlap: all kept


def test_a_row_run_at_one_seed_meets_that_seed_of_the_reference():
    """An LLM row trained on nothing is the base policy: at its seed its samples are the zero-shot run's, so
    against three zero-shot seeds it must read "identical", not the other seeds' evaluation noise."""
    from ilf_lab.report.compare import Comparison, comparison_records
    from ilf_lab.report.stats import paired

    zs = [make("zero_shot", seed=s, per_task={str(t): {"n": 10, "c": (t + s) % 5} for t in range(30)})
          for s in (0, 1, 2)]
    base = [make("instructgpt_2shot", seed=0, per_task=zs[0].per_task)]
    d = paired(base, zs)
    assert (d.mean, d.mde, d.left_out, d.seed_matched) == (0.0, None, 2, True)
    c = Comparison("m", "s", "2-shot vs zero-shot", "instructgpt_2shot", "zero_shot", d)
    assert c.reading == "identical on every task" and comparison_records([c])[0]["runs_left_out"] == 2


def test_seed_pairing_needs_known_seeds_on_both_sides():
    """Older results.json may carry no seed: such a side is not paired by seed (and nothing crashes)."""
    from ilf_lab.report.stats import paired

    per = {str(t): {"n": 10, "c": t % 4} for t in range(20)}
    runs = [make("ilf", seed=s, per_task=per) for s in (0, 1)]
    unknown = [make("zero_shot", seed=None, per_task=per), make("zero_shot", seed=1, per_task=per)]
    assert unknown[0].seed is None
    p = paired(runs, unknown)
    assert p is not None and not p.seed_matched and p.mean == pytest.approx(0.0)
