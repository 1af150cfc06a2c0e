"""The ILF experiment as a DAG of cached stages, top to bottom (Chen et al. 2023, Algorithm 1):

    tasks -> x0 -> feedback -> train_refiner -> refine -> train_policy -> evaluate
                 ^------------------- rounds > 1: x0 from the improved policy ------'

Each stage's key hashes its config slice and its upstream keys (see cache.py), so a sweep computes shared stages
once and a killed run resumes where it stopped. `stop_after=<stage>` ends a run early: the refinement analyses
(Tables 2-3) need no policy, and their results.json carries `refine` metrics with pass@k null.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ilf_lab.data.mbpp import load_mbpp
from ilf_lab.io import atomic_write_text
from ilf_lab.models.loading import model_fingerprint, resolve_model_dir
from ilf_lab.pipeline import stages as S
from ilf_lab.pipeline.cache import Artifact, StageCache, read_jsonl, stage_key

log = logging.getLogger("ilf_lab.pipeline")


# options added after caches existed: left out of stage keys while at their default, so those caches stay valid
_KEY_OMIT_AT_DEFAULT = {"feedback": {"shuffle": False}, "refine": {"refiner": "trained"}}


def _slice(cfg: DictConfig, *keys: str) -> dict[str, Any]:
    out = {}
    for k in keys:
        v = OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
        for sub, default in _KEY_OMIT_AT_DEFAULT.get(k, {}).items():
            if isinstance(v, dict) and v.get(sub) == default:
                del v[sub]
        out[k] = v
    return out


def _data_fingerprint(cfg: DictConfig) -> str:
    """Changes when the data files change (local dir), so cached tasks are never stale."""
    parts = []
    d = cfg.data.dir
    for rel in ("mbpp/mbpp.jsonl", "ilf/surge_annotations.jsonl"):
        p = Path(d) / rel if d else None
        if p is not None and p.exists():
            parts.append(f"{rel}:{p.stat().st_size}:{int(p.stat().st_mtime)}")
    f = cfg.data.annotations_file
    if f and Path(f).exists():
        parts.append(hashlib.sha256(Path(f).read_bytes()).hexdigest())
    return "|".join(parts) or "hub"


class StopAfter(Exception):
    """Raised once the stage named by `stop_after` is recorded: the run ends there (results without pass@k)."""


class StageLog:
    """Records each stage for results.json and W&B, and says what runs, what is cached and how long it took."""

    def __init__(self, tracker: Any, stop_after: str | None = None):
        self.tracker = tracker
        self.stop_after = stop_after
        self.rows: list[dict[str, Any]] = []

    def add(self, name: str, art: Artifact | None, status: str = "ok", info: dict | None = None) -> None:
        row = {
            "name": name,
            "cached": bool(art and art.cached),
            "seconds": round(art.seconds, 3) if art else 0.0,
            "key": art.key if art else None,
            "status": status,
            "info": info or {},
        }
        self.rows.append(row)
        how = "skipped" if art is None else ("cached" if art.cached else f"ran in {art.seconds:.1f} s")
        log.info("stage %-14s %-8s %s %s", name, status, how, json.dumps(info or {}, default=str)[:160])
        self.tracker.log_stage(name, row["seconds"], row["cached"], status=status, info=info)
        if name.split("[")[0] == self.stop_after:
            raise StopAfter(name)


@dataclass
class RunState:
    """What the stages leave for results.json."""

    counts: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    refine: dict[str, Any] = field(default_factory=dict)  # Tables 2-3: how good the refinements are
    eval: dict[str, Any] = field(default_factory=dict)
    benchmarks: dict[str, Any] = field(default_factory=dict)
    stopped_after: str | None = None


def run_experiment(cfg: DictConfig) -> dict[str, Any]:
    """Run (or resume) one experiment; write results.json in the run's output dir; return the results."""
    from ilf_lab.tracking import Tracker

    t_start = time.perf_counter()
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = StageCache(cfg.paths.cache_dir)
    try:
        tracker = Tracker.from_config(cfg)
    except Exception as e:  # W&B must never fail a run
        print(f"wandb: disabled ({type(e).__name__}: {e})")
        tracker = Tracker(enabled=False)
    try:
        results = _run(cfg, cache, tracker, out_dir)
        results["wall_seconds"] = round(time.perf_counter() - t_start, 2)
        results["wandb"] = getattr(tracker, "info", {})
        tracker.log_metrics({k: results[k] for k in ("pass@1", "pass@10") if results.get(k) is not None})
        atomic_write_text(out_dir / "results.json", json.dumps(results, indent=1, default=str))
        log.info("results: %s", {k: results[k] for k in ("experiment", "pass@1", "pass@10", "wall_seconds")})
        return results
    except BaseException:
        tracker.finish(exit_code=1)  # the W&B run is marked failed; finish() is idempotent
        raise
    finally:
        tracker.finish()


def _run(cfg: DictConfig, cache: StageCache, tracker: Any, out_dir: Path) -> dict[str, Any]:
    stages, state = StageLog(tracker, cfg.stop_after), RunState()
    try:
        _stages(cfg, cache, tracker, stages, state)
    except StopAfter as e:
        state.stopped_after = str(e)
        log.info("stop_after=%s: the run ends after stage %s", cfg.stop_after, e)
    return _results(cfg, tracker, stages, state, out_dir)


def _stages(cfg: DictConfig, cache: StageCache, tracker: Any, stages: StageLog, state: RunState) -> None:
    models = S.Models(cfg)
    fmt = cfg.model.prompt_format
    mbpp = load_mbpp(cfg.data)

    # the base policy πθ, materialised as a HF dir (GGUF conversion and tiny models are cached)
    base_path = resolve_model_dir(cfg.model, cfg.paths.cache_dir)
    base_id = {"model": _slice(cfg, "model")["model"], "fingerprint": model_fingerprint(base_path)}

    # 1. tasks: splits and the filtered human annotations
    k_tasks = stage_key(
        "tasks", {**_slice(cfg, "data"), "x0_source": cfg.x0.source, "fp": _data_fingerprint(cfg)}
    )
    a_tasks = cache.run("tasks", k_tasks, lambda d: S.stage_tasks(cfg, mbpp, d))
    stages.add("tasks", a_tasks, info=a_tasks.meta.get("split_sizes"))
    splits, anns = S.load_splits(a_tasks.path), S.load_annotations(a_tasks.path)

    counts, training, artifacts = state.counts, state.training, state.artifacts
    counts["annotations"] = a_tasks.meta.get("annotation_counts", {})
    train_on = cfg.train_on.source
    policy_path, policy_key = base_path, stage_key("base", base_id)
    refiner_path: str | None = None
    needs_feedback = train_on in ("refinements", "human_refinements", "mbpp_gold")

    for round_ in range(1, cfg.rounds + 1):
        r = f"[{round_}]" if cfg.rounds > 1 else ""
        feedback_rows: list[dict] = []
        k_fb = None
        if needs_feedback:
            # 2. x0: incorrect programs
            from_policy = cfg.x0.source == "policy" or round_ > 1
            x0_slice: dict[str, Any] = {"source": "annotations"}
            x0_up = {"tasks": k_tasks}
            if from_policy:
                x0_slice = _slice(cfg, "x0", "execution") | {
                    "seed": cfg.seed,
                    "round": round_,
                    "fmt": fmt,
                    "top_p": cfg.sampling.top_p,
                }
                x0_up["policy"] = policy_key
            k_x0 = stage_key("x0", x0_slice, x0_up)
            a_x0 = cache.run(
                "x0", k_x0, lambda d: S.stage_x0(cfg, mbpp, splits, anns, models, policy_path, d, round_)
            )
            x0_rows = read_jsonl(a_x0.file("x0.jsonl"))
            artifacts["x0"] = str(a_x0.file("x0.jsonl"))
            if a_x0.file("x0_samples.jsonl").exists():
                artifacts["x0_samples"] = str(a_x0.file("x0_samples.jsonl"))
            stages.add(f"x0{r}", a_x0, "ok" if a_x0.meta["x0"] else "empty", a_x0.meta)

            # 3. feedback f (and, from an LLM, its refinement)
            fb_slice = _slice(cfg, "feedback") | {"seed": cfg.seed}
            if cfg.feedback.provider == "llm":
                fb_slice |= {"base": base_id, "prompt_format": fmt}
            k_fb = stage_key("feedback", fb_slice, {"x0": k_x0, "tasks": k_tasks})
            a_fb = cache.run(
                "feedback", k_fb, lambda d: S.stage_feedback(cfg, mbpp, anns, x0_rows, models, base_path, d)
            )
            feedback_rows = read_jsonl(a_fb.file("feedback.jsonl"))
            artifacts["feedback"] = str(a_fb.file("feedback.jsonl"))
            counts["x0"], counts["feedback"] = a_x0.meta["x0"], a_fb.meta["feedback"]
            stages.add(f"feedback{r}", a_fb, "ok" if a_fb.meta["feedback"] else "empty", a_fb.meta)
        else:
            for name in ("x0", "feedback"):
                stages.add(f"{name}{r}", None, "skipped", {"train_on": train_on})

        refine_key = None
        if train_on == "refinements":
            # 4. train πRefine on MBPPRefine's (t, x0, f) -> x1 (human feedback; LLM feedback brings its own x1)
            if cfg.refine.refiner == "base" and refiner_path is None:
                stages.add("train_refiner", None, "skipped", {"reason": "refine.refiner=base (zero-shot)"})
                refiner_path = base_path
            elif cfg.feedback.provider == "human" and refiner_path is None:
                records = _refiner_records(mbpp, feedback_rows)
                counts["refiner_examples"] = len(records)
                k_ref = stage_key(
                    "train_refiner",
                    _slice(cfg, "refiner", "trainer") | {"base": base_id, "seed": cfg.seed, "fmt": fmt},
                    {"feedback": k_fb},
                )
                if records:
                    a_ref = cache.run(
                        "train_refiner",
                        k_ref,
                        lambda d: S.stage_train(
                            cfg,
                            "refiner",
                            records,
                            base_path,
                            cfg.refiner,
                            d,
                            _train_logger(cfg, tracker, "refiner"),
                        ),
                    )
                    refiner_path = str(a_ref.file("model"))
                    training["refiner"] = a_ref.meta.get("training", {})
                    stages.add("train_refiner", a_ref, info={"examples": len(records)})
                else:
                    stages.add("train_refiner", None, "empty", {"examples": 0})
                    refiner_path = base_path  # no human data: refine with the base model, zero-shot
            elif cfg.feedback.provider == "llm" and round_ == 1:
                stages.add("train_refiner", None, "skipped", {"reason": "the LLM wrote the refinements"})
            # 5. refine MBPPTrain: sample x1, run the tests, keep one passing refinement per task
            refine_slice = _slice(cfg, "refine", "execution") | {
                "seed": cfg.seed,
                "round": round_,
                "fmt": fmt,
            }
            refine_up = {
                "feedback": k_fb,
                "refiner": model_fingerprint(refiner_path) if refiner_path else "llm",
            }
            refine_key = stage_key("refine", refine_slice, refine_up)
            src = refiner_path if cfg.feedback.provider == "human" else None
            a_rf = cache.run(
                "refine",
                refine_key,
                lambda d: S.stage_refine(cfg, mbpp, feedback_rows, src, models, d, round_),
            )
            artifacts["refinements"] = str(a_rf.file("refinements.jsonl"))
            counts["refinements"] = a_rf.meta["refinements"]
            counts["refinements_passing"] = a_rf.meta["refinements_passing"]
            refinements = read_jsonl(a_rf.file("refinements.jsonl"))
            policy_records = [(mbpp[x["task_id"]], x["program"]) for x in refinements if x["kept"]]
            state.refine = _refine_stats(cfg, refinements, a_rf.meta["tasks"])
            stages.add(f"refine{r}", a_rf, "ok" if a_rf.meta["tasks_with_passing"] else "empty", a_rf.meta)
        else:
            for name in ("train_refiner", "refine"):
                stages.add(f"{name}{r}", None, "skipped", {"train_on": train_on})
            if train_on == "human_refinements":
                policy_records = [
                    (mbpp[x["task_id"]], x["refinement"])
                    for x in feedback_rows
                    if x["split"] == "train" and x.get("refinement")
                ]
            elif train_on == "mbpp_gold":
                # the gold programs of the same MBPPTrain tasks: controls for the task set
                policy_records = [
                    (mbpp[x["task_id"]], mbpp[x["task_id"]].code)
                    for x in feedback_rows
                    if x["split"] == "train"
                ]
            else:
                policy_records = []

        # 6. train πθ* on the chosen fine-tuning data (nothing: the base policy is evaluated)
        counts["policy_examples"] = len(policy_records)
        if train_on == "none":
            stages.add(f"train_policy{r}", None, "skipped", {"train_on": "none"})
        elif not policy_records:
            stages.add(f"train_policy{r}", None, "empty", {"train_on": train_on, "examples": 0})
        else:
            from ilf_lab.training import PolicyRecord

            records = [PolicyRecord(task=t, program=p) for t, p in policy_records]
            k_pol = stage_key(
                "train_policy",
                _slice(cfg, "policy", "trainer") | {"seed": cfg.seed, "fmt": fmt, "train_on": train_on},
                {"policy": policy_key, "data": refine_key or k_fb or "", "n": str(len(records))},
            )
            a_pol = cache.run(
                "train_policy",
                k_pol,
                lambda d: S.stage_train(
                    cfg, "policy", records, policy_path, cfg.policy, d, _train_logger(cfg, tracker, "policy")
                ),
            )
            training["policy"] = a_pol.meta.get("training", {})
            stages.add(f"train_policy{r}", a_pol, info={"examples": len(records), "train_on": train_on})
            policy_path, policy_key = str(a_pol.file("model")), k_pol

    # analysis (Figure 3): how surprising is each fine-tuning source to the base model?
    if cfg.eval.perplexity:
        train_tasks = [mbpp[i] for i in splits["train"] if i in anns]
        sources = {
            "mbpp_gold": [(t, t.code) for t in train_tasks],
            "human_refinements": [(t, anns[t.task_id].refinement) for t in train_tasks],
        }
        if train_on == "refinements":
            sources["refinements"] = policy_records
        k_ppl = stage_key(
            "perplexity",
            {"base": base_id, "fmt": fmt},
            {"tasks": k_tasks, "refine": refine_key or ""},
        )
        a_ppl = cache.run("perplexity", k_ppl, lambda d: S.stage_perplexity(cfg, sources, base_path, d))
        stages.add("perplexity", a_ppl, info=a_ppl.meta)
        artifacts["perplexity"] = str(a_ppl.file("perplexity.jsonl"))

    # 7. evaluate πθ* on MBPPTest (or MBPPRefine for model selection): n samples at T, pass@k
    split = "test" if cfg.eval.split == "test" else "refine_all"
    eval_tasks = [mbpp[i] for i in splits[split]]
    k_eval = stage_key(
        "evaluate",
        _slice(cfg, "sampling", "execution")
        | {"ks": list(cfg.eval.ks), "split": split, "seed": cfg.seed, "fmt": fmt},
        {"policy": policy_key, "tasks": k_tasks},
    )
    a_ev = cache.run("evaluate", k_eval, lambda d: S.stage_evaluate(cfg, eval_tasks, policy_path, models, d))
    ev = state.eval = a_ev.meta
    artifacts["eval_samples"] = str(a_ev.file("eval_samples.jsonl"))
    benchmarks = state.benchmarks
    benchmarks["mbpp"] = {k: ev.get(k) for k in ("pass@1", "pass@10", "num_tasks", "n_samples", "per_task")}
    stages.add("evaluate", a_ev, info={k: ev.get(k) for k in ("pass@1", "pass@10", "num_tasks", "n_samples")})
    if "humaneval" in cfg.eval.benchmarks:  # transfer: the same policy, sampler and sandbox on HumanEval
        k_he = stage_key(
            "evaluate_humaneval",
            _slice(cfg, "sampling", "execution")
            | {"ks": list(cfg.eval.ks), "seed": cfg.seed, "fmt": fmt, "max": cfg.eval.humaneval_max_problems},
            {"policy": policy_key},
        )
        a_he = cache.run(
            "evaluate_humaneval", k_he, lambda d: S.stage_evaluate_humaneval(cfg, policy_path, models, d)
        )
        he = a_he.meta
        stages.add(
            "evaluate_humaneval", a_he, info={k: he.get(k) for k in ("pass@1", "pass@10", "num_tasks")}
        )
        benchmarks["humaneval"] = {
            k: he.get(k) for k in ("pass@1", "pass@10", "num_tasks", "n_samples", "per_task")
        }
        artifacts["humaneval_samples"] = str(a_he.file("humaneval_samples.jsonl"))


def _results(
    cfg: DictConfig, tracker: Any, stages: StageLog, state: RunState, out_dir: Path
) -> dict[str, Any]:
    """results.json (architecture contract 2); pass@k are null when the run stopped before `evaluate`."""
    artifacts, training, ev = state.artifacts, state.training, state.eval
    # copy the small JSONL artifacts beside results.json (the cache keeps the originals)
    for name, path in list(artifacts.items()):
        dst = out_dir / Path(path).name
        shutil.copyfile(path, dst)
        artifacts[name] = str(dst)
    _log_tables(tracker, artifacts)
    if "policy" in training:
        tracker.log_metrics({"policy/final_loss": (training["policy"].get("losses") or [None])[-1]})
    refine_metrics = {f"refine/{k}": v for k, v in state.refine.items() if isinstance(v, float)}
    if refine_metrics:
        tracker.log_metrics(refine_metrics)

    return {
        "experiment": cfg.name,
        "feedback": cfg.feedback.name,
        "train_on": cfg.train_on.source,
        "model": cfg.model.name,
        "scale": cfg.scale,
        "pass@1": ev.get("pass@1"),
        "pass@10": ev.get("pass@10"),
        "n_samples": ev.get("n_samples"),
        "num_tasks": ev.get("num_tasks"),
        "eval_split": cfg.eval.split,
        "temperature": cfg.sampling.temperature,
        "seed": cfg.seed,
        "rounds": cfg.rounds,
        "stopped_after": state.stopped_after,
        "per_task": ev.get("per_task", {}),
        "benchmarks": state.benchmarks,
        "refine": state.refine,
        "stages": stages.rows,
        "counts": state.counts,
        "training": training,
        "artifacts": artifacts,
        "overrides": _overrides(),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


def _train_logger(cfg: DictConfig, tracker: Any, prefix: str) -> Any:
    """Training curves go to the run's W&B logger when training stays in this process (one device)."""
    single = str(cfg.trainer.devices) in ("1", "auto") and cfg.trainer.num_nodes == 1
    return tracker.lightning_logger(prefix) if single else None


def _refine_stats(cfg: DictConfig, refinements: list[dict], tasks: int) -> dict[str, Any]:
    """Tables 2-3: pass@k of the refinements sampled per MBPPTrain task, and the share of tasks with one passing.

    A task with no candidate (the LLM wrote no refinement) counts as failed, so every row is over `tasks`.
    """
    from ilf_lab.execution import mean_pass_at_k

    llm = cfg.feedback.provider == "llm"
    n = 1 if llm else cfg.refine.n
    per_task: dict[int, list[int]] = {}
    for x in refinements:
        nc = per_task.setdefault(x["task_id"], [0, 0])
        nc[0] += 1
        nc[1] += int(x["passed"])
    counts = [(a, c) for a, c in per_task.values()] + [(n, 0)] * (tasks - len(per_task))
    with_passing = sum(c > 0 for _, c in counts)
    return {
        "refiner": "llm" if llm else cfg.refine.refiner,
        "feedback": cfg.feedback.name,
        "feedback_shuffled": bool(cfg.feedback.shuffle),
        "tasks": tasks,
        "samples_per_task": n,
        **{f"pass@{k}": mean_pass_at_k(counts, k) if counts and k <= n else None for k in cfg.eval.ks},
        "tasks_with_passing": with_passing,
        "frac_tasks_with_passing": with_passing / tasks if tasks else None,
    }


def _refiner_records(mbpp: dict, feedback_rows: list[dict]) -> list[Any]:
    from ilf_lab.training import RefinerRecord

    return [
        RefinerRecord(
            task=mbpp[x["task_id"]],
            old_code=x["old_code"],
            feedback=x["feedback"],
            refinement=x["refinement"],
        )
        for x in feedback_rows
        if x["split"] == "refine" and x.get("refinement")
    ]


def _log_tables(tracker: Any, artifacts: dict[str, str]) -> None:
    for name, path in artifacts.items():
        rows = read_jsonl(path)
        tracker.log_table(name, rows[:2000])


def _overrides() -> list[str]:
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except Exception:  # not under Hydra (called from Python)
        return []
