"""The paper's protocol (docs/protocol.md), each point checked against what the pipeline does.

Annotations as released (§3, §3.1), baselines on ILF's task IDs (§3.2), A.1 selection per method on MBPPRefine,
LLM feedback sampled as §3.3 says, the chat prompt naming the entry point, the reference's truncation, the paper's
top-p, and Tables 2-3's baselines.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ilf_lab.pipeline.runner import Runner
from ilf_lab.pipeline.stage import Artifact
from tests.conftest import SMOKE, compose, dag_config, run_dag


def _run(tmp: Path, data: Path, extra: list[str], base: list[str] = SMOKE) -> Runner:
    return run_dag(dag_config(data, tmp, extra, base))


# ---------------------------------------------------------------------------------- annotations (§3, §3.1)


def test_released_annotations_give_44_refine_and_128_train_tasks(real_data, tmp_path):
    run = _run(tmp_path, real_data, ["stop_after=tasks"], base=["model=tiny_random", "scale=smoke", "logger=none"])
    meta = run.done["tasks"].meta
    assert meta["split_sizes"]["refine_annotated"] == 44 and meta["split_sizes"]["train_annotated"] == 128
    assert meta["annotation_counts"]["one_per_task"] == 195 and "edit_distance" not in meta["annotation_counts"]


# ------------------------------------------------------------------------------ matched baselines (§3.2)


def _refine_artifact(tmp: Path, rows: list[dict]) -> Artifact:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "refinements.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return Artifact("refine", "k", tmp)


def test_baselines_train_on_the_task_ids_ilf_kept(tmp_path):
    from ilf_lab.data.mbpp import Annotation
    from ilf_lab.data.prompts import Task
    from ilf_lab.pipeline.stages.tasks import TaskSet
    from ilf_lab.pipeline.stages.train import HumanRefinements, MBPPGold, MBPPGoldAllTasks, Refinements

    tasks = {i: Task(i, f"t{i}", f"def f{i}(): return {i}", (f"assert f{i}() == {i}",)) for i in (9, 10, 11, 12)}
    anns = {i: Annotation(i, "x0", "fb", f"human x1 {i}", True, 0.1) for i in tasks}
    ts = TaskSet(tasks, {}, anns)
    refine = _refine_artifact(tmp_path, [
        {"task_id": 9, "program": "p9a", "passed": False, "kept": False},
        {"task_id": 9, "program": "p9b", "passed": True, "kept": True},
        {"task_id": 11, "program": "p11", "passed": True, "kept": True},
        {"task_id": 12, "program": "p12", "passed": False, "kept": False},
    ])
    ilf_ids = [i for i, _ in Refinements().pairs({"refine": refine}, ts)]
    assert ilf_ids == [9, 11]
    assert MBPPGold().pairs({"refine": refine}, ts) == [(9, tasks[9].code), (11, tasks[11].code)]
    assert HumanRefinements().pairs({"refine": refine}, ts) == [(9, "human x1 9"), (11, "human x1 11")]
    assert MBPPGold.inputs == HumanRefinements.inputs == ("refine",)
    assert MBPPGoldAllTasks.inputs == ("feedback",)  # the old variant, under its own name


def test_gold_row_uses_ilfs_own_refine_stage(mini_data, tmp_path):
    """In one cache, the gold row's fine-tuning data comes from the very refine artifact ILF trains on."""
    ilf_run = _run(tmp_path, mini_data, [])
    gold = _run(tmp_path, mini_data, ["experiment=mbpp_gold"])
    _, ups = gold.graph["train_policy"]
    assert ups["refine"] == "refine" and gold.done["refine"].key == ilf_run.done["refine"].key
    assert gold.done["refine"].cached  # shared, not recomputed
    kept = [json.loads(x)["task_id"] for x in gold.done["refine"].file("refinements.jsonl").read_text().splitlines()
            if json.loads(x)["kept"]]
    assert gold.done["train_policy"].meta["examples"] == len(kept)


# ------------------------------------------------------------------------------------------ A.1 selection


def _result(experiment: str, lr: str, p1: float, split: str = "refine"):
    from ilf_lab.results import Results, Score

    return Results(experiment=experiment, feedback="human", train_on="x", model="m", eval_split=split,
                   benchmarks={"mbpp": Score(pass_at={1: p1})},
                   config={"policy": {"lr": lr}, "eval": {"split": split}}, path=f"{experiment}-{lr}")


def test_a1_chooses_per_method_on_mbpprefine_and_ilf_inherits_gold():
    from ilf_lab.a1 import TUNED, choose

    grid = {"policy.lr": ["1e-5", "5e-5"]}
    results = [_result(m, lr, p) for m in TUNED for lr, p in (("1e-5", 0.1), ("5e-5", 0.2 if m == "mbpp_gold" else 0.05))]
    chosen = choose(results, grid)
    assert chosen["mbpp_gold"]["point"] == {"policy.lr": "5e-5"}
    assert chosen["human_refinements"]["point"] == {"policy.lr": "1e-5"}
    assert chosen["ilf"] == {"point": {"policy.lr": "5e-5"}, "inherited_from": "mbpp_gold"}
    assert "zero_shot" not in chosen


def test_a1_never_reads_mbpptest():
    from ilf_lab.a1 import TUNED, choose
    from ilf_lab.errors import IlfError

    results = [_result(m, "1e-5", 0.1) for m in TUNED] + [_result("mbpp_gold", "5e-5", 0.9, split="test")]
    with pytest.raises(IlfError, match="MBPPRefine only"):
        choose(results, {"policy.lr": ["1e-5", "5e-5"]})


@pytest.mark.slow
def test_a1_command_selects_then_runs_table4(real_data, tmp_path):
    """On the real splits (the paper's, no split overrides, so the table runs are Table 4 rows) at smoke sizes."""
    env = {**os.environ, "ILF_LAB_DATA_DIR": str(real_data), "ILF_LAB_CACHE_DIR": str(tmp_path / "cache")}
    out = tmp_path / "a1"
    r = subprocess.run([sys.executable, "-m", "ilf_lab.a1", "--out", str(out), "--grid", "policy.lr=1e-3,2e-3",
                        "model=tiny_random", "scale=smoke", "logger=none"], env=env, capture_output=True, text=True,
                       timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    sel = json.loads((out / "selection.json").read_text())
    assert set(sel["chosen"]) == {"mbpp_gold", "human_refinements", "instructgpt_1shot", "instructgpt_2shot", "ilf"}
    assert sel["chosen"]["ilf"]["point"] == sel["chosen"]["mbpp_gold"]["point"]
    for p in (out / "select").rglob("results.json"):
        assert json.loads(p.read_text())["eval_split"] == "refine"
    for method in ("ilf", "mbpp_gold", "zero_shot"):
        res = json.loads((out / "table" / method / "results.json").read_text())
        assert res["eval_split"] == "test"
        for k, v in sel["chosen"].get(method, {}).get("point", {}).items():
            assert f"{k}={v}" in res["overrides"]
    from ilf_lab import report

    rows = {r.experiment: r for r in report.table(report.collect([out / "table"])) if r.section == "paper"}
    assert all(len(rows[m].runs) == 1 for m in ("ilf", "mbpp_gold", "zero_shot"))  # on their Table 4 rows
    assert rows["ilf"].hyper == rows["mbpp_gold"].hyper != ""  # showing the (shared) A.1 point
    assert "| ILF (policy.lr=" in r.stdout


# ------------------------------------------------------------------------- LLM rows, prompts, sampling


def test_llm_feedback_samples_n_replies_and_keeps_one_passing_per_task(mini_data, tmp_path):
    run = _run(tmp_path, mini_data, ["experiment=instructgpt_1shot", "feedback.n=3", "stop_after=refine"])
    rows = [json.loads(x) for x in run.done["feedback"].file("feedback.jsonl").read_text().splitlines()]
    per_task: dict[int, int] = {}
    for r in rows:
        per_task[r["task_id"]] = per_task.get(r["task_id"], 0) + 1
    assert per_task and set(per_task.values()) == {3}
    assert sorted({r["sample_idx"] for r in rows}) == [0, 1, 2]
    kept = [json.loads(x) for x in run.done["refine"].file("refinements.jsonl").read_text().splitlines()]
    assert len({r["task_id"] for r in kept if r["kept"]}) == sum(r["kept"] for r in kept)


def test_instructgpt_rows_use_section_33_sampling():
    cfg = compose(["experiment=instructgpt_2shot"])
    assert (cfg.feedback.n, cfg.feedback.temperature, cfg.feedback.shots) == (4, 0.8, 2)  # demo: n=4 of 30
    paper = compose(["experiment=instructgpt_1shot", "scale=paper"])
    assert (paper.feedback.n, paper.feedback.temperature, paper.feedback.max_new_tokens) == (30, 0.8, 1024)


def test_paper_scale_samples_without_top_p():
    cfg = compose(["scale=paper"])
    assert cfg.sampling.top_p == cfg.refine.top_p == cfg.x0.top_p == 1.0
    assert (cfg.sampling.n, cfg.sampling.temperature, cfg.refine.n, cfg.x0.n) == (30, 0.8, 30, 30)


def test_chat_prompt_asks_for_the_entry_points_signature(real_data):
    from omegaconf import OmegaConf

    from ilf_lab.data.mbpp import load_mbpp
    from ilf_lab.data.prompts import chat_messages, refine_prompt, signature

    tasks = load_mbpp(OmegaConf.create({"dir": str(real_data)}))
    text = chat_messages(tasks[11])[0]["content"]
    assert "The function must be defined as:\ndef remove_Occ(s,ch):\n" in text
    # tests that wrap the call (`assert (Diff(...))`, `assert int(lobb_num(...))`) still get the right def
    assert signature(tasks[769]) == "def Diff(li1,li2):" and signature(tasks[912]) == "def lobb_num(n, m):"
    assert all(signature(t).startswith("def ") and "(...)" not in signature(t) for t in tasks.values())

    class Tok:
        def apply_chat_template(self, messages, **_):
            return "\n".join(m["content"] for m in messages)

    assert "def remove_Occ(s,ch):" in refine_prompt(tasks[11], "x0", "fb", "chat", Tok())


def test_docstring_completion_is_cut_like_the_reference():
    """eval_mbpp.py::truncate_code: the body ends at the first unindented line starting with a letter, # or "."""
    from ilf_lab.data.prompts import truncate_completion

    body = "    return a + b\nresult = add(1, 2)\nprint(result)\n"
    assert truncate_completion(body, "docstring") == "    return a + b\n"
    assert truncate_completion("    x = 1\n\n    return x\n#done", "docstring") == "    x = 1\n\n    return x\n"
    assert truncate_completion("    return [\n1]\n", "docstring") == "    return [\n1]\n"  # a digit is no cut


def test_table2_refine_prompt_is_one_shot(mini_data, tmp_path):
    from ilf_lab.data.prompts import Task, refine_prompt

    t = Task(1, "Add.", "def add(a, b):\n    return a + b", ("assert add(1, 2) == 3",))
    shot = (t, "def add(a, b):\n    return a - b", "Use + not -.", "def add(a, b):\n    return a + b")
    one = refine_prompt(t, "def add(a, b): pass", "Return the sum.", "docstring", shots=[shot])
    assert one.count("OLD CODE:") == 2 and one.index("Use + not -.") < one.index("Return the sum.")
    zero = _run(tmp_path / "0", mini_data, ["experiment=refine_zero_shot"])
    onesh = _run(tmp_path / "1", mini_data, ["experiment=refine_base_1shot"])
    assert onesh.done["refine"].key != zero.done["refine"].key
    assert "train_refiner" not in onesh.done  # the base model refines


def test_table3_baseline_evaluates_the_annotated_mbpptrain_tasks(mini_data, tmp_path):
    run = _run(tmp_path, mini_data, ["experiment=zero_shot_mbpptrain"])
    ev = run.done["evaluate"].meta
    train = json.loads(run.done["tasks"].file("splits.jsonl").read_text().splitlines()[-1])
    assert train["split"] == "train_annotated"
    assert sorted(int(t) for t in ev["per_task"]) == sorted(train["task_ids"][: run.cfg.data.max_train_tasks])


def test_report_labels_llm_rows_written_by_the_policy_itself():
    from ilf_lab import report
    from ilf_lab.results import Results, Score

    def run(backend: str, model: str | None):
        return Results(experiment="instructgpt_1shot", feedback="instructgpt_1shot", train_on="refinements",
                       model="smollm2_135m_instruct", scale="demo", benchmarks={"mbpp": Score({1: 0.1, 10: 0.2})},
                       counts={"policy_examples": 3},
                       config={"feedback": {"provider": "llm", "backend": backend, "model": model}})

    own = report.to_markdown(report.table([run("hf", None)]))
    line = next(x for x in own.splitlines() if x.startswith("| 1-shot InstructGPT"))
    assert "the policy model itself (smollm2_135m_instruct), not InstructGPT" in line
    assert "passing LLM-written refinements" in line
    other = report.to_markdown(report.table([run("openai", "gpt-4o-mini")]))
    assert "not InstructGPT" not in other


def test_a1_ties_go_to_the_first_grid_point_and_incomplete_grids_fail():
    from ilf_lab.a1 import TUNED, choose
    from ilf_lab.errors import IlfError

    grid = {"policy.lr": ["5e-5", "1e-5"]}
    tied = [_result(m, lr, 0.1) for m in TUNED for lr in ("1e-5", "5e-5")]
    assert choose(tied, grid)["mbpp_gold"]["point"] == {"policy.lr": "5e-5"}  # the grid's first, not the path's
    with pytest.raises(IlfError, match="no MBPPRefine pass@1 for grid point"):
        choose(tied[1:], grid)
    with pytest.raises(IlfError, match="second result"):
        choose([*tied, _result("mbpp_gold", "1e-5", 0.3)], grid)
    with pytest.raises(IlfError, match="not a point of the grid"):
        choose([*tied, _result("mbpp_gold", "2e-5", 0.3)], grid)



def test_a1_methods_and_seeds_are_checked_and_ilf_inherits_only_a_swept_gold():
    from ilf_lab.a1 import choose, parse_methods, parse_seeds
    from ilf_lab.errors import ConfigError

    assert parse_methods("mbpp_gold,human_refinements") == ["mbpp_gold", "human_refinements"]
    assert parse_seeds("0,1,2") == [0, 1, 2] and parse_seeds(None) == [None]
    for bad in ("ilf", "zero_shot", "", "mbpp_gold,nope"):
        with pytest.raises(ConfigError, match="--methods"):
            parse_methods(bad)
    for bad in ("0,x", "", "1,1", "0.5"):
        with pytest.raises(ConfigError, match="--seeds"):
            parse_seeds(bad)
    grid = {"policy.lr": ["1e-5", "5e-5"]}
    human = [_result("human_refinements", lr, p) for lr, p in (("1e-5", 0.1), ("5e-5", 0.3))]
    only_human = choose(human, grid, ["human_refinements"])
    assert set(only_human) == {"human_refinements"}  # no gold swept: ILF has no point to inherit
    assert only_human["human_refinements"]["point"] == {"policy.lr": "5e-5"}
    gold = [_result("mbpp_gold", lr, 0.2) for lr in ("1e-5", "5e-5")]
    assert choose([*gold, *human], grid, ["mbpp_gold"])["ilf"]["inherited_from"] == "mbpp_gold"


def test_a1_resume_keeps_the_selection_and_finished_table_runs(tmp_path, capsys):
    """A resumed command reruns nothing that finished (no subprocess here: one would fail without data). It
    refuses to mix in what another command made: another grid or overrides, a run dir started with other
    arguments, a results.json in another seed layout; a non-empty --out needs --resume."""
    from ilf_lab import a1
    from ilf_lab.results import Results, Score

    out = tmp_path / "a1"
    grid, overrides = {"policy.lr": ["1e-5"]}, ["scale=smoke"]
    chosen = {"mbpp_gold": {"point": {"policy.lr": "1e-5"}}, "ilf": {"point": {"policy.lr": "1e-5"}}}
    out.mkdir()
    (out / "selection.json").write_text(json.dumps({"grid": grid, "methods": ["mbpp_gold"], "overrides": overrides,
                                                    "select_overrides": [], "chosen": chosen}))
    runs = a1._table_runs(out, chosen, ["mbpp_gold"], [0, 1], overrides)
    assert len(runs) == 6 and all("policy.lr=1e-5" in v for d, v in runs.items() if "zero_shot" not in str(d))
    for run_dir, args in runs.items():
        Results(experiment=args[0].split("=")[1], feedback="human", train_on="x", model="m", seed=0,
                eval_split="test", benchmarks={"mbpp": Score(pass_at={1: 0.1, 10: 0.2})},
                config={"hparams_from": str(out / "selection.json")}).write(run_dir / "results.json")
        (run_dir / "a1_args.json").write_text(json.dumps(args))
    cmd = ["--out", str(out), "--grid", "policy.lr=1e-5", "--methods", "mbpp_gold", "--seeds", "0,1"]
    assert a1.main([*cmd, "--resume", *overrides]) == 0
    printed = capsys.readouterr().out
    assert printed.count("kept ") == 7 and "+ " not in printed and "| ILF" in printed

    def fails(argv: list[str], message: str) -> None:
        assert a1.main(argv) != 0
        assert message in capsys.readouterr().err

    fails([*cmd, *overrides], "--resume")
    fails([*cmd, "--resume", "scale=demo"], "other overrides")
    fails(["--out", str(out), "--grid", "policy.lr=2e-5", "--methods", "mbpp_gold", "--resume", *overrides],
          "other grid")
    for bad in ("seed=3", "+experiment@_global_=zero_shot", "hydra.run.dir=x", "hparams_from=y"):
        fails([*cmd, "--resume", *overrides, bad], "is set by this command")
    fails([*cmd, "--resume", "--select", "seed=1", *overrides], "--select 'seed=1'")
    fails([*cmd[:-2], "--resume", *overrides], "would not make")  # the seeds' runs, seen from an unseeded layout
    (out / "table" / "ilf" / "seed1" / "a1_args.json").write_text(json.dumps(["experiment=ilf"]))
    fails([*cmd, "--resume", *overrides], "made with other arguments")
    from ilf_lab.errors import ConfigError

    with pytest.raises(ConfigError, match="--methods"):
        a1.parse_methods("mbpp_gold,mbpp_gold")

def test_report_warns_when_a_baseline_is_not_on_ilfs_task_ids():
    from ilf_lab import report
    from ilf_lab.results import Results, Score, StageRecord

    def run(exp: str, train_on: str, refine_key: str):
        return Results(experiment=exp, feedback="human", train_on=train_on, model="m", scale="demo",
                       benchmarks={"mbpp": Score({1: 0.1, 10: 0.2})},
                       stages=[StageRecord("refine", key=refine_key)])

    same = report.to_markdown(report.table([run("ilf", "refinements", "r1"), run("mbpp_gold", "mbpp_gold", "r1")]))
    assert "not matched" not in same
    other = report.to_markdown(report.table([run("ilf", "refinements", "r1"), run("mbpp_gold", "mbpp_gold", "r2")]))
    assert "Warning: the Fine-tuned on MBPP gold row was trained on the task IDs of refine stage(s) r2" in other


def test_llm_refinement_stats_count_tasks_and_unparseable_replies(tmp_path):
    """n replies per task: a reply without a refinement is a failed sample of its task, not a missing one."""
    from omegaconf import OmegaConf

    from ilf_lab.pipeline.experiment import refine_stats

    art = _refine_artifact(tmp_path, [
        {"task_id": 9, "program": "p", "passed": True, "kept": True},   # 1 of 3 replies had a refinement
        {"task_id": 10, "program": "p", "passed": False, "kept": False},
        {"task_id": 10, "program": "q", "passed": True, "kept": True},
    ])
    art = Artifact("refine", "k", art.path, {"tasks": 3})  # a third task: no parseable refinement at all
    cfg = OmegaConf.create({"feedback": {"provider": "llm", "n": 3, "name": "instructgpt_1shot", "shuffle": False,
                                         "shots": 1}, "refine": {"n": 4, "refiner": "trained", "shots": 0},
                            "eval": {"ks": [1, 2]}})
    b = refine_stats(cfg, art)
    assert b["tasks"] == 3 and b["samples_per_task"] == 3 and b["tasks_with_passing"] == 2
    assert b["pass@1"] == pytest.approx((1 / 3 + 1 / 3 + 0) / 3)
    assert b["pass@2"] == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)


def test_stop_after_x0_writes_results(mini_data, tmp_path):
    from tests.test_pipeline import results, run_cli

    r = run_cli([*SMOKE, "stop_after=x0"], mini_data, tmp_path / "c", tmp_path / "o")
    assert r.returncode == 0, r.stderr[-2000:]
    res = results(tmp_path / "o")
    assert res["stopped_after"] == "x0" and res["counts"]["x0"] > 0 and "feedback" not in res["counts"]


def test_training_key_covers_the_resolved_world_size(mini_data, tmp_path):
    from ilf_lab.pipeline.stage import select, stage_key
    from ilf_lab.pipeline.stages.train import MBPPGoldAllTasks, TrainPolicy, TrainPolicyConfig

    stage = TrainPolicy(MBPPGoldAllTasks())
    explicit = select(TrainPolicyConfig, compose([*SMOKE, "trainer.devices=1"]))
    auto = select(TrainPolicyConfig, compose([*SMOKE, "trainer.devices=auto", "trainer.accelerator=auto"]))
    assert stage.resolved(explicit) == {}  # explicit settings are in the slice already
    assert stage.resolved(auto) == {"world": 1, "accelerator": "cpu"}  # what auto means on this machine
    assert stage_key(stage, explicit, {}) != stage_key(stage, auto, {})
