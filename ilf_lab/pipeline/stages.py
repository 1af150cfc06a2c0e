"""One function per ILF stage: (its config slice, upstream artifacts, output dir) -> metadata.

Each writes its artifact files into the directory it is given (the stage cache publishes it atomically) and
returns a small dict that lands in results.json. `run.py` wires them into the DAG.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ilf_lab.data.mbpp import Annotation, filter_annotations, load_annotation_records, split_of
from ilf_lab.data.prompts import Task, program_from_completion, refine_prompt, stop_sequences, task_prompt
from ilf_lab.pipeline.cache import read_jsonl, write_jsonl

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------- helpers


class Models:
    """Keeps one sampling engine loaded at a time (the model being sampled changes between stages)."""

    def __init__(self, cfg: Any):
        self.cfg = cfg
        self._path: str | None = None
        self._engine: Any = None
        self._tokenizer: Any = None

    def engine(self, path: str) -> tuple[Any, Any]:
        if path != self._path:
            from ilf_lab.generation import make_engine
            from ilf_lab.models.loading import load_model

            self._engine = None
            model, tok = load_model(path, self.cfg.model.dtype, self.cfg.model.trust_remote_code)
            self._engine = make_engine(
                self.cfg.sampling.engine,
                path,
                dtype=self.cfg.model.dtype,
                batch_size=self.cfg.sampling.batch_size,
                model=model,
                tokenizer=tok,
            )
            self._path, self._tokenizer = path, tok
        return self._engine, self._tokenizer


def sample_programs(
    models: Models,
    model_path: str,
    tasks: Sequence[Task],
    prompts: Sequence[str] | None,
    *,
    fmt: str,
    n: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    seed: int,
) -> list[list[tuple[str, str]]]:
    """n (completion, program) pairs per task; `prompts` default to the task prompts of the format."""
    from ilf_lab.generation import SamplingParams

    engine, tok = models.engine(model_path)
    if prompts is None:
        prompts = [task_prompt(t, fmt, tok) for t in tasks]
    params = SamplingParams(
        n=n,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        stop=stop_sequences(fmt),
        seed=seed,
    )
    outs = engine.generate(list(prompts), params, progress=True)
    return [[(c, program_from_completion(t, c, fmt)) for c in cs] for t, cs in zip(tasks, outs, strict=True)]


def run_tests(cfg: Any, rows: Sequence[tuple[Task, str]]) -> list[Any]:
    """Verdicts for (task, program) pairs through the sandbox (MBPP's test_setup_code + all test_list asserts)."""
    from ilf_lab.execution import run_programs

    items = [{"task_id": t.task_id, "program": p, "tests": list(t.tests), "setup": t.setup} for t, p in rows]
    if not items:
        return []
    ex = cfg.execution
    return run_programs(
        items,
        timeout=ex.timeout,
        workers=ex.workers,
        comparison=ex.comparison,
        memory_mb=ex.memory_mb,
        progress=len(items) > 50,
    )


def score(
    flat: Sequence[tuple[Any, int, str, str]], verdicts: Sequence[Any], ks: Sequence[int], n: int
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Sample rows with verdicts, and per-task counts with pass@k for every k <= n (null above n)."""
    from ilf_lab.execution import mean_pass_at_k

    rows, per_task = [], {}
    for (task_id, i, c, p), v in zip(flat, verdicts, strict=True):
        rows.append(
            {
                "task_id": task_id,
                "sample_idx": i,
                "completion": c,
                "program": p,
                "passed": v.passed,
                "result": v.result,
            }
        )
        pt = per_task.setdefault(str(task_id), {"n": 0, "c": 0})
        pt["n"] += 1
        pt["c"] += int(v.passed)
    counts = [(pt["n"], pt["c"]) for pt in per_task.values()]
    metrics = {f"pass@{k}": (mean_pass_at_k(counts, k) if k <= n else None) for k in ks}
    return rows, {**metrics, "num_tasks": len(per_task), "n_samples": n, "per_task": per_task}


# -------------------------------------------------------------------------------------------------- stages


def stage_tasks(cfg: Any, mbpp: dict[int, Task], out: Path) -> dict[str, Any]:
    """Splits (with the scale's subsets) and the filtered human annotations."""
    data = cfg.data
    records = load_annotation_records(data)
    anns, counts = filter_annotations(records, data)
    for a in anns:
        if a.task_id not in mbpp:
            from ilf_lab.errors import DataError

            raise DataError(f"annotation for task {a.task_id}, which is not in MBPP")

    def ids(split: str) -> list[int]:
        lo, hi = data.splits[split]
        return [i for i in range(lo, hi + 1) if i in mbpp]

    def first(xs: list[int], limit: int | None) -> list[int]:
        return xs if limit is None else xs[:limit]

    annotated = {
        split: [a.task_id for a in anns if split_of(data, a.task_id) == split]
        for split in ("refine", "train")
    }
    splits = {
        "test": first(ids("test"), data.max_test_tasks),
        "refine_all": first(ids("refine"), data.max_test_tasks),  # model selection (eval.split=refine)
        "refine": first(annotated["refine"], data.max_refine_tasks),
        "train": first(
            annotated["train"] if cfg.x0.source == "annotations" else ids("train"), data.max_train_tasks
        ),
    }
    write_jsonl(out / "splits.jsonl", [{"split": k, "task_ids": v} for k, v in splits.items()])
    write_jsonl(out / "annotations.jsonl", [a.__dict__ for a in anns])
    return {"annotation_counts": counts, "split_sizes": {k: len(v) for k, v in splits.items()}}


def load_splits(art_path: Path) -> dict[str, list[int]]:
    return {r["split"]: r["task_ids"] for r in read_jsonl(art_path / "splits.jsonl")}


def load_annotations(art_path: Path) -> dict[int, Annotation]:
    return {r["task_id"]: Annotation(**r) for r in read_jsonl(art_path / "annotations.jsonl")}


def stage_x0(
    cfg: Any,
    mbpp: dict[int, Task],
    splits: dict[str, list[int]],
    anns: dict[int, Annotation],
    models: Models,
    policy_path: str,
    out: Path,
    round_: int,
) -> dict[str, Any]:
    """Incorrect programs: the annotations' (the paper) or the policy's own failing samples (Algorithm 1)."""
    if cfg.x0.source == "annotations" and round_ == 1:
        rows = [
            {"task_id": i, "split": split, "old_code": anns[i].old_code, "source": "annotations"}
            for split in ("refine", "train")
            for i in splits[split]
        ]
        write_jsonl(out / "x0.jsonl", rows)
        return {"x0": len(rows)}
    tasks = [mbpp[i] for i in splits["train"]]
    samples = sample_programs(
        models,
        policy_path,
        tasks,
        None,
        fmt=cfg.model.prompt_format,
        n=cfg.x0.n,
        temperature=cfg.x0.temperature,
        top_p=cfg.sampling.top_p,
        max_new_tokens=cfg.x0.max_new_tokens,
        seed=cfg.seed + 1000 * round_,
    )
    flat = [(t, prog) for t, ss in zip(tasks, samples, strict=True) for _, prog in ss]
    verdicts = run_tests(cfg, flat)
    failing: dict[int, list[tuple[str, str]]] = {}
    for (t, prog), v in zip(flat, verdicts, strict=True):
        if not v.passed and prog.strip():
            failing.setdefault(t.task_id, []).append((prog, v.result))
    # the paper's annotators picked an easy-to-fix sample: take the shortest failing one
    rows = [
        {
            "task_id": i,
            "split": "train",
            "old_code": min(progs, key=lambda p: len(p[0]))[0],
            "result": min(progs, key=lambda p: len(p[0]))[1],
            "source": "policy",
        }
        for i, progs in sorted(failing.items())
    ]
    write_jsonl(out / "x0.jsonl", rows)
    write_jsonl(
        out / "x0_samples.jsonl",
        [
            {"task_id": t.task_id, "program": p, "passed": v.passed, "result": v.result}
            for (t, p), v in zip(flat, verdicts, strict=True)
        ],
    )
    return {"x0": len(rows), "sampled": len(flat), "tasks_sampled": len(tasks)}


def stage_feedback(
    cfg: Any,
    mbpp: dict[int, Task],
    anns: dict[int, Annotation],
    x0_rows: list[dict],
    models: Models,
    base_path: str,
    out: Path,
) -> dict[str, Any]:
    """(t, x0, f[, x1]) per task: the human annotations, or an LLM's k-shot feedback and refinement."""
    fb = cfg.feedback
    if fb.provider == "human":
        rows = [
            {
                "task_id": r["task_id"],
                "split": r["split"],
                "old_code": r["old_code"],
                "feedback": anns[r["task_id"]].feedback,
                "refinement": anns[r["task_id"]].refinement,
            }
            for r in x0_rows
            if r["task_id"] in anns
        ]
        if fb.shuffle:
            shuffle_feedback([r for r in rows if r["split"] == "train"], cfg.seed)
        write_jsonl(out / "feedback.jsonl", rows)
        return {"feedback": len(rows), "provider": "human", "shuffled": bool(fb.shuffle)}

    from ilf_lab.feedback import HFBackend, OpenAIBackend, llm_feedback

    pool = sorted(
        (a for a in anns.values() if split_of(cfg.data, a.task_id) == "refine"), key=lambda a: a.task_id
    )
    rng = random.Random(cfg.seed)
    shot_anns = rng.sample(pool, min(fb.shots, len(pool)))
    shots = [(mbpp[a.task_id], a.old_code, a.feedback, a.refinement) for a in shot_anns]
    items_rows = [r for r in x0_rows if r["split"] == "train"]
    if fb.num_tasks is not None:
        items_rows = items_rows[: fb.num_tasks]
    items = [(mbpp[r["task_id"]], r["old_code"]) for r in items_rows]
    if fb.backend == "openai":
        backend: Any = OpenAIBackend(
            fb.base_url, fb.model, fb.api_key_env, fb.max_concurrency, fb.max_retries
        )
    else:
        from ilf_lab.models.loading import resolve_model_dir

        path = base_path
        if fb.model:
            path = resolve_model_dir({"source": "hub", "path": fb.model}, cfg.paths.cache_dir)
        engine, tok = models.engine(path)
        backend = HFBackend(engine, tok, cfg.model.prompt_format if not fb.model else "chat")
    rows = llm_feedback(
        items, shots, backend, temperature=fb.temperature, max_new_tokens=fb.max_new_tokens, seed=cfg.seed
    )
    for r, src in zip(rows, items_rows, strict=True):
        r["split"] = src["split"]
    write_jsonl(out / "feedback.jsonl", rows)
    return {
        "feedback": len(rows),
        "provider": "llm",
        "shots": [a.task_id for a in shot_anns],
        "with_refinement": sum(r["refinement"] is not None for r in rows),
    }


def shuffle_feedback(rows: list[dict], seed: int) -> None:
    """Table 2's control: give every row the feedback written for another row (a seeded derangement).

    Only MBPPTrain rows are passed in, so πRefine still learns from related feedback; with one row nothing moves.
    """
    if len(rows) < 2:
        return
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    donors = [(rows[i]["task_id"], rows[i]["feedback"]) for i in order]
    for j, i in enumerate(order):  # a cycle through the shuffled order: nobody keeps their own feedback
        rows[i]["feedback_from"], rows[i]["feedback"] = donors[(j + 1) % len(rows)]


def stage_train(
    cfg: Any,
    kind: str,
    records: Sequence[Any],
    base_path: str,
    opt: Any,
    out: Path,
    logger: Any = None,
) -> dict[str, Any]:
    """Fine-tune πRefine or πθ*; the HF checkpoint is the artifact's `model/` dir."""
    from ilf_lab.training import finetune

    result = finetune(
        kind,
        records,
        base_path,
        out / "model",
        opt,
        cfg.trainer,
        prompt_format=cfg.model.prompt_format,
        seed=cfg.seed,
        logger=logger,
        dtype=cfg.model.dtype,
    )
    info = {
        k: getattr(result, k)
        for k in (
            "steps",
            "epochs",
            "examples",
            "tokens",
            "target_tokens",
            "useful_fraction",
            "seconds",
            "tokens_per_s",
            "losses",
        )
    }
    return {"examples": len(records), "training": info}


def stage_refine(
    cfg: Any,
    mbpp: dict[int, Task],
    feedback_rows: list[dict],
    refiner_path: str | None,
    models: Models,
    out: Path,
    round_: int,
) -> dict[str, Any]:
    """Refinements x1 for MBPPTrain: sampled from πRefine (or the LLM's own), tested; one passing kept per task."""
    rows = [r for r in feedback_rows if r["split"] == "train"]
    fmt = cfg.model.prompt_format
    candidates: list[tuple[Task, str]] = []
    if refiner_path is not None:
        tasks = [mbpp[r["task_id"]] for r in rows]
        _, tok = models.engine(refiner_path)
        prompts = [
            refine_prompt(t, r["old_code"], r["feedback"], fmt, tok) for t, r in zip(tasks, rows, strict=True)
        ]
        samples = sample_programs(
            models,
            refiner_path,
            tasks,
            prompts,
            fmt=fmt,
            n=cfg.refine.n,
            temperature=cfg.refine.temperature,
            top_p=cfg.refine.top_p,
            max_new_tokens=cfg.refine.max_new_tokens,
            seed=cfg.seed + 2000 * round_,
        )
        candidates = [(t, prog) for t, ss in zip(tasks, samples, strict=True) for _, prog in ss]
    else:  # LLM feedback: the LLM wrote the refinement too
        candidates = [(mbpp[r["task_id"]], r["refinement"]) for r in rows if r.get("refinement")]
    verdicts = run_tests(cfg, candidates)
    kept: set[int] = set()
    out_rows = []
    for (t, prog), v in zip(candidates, verdicts, strict=True):
        keep = v.passed and t.task_id not in kept
        if keep:
            kept.add(t.task_id)
        out_rows.append(
            {"task_id": t.task_id, "program": prog, "passed": v.passed, "result": v.result, "kept": keep}
        )
    write_jsonl(out / "refinements.jsonl", out_rows)
    return {
        "refinements": len(out_rows),
        "refinements_passing": sum(r["passed"] for r in out_rows),
        "tasks": len(rows),
        "tasks_with_passing": len(kept),
    }


def stage_evaluate(
    cfg: Any,
    tasks: Sequence[Task],
    policy_path: str,
    models: Models,
    out: Path,
) -> dict[str, Any]:
    """n samples per task at T; verdicts; per-task counts and pass@k for every k <= n."""
    s = cfg.sampling
    samples = sample_programs(
        models,
        policy_path,
        tasks,
        None,
        fmt=cfg.model.prompt_format,
        n=s.n,
        temperature=s.temperature,
        top_p=s.top_p,
        max_new_tokens=s.max_new_tokens,
        seed=cfg.seed + 7,
    )
    flat = [(t, i, c, p) for t, ss in zip(tasks, samples, strict=True) for i, (c, p) in enumerate(ss)]
    verdicts = run_tests(cfg, [(t, p) for t, _, _, p in flat])
    rows, result = score([(t.task_id, i, c, p) for t, i, c, p in flat], verdicts, cfg.eval.ks, s.n)
    write_jsonl(out / "eval_samples.jsonl", rows)
    return result


def stage_evaluate_humaneval(cfg: Any, policy_path: str, models: Models, out: Path) -> dict[str, Any]:
    """Transfer: the same sampler and sandbox on HumanEval (its own prompts, or a chat rendering)."""
    from ilf_lab.data.humaneval import (
        humaneval_item,
        humaneval_program,
        humaneval_prompt,
        humaneval_stops,
        load_humaneval,
    )
    from ilf_lab.execution import run_programs
    from ilf_lab.generation import SamplingParams

    problems = load_humaneval()
    if cfg.eval.humaneval_max_problems:
        problems = problems[: cfg.eval.humaneval_max_problems]
    fmt, s = cfg.model.prompt_format, cfg.sampling
    engine, tok = models.engine(policy_path)
    params = SamplingParams(
        n=s.n,
        temperature=s.temperature,
        top_p=s.top_p,
        max_new_tokens=s.max_new_tokens,
        stop=humaneval_stops(fmt),
        seed=cfg.seed + 11,
    )
    outs = engine.generate([humaneval_prompt(p, fmt, tok) for p in problems], params, progress=True)
    flat = [
        (p, i, c, humaneval_program(p, c, fmt))
        for p, cs in zip(problems, outs, strict=True)
        for i, c in enumerate(cs)
    ]
    ex = cfg.execution
    verdicts = run_programs(
        [humaneval_item(p, prog) for p, _, _, prog in flat],
        timeout=ex.timeout,
        workers=ex.workers,
        comparison="exact",
        memory_mb=ex.memory_mb,
    )
    rows, result = score([(p.task_id, i, c, prog) for p, i, c, prog in flat], verdicts, cfg.eval.ks, s.n)
    write_jsonl(out / "humaneval_samples.jsonl", rows)
    return result


def stage_perplexity(
    cfg: Any, sources: dict[str, list[tuple[Task, str]]], base_path: str, out: Path
) -> dict[str, Any]:
    """Figure 3: per-program perplexity of each fine-tuning source under the base model (target tokens only)."""
    import torch
    import torch.nn.functional as F

    from ilf_lab.data.prompts import target_for
    from ilf_lab.models.loading import load_model

    model, tok = load_model(base_path, cfg.model.dtype)
    fmt = cfg.model.prompt_format
    rows = []
    for source, pairs in sources.items():
        for task, program in pairs:
            p_ids = tok(task_prompt(task, fmt, tok), add_special_tokens=False).input_ids
            t_ids = tok(target_for(task, program, fmt), add_special_tokens=False).input_ids
            if not t_ids:
                continue
            ids = torch.tensor([p_ids + t_ids])
            with torch.inference_mode():
                logits = model(ids).logits[0, len(p_ids) - 1 : -1]
            nll = F.cross_entropy(logits.float(), torch.tensor(t_ids))
            rows.append(
                {"source": source, "task_id": task.task_id, "ppl": float(nll.exp()), "tokens": len(t_ids)}
            )
    write_jsonl(out / "perplexity.jsonl", rows)
    by = {}
    for r in rows:
        by.setdefault(r["source"], []).append(r["ppl"])
    return {"median_ppl": {k: sorted(v)[len(v) // 2] for k, v in by.items()}, "programs": len(rows)}
