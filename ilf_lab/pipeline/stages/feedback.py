"""Stage `feedback`: (task, x0, f[, x1]) per task, from people or from an LLM (the `feedback` config group).

`HumanFeedback` joins x0 with the annotations (Table 2's control shuffles MBPPTrain's feedback between tasks);
`LLMFeedback` asks a model, k-shot from MBPPRefine's annotations, for feedback and a refinement (the paper's
InstructGPT rows; `feedback.backend` picks a local model or an OpenAI-compatible endpoint).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ilf_lab.io import read_jsonl, write_jsonl
from ilf_lab.pipeline.stage import Artifact, Stage, at, nested
from ilf_lab.pipeline.stages.common import SAMPLING_VERSION, EngineConfig, engine_for
from ilf_lab.pipeline.stages.tasks import TaskSet


class FeedbackStage(Stage):
    """The feedback stage's interface (the `feedback` config group's `_target_` names a subclass)."""

    name = "feedback"
    writes_refinements: ClassVar[bool] = False  # True: the rows carry x1 too, and no πRefine is trained
    provider: ClassVar[str]  # feedback.provider: how results.json and the report name it


@dataclass(frozen=True)
class HumanFeedbackConfig:
    shuffle: bool = at("feedback.shuffle")
    seed: int = at("seed")


class HumanFeedback(FeedbackStage):
    """The annotators' feedback and refinement for each annotated x0."""

    Config = HumanFeedbackConfig
    inputs = ("tasks", "x0")
    provider = "human"

    def run(self, inputs: dict[str, Artifact], cfg: HumanFeedbackConfig, out: Path) -> dict[str, Any]:
        anns = TaskSet.read(inputs["tasks"]).annotations
        rows = [
            {
                "task_id": r["task_id"],
                "split": r["split"],
                "old_code": r["old_code"],
                "feedback": anns[r["task_id"]].feedback,
                "refinement": anns[r["task_id"]].refinement,
            }
            for r in read_jsonl(inputs["x0"].file("x0.jsonl"))
            if r["task_id"] in anns
        ]
        if cfg.shuffle:
            shuffle_feedback([r for r in rows if r["split"] == "train"], cfg.seed)
        write_jsonl(out / "feedback.jsonl", rows)
        return {"feedback": len(rows), "provider": "human", "shuffled": bool(cfg.shuffle)}


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


@dataclass(frozen=True)
class LLMFeedbackConfig:
    shots: int = at("feedback.shots")
    backend: str = at("feedback.backend")
    model: str | None = at("feedback.model")
    base_url: str | None = at("feedback.base_url")
    api_key_env: str = at("feedback.api_key_env")
    max_concurrency: int = at("feedback.max_concurrency")
    max_retries: int = at("feedback.max_retries")
    n: int = at("feedback.n")
    temperature: float = at("feedback.temperature")
    top_p: float = at("feedback.top_p")
    max_new_tokens: int = at("feedback.max_new_tokens")
    num_tasks: int | None = at("feedback.num_tasks")
    prompt_format: str = at("model.prompt_format")
    engine: EngineConfig = nested()
    seed: int = at("seed")


class LLMFeedback(FeedbackStage):
    """An LLM's feedback and refinement for each MBPPTrain x0, k-shot from MBPPRefine's human annotations:
    `feedback.n` replies per x0 at `feedback.temperature` (§3.3: "30 output samples at temperature 0.8 for all
    stages"; the paper gives no separate setting for Table 4's InstructGPT rows, so using §3.3's is our
    reading); the refine stage keeps one passing refinement per task.

    `model` is the model that writes (the base model unless `feedback.model` names another); an endpoint
    backend ignores it."""

    version = SAMPLING_VERSION
    Config = LLMFeedbackConfig
    inputs = ("tasks", "x0", "model")
    writes_refinements = True
    provider = "llm"

    def run(self, inputs: dict[str, Artifact], cfg: LLMFeedbackConfig, out: Path) -> dict[str, Any]:
        from ilf_lab.feedback import HFBackend, OpenAIBackend, llm_feedback

        ts = TaskSet.read(inputs["tasks"])
        pool = [ts.annotations[i] for i in sorted(ts.splits["refine_annotated"])]
        shot_anns = random.Random(cfg.seed).sample(pool, min(cfg.shots, len(pool)))
        shots = [(ts.tasks[a.task_id], a.old_code, a.feedback, a.refinement) for a in shot_anns]
        items_rows = [r for r in read_jsonl(inputs["x0"].file("x0.jsonl")) if r["split"] == "train"]
        if cfg.num_tasks is not None:
            items_rows = items_rows[: cfg.num_tasks]
        items = [(ts.tasks[r["task_id"]], r["old_code"]) for r in items_rows]
        if cfg.backend == "openai":
            backend: Any = OpenAIBackend(
                cfg.base_url, cfg.model, cfg.api_key_env, cfg.max_concurrency, cfg.max_retries
            )
        else:
            engine, tok = engine_for(str(inputs["model"].path), cfg.engine)
            backend = HFBackend(engine, tok, cfg.prompt_format if not cfg.model else "chat")
        rows = llm_feedback(
            items, shots, backend, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed,
            n=cfg.n, top_p=cfg.top_p,
        )
        for r in rows:
            r["split"] = "train"
        write_jsonl(out / "feedback.jsonl", rows)
        return {
            "feedback": len(rows),
            "provider": "llm",
            "shots": [a.task_id for a in shot_anns],
            "with_refinement": sum(r["refinement"] is not None for r in rows),
        }
