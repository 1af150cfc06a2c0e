"""One experiment: run the DAG, then write its `Results` (results.json) and log it.

`stop_after=<stage>` ends a run early: the refinement analyses (Tables 2-3) need no policy; their results carry
`refine` metrics with pass@k null.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ilf_lab.io import read_jsonl
from ilf_lab.pipeline.cache import StageCache
from ilf_lab.pipeline.dag import ilf
from ilf_lab.pipeline.runner import Runner, StopAfter
from ilf_lab.pipeline.stages.common import pass_at
from ilf_lab.results import Results, Score

log = logging.getLogger("ilf_lab.pipeline")

# artifact files copied beside results.json (the cache keeps the originals), by the stage that writes them
_FILES = {"x0": ("x0.jsonl", "x0_samples.jsonl"), "feedback": ("feedback.jsonl",), "refine": ("refinements.jsonl",),
          "perplexity": ("perplexity.jsonl",), "evaluate": ("eval_samples.jsonl",),
          "evaluate_humaneval": ("humaneval_samples.jsonl",)}


def run_experiment(cfg: DictConfig) -> dict[str, Any]:
    """Run (or resume) one experiment; write results.json in the run's output dir; return it as a dict."""
    from ilf_lab.tracking import make_tracker

    t_start = time.perf_counter()
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tracker = make_tracker(cfg)
    try:
        run = Runner(cfg, StageCache(cfg.paths.cache_dir), tracker, rounds=cfg.rounds)
        stopped = None
        try:
            ilf(cfg, run)
        except StopAfter as e:
            stopped = str(e)
            log.info("stop_after=%s: the run ends after stage %s", cfg.stop_after, e)
        results = collect(cfg, run, out_dir, stopped)
        results.wall_seconds = round(time.perf_counter() - t_start, 2)
        results.wandb = tracker.info
        _log(tracker, results)
        results.write(out_dir / "results.json")
        log.info("results: %s pass@1=%s pass@10=%s in %.0f s", results.experiment, results.metric("pass@1"),
                 results.metric("pass@10"), results.wall_seconds)
        return results.to_json()
    except BaseException:
        tracker.finish(exit_code=1)  # the W&B run is marked failed; finish() is idempotent
        raise
    finally:
        tracker.finish()


def collect(cfg: DictConfig, run: Runner, out_dir: Path, stopped: str | None) -> Results:
    """The run's record from its stages' artifacts (architecture contract 2)."""
    done = run.done
    meta = {name: art.meta for name, art in done.items()}
    counts: dict[str, Any] = {"annotations": meta["tasks"].get("annotation_counts", {})}
    for stage in ("x0", "feedback"):
        if stage in meta:
            counts[stage] = meta[stage][stage]
    if meta.get("train_refiner", {}).get("examples") is not None:
        counts["refiner_examples"] = meta["train_refiner"]["examples"]
    if "refine" in meta:
        counts["refinements"] = meta["refine"]["refinements"]
        counts["refinements_passing"] = meta["refine"]["refinements_passing"]
    if not stopped or "train_policy" in meta:
        counts["policy_examples"] = meta.get("train_policy", {}).get("examples", 0)
    training = {kind: meta[stage]["training"] for kind, stage in (("refiner", "train_refiner"),
                                                                   ("policy", "train_policy"))
                if "training" in meta.get(stage, {})}
    artifacts = {}
    for stage, names in _FILES.items():
        for name in names:
            if stage in done and done[stage].file(name).exists():
                dst = out_dir / name
                shutil.copyfile(done[stage].file(name), dst)
                artifacts[name.removesuffix(".jsonl")] = str(dst)
    benchmarks = {name: _score(meta[stage]) for name, stage in (("mbpp", "evaluate"),
                                                                ("humaneval", "evaluate_humaneval"))
                  if stage in meta}
    return Results(
        experiment=cfg.name, feedback=cfg.feedback.name, train_on=cfg.train_on.source, model=cfg.model.name,
        scale=cfg.scale, eval_split=cfg.eval.split, temperature=cfg.sampling.temperature, seed=cfg.seed,
        rounds=cfg.rounds, stopped_after=stopped, benchmarks=benchmarks,
        refine=refine_stats(cfg, done["refine"]) if "refine" in done else {},
        stages=run.rows, counts=counts, training=training, artifacts=artifacts, overrides=_overrides(),
        config=OmegaConf.to_container(cfg, resolve=True),
    )


def _score(meta: dict[str, Any]) -> Score:
    pass_at_k = {int(k[5:]): v for k, v in meta.items() if k.startswith("pass@")}
    return Score(pass_at_k, meta.get("num_tasks"), meta.get("n_samples"), meta.get("per_task", {}))


def refine_stats(cfg: DictConfig, art: Any) -> dict[str, Any]:
    """Tables 2-3: pass@k of the refinements sampled per MBPPTrain task, and the share of tasks with one passing.

    A task with no candidate (the LLM wrote no refinement) counts as failed, so every row is over `tasks`.
    """
    llm = cfg.feedback.provider == "llm"
    n, tasks = (cfg.feedback.n if llm else cfg.refine.n), art.meta["tasks"]
    passing: dict[int, int] = {}
    for x in read_jsonl(art.file("refinements.jsonl")):
        passing[x["task_id"]] = passing.get(x["task_id"], 0) + int(x["passed"])
    # every task had n tries: a reply without a parseable refinement is a failed sample, not a missing one
    counts = [(n, min(c, n)) for c in passing.values()] + [(n, 0)] * (tasks - len(passing))
    with_passing = sum(c > 0 for _, c in counts)
    return {
        "refiner": "llm" if llm else cfg.refine.refiner,
        "shots": cfg.feedback.shots if llm else cfg.refine.shots,
        "feedback": cfg.feedback.name,
        "feedback_shuffled": bool(cfg.feedback.shuffle),
        "tasks": tasks,
        "samples_per_task": n,
        **pass_at(counts, cfg.eval.ks, n),
        "tasks_with_passing": with_passing,
        "frac_tasks_with_passing": with_passing / tasks if tasks else None,
    }


def _log(tracker: Any, results: Results) -> None:
    for name, path in results.artifacts.items():
        tracker.log_table(name, read_jsonl(path)[:2000])
    losses = (results.training.get("policy") or {}).get("losses")
    if losses:
        tracker.log_metrics({"policy/final_loss": losses[-1]})
    refine = {f"refine/{k}": v for k, v in results.refine.items() if isinstance(v, float)}
    headline = {k: results.metric(k) for k in ("pass@1", "pass@10") if results.metric(k) is not None}
    for metrics in (refine, headline):
        if metrics:
            tracker.log_metrics(metrics)


def _overrides() -> list[str]:
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except Exception:  # not under Hydra (called from Python)
        return []
