"""Stages `evaluate` (MBPPTest, or MBPPRefine for model selection) and `evaluate_humaneval` (transfer):
n samples per task at T from πθ*, run against every test, pass@k for each k <= n.

The evaluation subset (`data.max_test_tasks`) and `eval.*` live in these keys only, so changing them never
recomputes the stages before.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ilf_lab.io import write_jsonl
from ilf_lab.pipeline.stage import Artifact, Stage, at, nested
from ilf_lab.pipeline.stages.common import (
    SAMPLING_VERSION,
    EngineConfig,
    ExecConfig,
    SampleConfig,
    engine_for,
    run_tests,
    sample_programs,
    score,
    test_items,
)
from ilf_lab.pipeline.stages.tasks import TaskSet, first


@dataclass(frozen=True)
class EvaluateConfig:
    split: str = at("eval.split")
    max_tasks: int | None = at("data.max_test_tasks")
    ks: tuple[int, ...] = at("eval.ks")
    sample: SampleConfig = at("sampling")
    engine: EngineConfig = nested()
    execution: ExecConfig = nested()
    prompt_format: str = at("model.prompt_format")
    seed: int = at("seed")


class Evaluate(Stage):
    """πθ* (input `model`) on MBPP: the first `max_tasks` of MBPPTest (or of MBPPRefine, eval.split=refine).
    `for_split` picks the implementation for `eval.split`."""

    version = SAMPLING_VERSION
    name = "evaluate"
    Config = EvaluateConfig
    inputs = ("tasks", "model")

    @staticmethod
    def for_split(split: str) -> Evaluate:
        return EvaluateTrain() if split == "train" else Evaluate()

    @staticmethod
    def task_ids(ts: TaskSet, cfg: EvaluateConfig) -> list[int]:
        return first(ts.splits[cfg.split], cfg.max_tasks)

    def run(self, inputs: dict[str, Artifact], cfg: EvaluateConfig, out: Path) -> dict[str, Any]:
        ts = TaskSet.read(inputs["tasks"])
        tasks = [ts.tasks[i] for i in self.task_ids(ts, cfg)]
        samples = sample_programs(
            str(inputs["model"].path), cfg.engine, tasks, None, cfg.sample, fmt=cfg.prompt_format, seed=cfg.seed + 7
        )
        flat = [(t, i, c, p) for t, ss in zip(tasks, samples, strict=True) for i, (c, p) in enumerate(ss)]
        verdicts = run_tests(cfg.execution, test_items([(t, p) for t, _, _, p in flat]))
        rows, result = score([(t.task_id, i, c, p) for t, i, c, p in flat], verdicts, cfg.ks, cfg.sample.n)
        write_jsonl(out / "eval_samples.jsonl", rows)
        return result


@dataclass(frozen=True)
class EvaluateTrainConfig(EvaluateConfig):
    max_tasks: int | None = at("data.max_train_tasks")


class EvaluateTrain(Evaluate):
    """Table 3's baseline: the policy's own programs on the annotated MBPPTrain tasks (the first
    `data.max_train_tasks`, the tasks the refine stage refines), eval.split=train."""

    Config = EvaluateTrainConfig

    @staticmethod
    def task_ids(ts: TaskSet, cfg: EvaluateConfig) -> list[int]:
        return first(ts.splits["train_annotated"], cfg.max_tasks)


@dataclass(frozen=True)
class EvaluateHumanEvalConfig:
    max_problems: int | None = at("eval.humaneval_max_problems")
    ks: tuple[int, ...] = at("eval.ks")
    sample: SampleConfig = at("sampling")
    engine: EngineConfig = nested()
    execution: ExecConfig = nested()
    prompt_format: str = at("model.prompt_format")
    seed: int = at("seed")


class EvaluateHumanEval(Stage):
    """Transfer: the same sampler and sandbox on HumanEval's problems (its own `check` tests, exact)."""

    version = SAMPLING_VERSION
    name = "evaluate_humaneval"
    Config = EvaluateHumanEvalConfig
    inputs = ("model",)

    def run(self, inputs: dict[str, Artifact], cfg: EvaluateHumanEvalConfig, out: Path) -> dict[str, Any]:
        from ilf_lab.data.humaneval import (
            humaneval_item,
            humaneval_program,
            humaneval_prompt,
            humaneval_stops,
            load_humaneval,
        )
        from ilf_lab.generation import SamplingParams

        problems = load_humaneval()[: cfg.max_problems or None]
        fmt, s = cfg.prompt_format, cfg.sample
        engine, tok = engine_for(str(inputs["model"].path), cfg.engine)
        params = SamplingParams(
            n=s.n, temperature=s.temperature, top_p=s.top_p, max_new_tokens=s.max_new_tokens,
            stop=humaneval_stops(fmt), seed=cfg.seed + 11,
        )
        outs = engine.generate([humaneval_prompt(p, fmt, tok) for p in problems], params, progress=True)
        flat = [
            (p, i, c, humaneval_program(p, c, fmt)) for p, cs in zip(problems, outs, strict=True) for i, c in enumerate(cs)
        ]
        verdicts = run_tests(cfg.execution, [humaneval_item(p, prog) for p, _, _, prog in flat], comparison="exact")
        rows, result = score([(p.task_id, i, c, prog) for p, i, c, prog in flat], verdicts, cfg.ks, s.n)
        write_jsonl(out / "humaneval_samples.jsonl", rows)
        return result
