"""The ILF pipeline end to end at smoke scale (tiny_random on a small MBPP-format dataset): results.json,
the stage cache (reruns recompute nothing), resume after SIGKILL, sweeps sharing stages, empty stages."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SMOKE = [
    "model=tiny_random", "scale=smoke", "logger=none",
    "data.splits.prompt=[0,0]", "data.splits.test=[1,4]", "data.splits.refine=[5,8]", "data.splits.train=[9,12]",
]


def run_cli(args: list[str], data: Path, cache: Path, out: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "ILF_LAB_DATA_DIR": str(data), "PYTHONHASHSEED": "0"}
    multirun = "-m" in args
    dir_key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    cmd = [sys.executable, "-m", "ilf_lab", *args, f"paths.cache_dir={cache}", f"{dir_key}={out}"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


NUMBERS = ("pass@1", "pass@10", "n_samples", "num_tasks", "per_task")


def kill_when(args: list[str], data: Path, cache: Path, out: Path, pattern: str) -> None:
    """Start a run and SIGKILL its process group as soon as `cache/stages/<pattern>` exists."""
    env = {**os.environ, "ILF_LAB_DATA_DIR": str(data), "PYTHONHASHSEED": "0"}
    cmd = [sys.executable, "-m", "ilf_lab", *args, f"paths.cache_dir={cache}", f"hydra.run.dir={out}"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not list((cache / "stages").glob(pattern)):
        time.sleep(0.01)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # it finished first: the caller's checks on the cache say what happened
        pass
    proc.wait()


@pytest.fixture(scope="module")
def first_run(mini_data, tmp_path_factory):
    cache, out = tmp_path_factory.mktemp("cache"), tmp_path_factory.mktemp("run1")
    r = run_cli(SMOKE, mini_data, cache, out)
    assert r.returncode == 0, r.stderr[-3000:]
    return cache, out, results(out)


def test_results_json_contract(first_run):
    _, out, res = first_run
    for key in ("experiment", "feedback", "train_on", "model", "pass@1", "pass@10", "n_samples", "num_tasks", "stages"):
        assert key in res
    assert (res["experiment"], res["feedback"], res["train_on"], res["model"]) == ("ilf", "human", "refinements", "tiny_random")
    assert res["n_samples"] == 10 and res["num_tasks"] == 3
    assert 0.0 <= res["pass@1"] <= res["pass@10"] <= 1.0
    names = [s["name"] for s in res["stages"]]
    assert names == ["tasks", "x0", "feedback", "train_refiner", "refine", "train_policy", "evaluate"]
    for s in res["stages"]:
        assert isinstance(s["cached"], bool) and s["seconds"] >= 0
    assert not any(s["cached"] for s in res["stages"] if s["key"])
    for name in ("eval_samples", "feedback", "refinements"):
        assert Path(res["artifacts"][name]).parent == out
    rows = [json.loads(x) for x in (out / "eval_samples.jsonl").read_text().splitlines()]
    assert len(rows) == 30 and all("passed" in r and "result" in r for r in rows)


def test_rerun_recomputes_nothing_and_reproduces(first_run, mini_data, tmp_path):
    cache, _, res = first_run
    r = run_cli(SMOKE, mini_data, cache, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    again = results(tmp_path)
    assert all(s["cached"] for s in again["stages"] if s["key"])
    assert {k: again[k] for k in NUMBERS} == {k: res[k] for k in NUMBERS}


def test_fresh_cache_gives_the_same_numbers(first_run, mini_data, tmp_path):
    """Reproducibility: the same config on CPU gives the same numbers from scratch."""
    _, _, res = first_run
    r = run_cli(SMOKE, mini_data, tmp_path / "cache", tmp_path / "out")
    assert r.returncode == 0, r.stderr[-3000:]
    assert {k: results(tmp_path / "out")[k] for k in NUMBERS} == {k: res[k] for k in NUMBERS}


def test_sigkill_mid_stage_resumes_with_same_numbers(first_run, mini_data, tmp_path):
    _, _, res = first_run
    cache = tmp_path / "cache"
    # kill once the refiner has been published and a later stage is under way
    kill_when(SMOKE, mini_data, cache, tmp_path / "a", "train_refiner/[0-9a-f]*")
    assert not (tmp_path / "a" / "results.json").exists()
    for stage_dir in (cache / "stages").glob("*"):
        for d in stage_dir.iterdir():
            if d.name.startswith((".lock-", ".scratch-")):  # per-key lock files; a training's resume state
                continue
            assert d.name.startswith(".tmp-") or (d / "meta.json").exists(), f"half-written artifact {d}"
    r = run_cli(SMOKE, mini_data, cache, tmp_path / "b")
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = results(tmp_path / "b")
    assert resumed["stages"][0]["cached"]  # tasks was finished before the kill
    assert {k: resumed[k] for k in NUMBERS} == {k: res[k] for k in NUMBERS}
    assert not list((cache / "stages").glob("*/.tmp-*"))  # the killed stage's temp dir was cleaned up


def test_cache_removes_only_this_hosts_dead_temp_dirs(tmp_path):
    from ilf_lab.pipeline.cache import _HOST, StageCache

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    parent = tmp_path / "stages" / "refine"
    orphans = {
        "dead": parent / f".tmp-k1-{_HOST}-{dead.pid}-x",
        "alive": parent / f".tmp-k1-{_HOST}-{os.getpid()}-y",
        "other_host": parent / f".tmp-k1-elsewhere-{dead.pid}-z",
        "other_key": parent / f".tmp-k2-{_HOST}-{dead.pid}-w",
    }
    for d in orphans.values():
        d.mkdir(parents=True)
        (d / "partial.jsonl").write_text("{}\n")
    art = StageCache(tmp_path).run("refine", "k1", lambda d: {"ok": True})
    assert art.meta == {"ok": True} and not art.cached
    left = {name for name, d in orphans.items() if d.exists()}
    assert left == {"alive", "other_host", "other_key"}


def test_sweep_shares_stages_logs_wandb_and_reports(mini_data, tmp_path):
    """The user's command: `-m feedback=human,instructgpt_1shot logger=wandb` -> two offline W&B runs in one
    group with pass@1 in their summaries, shared stages computed once, and both rows in the report."""
    from tests.wandb_offline import read_offline_run

    args = ["-m", "feedback=human,instructgpt_1shot", *[a for a in SMOKE if a != "logger=none"], "logger=wandb"]
    r = run_cli(args, mini_data, tmp_path / "cache", tmp_path / "sweep")
    assert r.returncode == 0, r.stderr[-3000:]
    found = sorted((tmp_path / "sweep").rglob("results.json"))
    assert len(found) == 2
    jobs = [json.loads(p.read_text()) for p in found]
    assert {j["feedback"] for j in jobs} == {"human", "instructgpt_1shot"}
    second = next(j for j in jobs if j["feedback"] == "instructgpt_1shot")
    by_name = {s["name"]: s for s in second["stages"]}
    assert by_name["tasks"]["cached"] and by_name["x0"]["cached"]  # shared with the first job
    assert not by_name["feedback"]["cached"]

    runs = [read_offline_run(j["wandb"]["run_dir"]) for j in jobs]
    assert runs[0]["group"] == runs[1]["group"] is not None
    assert len({j["wandb"]["run_id"] for j in jobs}) == 2
    for run, job in zip(runs, jobs, strict=True):
        assert run["summary"]["pass@1"] == job["pass@1"]

    rep = subprocess.run([sys.executable, "-m", "ilf_lab.report", str(tmp_path / "sweep")], capture_output=True,
                         text=True, timeout=300)
    assert rep.returncode == 0, rep.stderr
    assert "1-shot InstructGPT" in rep.stdout and "ILF" in rep.stdout
    assert (tmp_path / "sweep" / "table.csv").exists() and (tmp_path / "sweep" / "table.png").exists()


def test_zero_shot_skips_training(first_run, mini_data, tmp_path):
    cache, _, _ = first_run
    r = run_cli([*SMOKE, "experiment=zero_shot"], mini_data, cache, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    res = results(tmp_path)
    assert res["train_on"] == "none"
    assert {s["name"]: s["status"] for s in res["stages"]}["train_policy"] == "skipped"


def test_empty_stage_is_recorded_and_the_run_goes_on(mini_data, tmp_path):
    """No refinement passes with a random model and 1 sample of 4 tokens: the base policy is evaluated."""
    r = run_cli([*SMOKE, "refine.n=1", "refine.max_new_tokens=4"], mini_data, tmp_path / "c", tmp_path / "o")
    assert r.returncode == 0, r.stderr[-3000:]
    st = {s["name"]: s["status"] for s in results(tmp_path / "o")["stages"]}
    assert st["refine"] == "empty" and st["train_policy"] == "empty"


def test_bad_data_dir_fails_cleanly(tmp_path):
    r = run_cli(SMOKE, tmp_path / "missing", tmp_path / "c", tmp_path / "o")
    assert r.returncode == 2 and "data.dir does not exist" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o" / "results.json").exists()
    assert not list((tmp_path / "c").rglob("meta.json"))


def test_gold_finetune_trains_and_evaluates_the_new_policy(first_run, mini_data, tmp_path):
    """On every annotated task (the matched row trains on ILF's kept tasks: none with a random model)."""
    cache, _, res = first_run
    r = run_cli([*SMOKE, "experiment=mbpp_gold_all_tasks"], mini_data, cache, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = results(tmp_path)
    st = {s["name"]: s for s in out["stages"]}
    assert st["train_policy"]["status"] == "ok" and not st["train_policy"]["cached"]
    assert st["tasks"]["cached"] and st["feedback"]["cached"]
    assert not st["evaluate"]["cached"]  # a new policy is evaluated
    assert out["counts"]["policy_examples"] == 2
    assert len(out["training"]["policy"]["losses"]) >= 1


def test_humaneval_transfer_and_perplexity_analysis(first_run, mini_data, tmp_path):
    cache, _, res = first_run
    r = run_cli([*SMOKE, "eval=with_humaneval", "eval.perplexity=true"], mini_data, cache, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = results(tmp_path)
    st = {s["name"]: s for s in out["stages"]}
    assert st["evaluate"]["cached"]  # the MBPP evaluation is shared with the first run
    he = out["benchmarks"]["humaneval"]
    assert he["num_tasks"] == 3 and he["n_samples"] == 10 and 0 <= he["pass@1"] <= 1
    assert out["pass@1"] == out["benchmarks"]["mbpp"]["pass@1"] == res["pass@1"]
    rows = [json.loads(x) for x in Path(out["artifacts"]["perplexity"]).read_text().splitlines()]
    assert {x["source"] for x in rows} >= {"mbpp_gold", "human_refinements"} and all(x["ppl"] > 1 for x in rows)


def test_killed_training_resumes_from_its_checkpoint(mini_data, tmp_path):
    """A training stage checkpoints into the cache's per-key scratch dir: SIGKILLed after an epoch, the rerun
    resumes from that epoch (not from scratch) and ends where an uninterrupted training ends."""
    args = [*SMOKE, "experiment=mbpp_gold_all_tasks", "policy.epochs=60"]
    ref = run_cli(args, mini_data, tmp_path / "ref_cache", tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr[-3000:]
    cache = tmp_path / "cache"
    kill_when(args, mini_data, cache, tmp_path / "a", "train_policy/.scratch-*/model/lightning/last.ckpt")
    assert list((cache / "stages" / "train_policy").glob(".scratch-*/model/lightning/last.ckpt"))
    r = run_cli(args, mini_data, cache, tmp_path / "b")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming the unfinished run" in r.stdout + r.stderr
    resumed, full = results(tmp_path / "b"), results(tmp_path / "ref")
    assert 0 < len(resumed["training"]["policy"]["losses"]) < len(full["training"]["policy"]["losses"])
    assert resumed["training"]["policy"]["losses"][-1] == pytest.approx(full["training"]["policy"]["losses"][-1])
    assert {k: resumed[k] for k in NUMBERS} == {k: full[k] for k in NUMBERS}
    assert not list((cache / "stages" / "train_policy").glob(".scratch-*"))  # removed once published
    assert not list((cache / "stages" / "train_policy").rglob("last.ckpt"))  # resume state is not published


def test_empty_split_fails_with_one_line(mini_data, tmp_path):
    args = [a for a in SMOKE if not a.startswith("data.splits.test")] + ["data.splits.test=[5000,5001]"]
    r = run_cli(args, mini_data, tmp_path / "c", tmp_path / "o")
    assert r.returncode == 2 and "data.splits.test=[5000, 5001] holds no MBPP task" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "o" / "results.json").exists()
