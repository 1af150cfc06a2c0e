"""Stage `perplexity` (Figure 3): how surprising each fine-tuning source is to the base model.

Per program, the perplexity of its target tokens given the task prompt, for MBPP's gold programs, the human
refinements and (when the run has them) πRefine's kept refinements of the annotated MBPPTrain tasks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ilf_lab.io import read_jsonl, write_jsonl
from ilf_lab.pipeline.stage import Artifact, Stage, at
from ilf_lab.pipeline.stages.tasks import TaskSet, first


@dataclass(frozen=True)
class PerplexityConfig:
    max_train_tasks: int | None = at("data.max_train_tasks")
    prompt_format: str = at("model.prompt_format")
    dtype: str = at("model.dtype")


class Perplexity(Stage):
    """Inputs: `model` (the base model), `tasks`, and `refine` when the run sampled refinements."""

    name = "perplexity"
    Config = PerplexityConfig

    def __init__(self, with_refinements: bool):
        self.inputs = ("tasks", "model", "refine") if with_refinements else ("tasks", "model")

    def run(self, inputs: dict[str, Artifact], cfg: PerplexityConfig, out: Path) -> dict[str, Any]:
        import torch
        import torch.nn.functional as F

        from ilf_lab.data.prompts import target_for, task_prompt
        from ilf_lab.models.loading import load_model

        ts = TaskSet.read(inputs["tasks"])
        train = [ts.tasks[i] for i in first(ts.splits["train_annotated"], cfg.max_train_tasks)]
        sources = {
            "mbpp_gold": [(t, t.code) for t in train],
            "human_refinements": [(t, ts.annotations[t.task_id].refinement) for t in train],
        }
        if "refine" in inputs:
            rows = read_jsonl(inputs["refine"].file("refinements.jsonl"))
            sources["refinements"] = [(ts.tasks[x["task_id"]], x["program"]) for x in rows if x["kept"]]
        model, tok = load_model(str(inputs["model"].path), cfg.dtype)
        fmt, out_rows = cfg.prompt_format, []
        for source, pairs in sources.items():
            for task, program in pairs:
                p_ids = tok(task_prompt(task, fmt, tok), add_special_tokens=False).input_ids
                t_ids = tok(target_for(task, program, fmt), add_special_tokens=False).input_ids
                if not t_ids:
                    continue
                with torch.inference_mode():
                    logits = model(torch.tensor([p_ids + t_ids])).logits[0, len(p_ids) - 1 : -1]
                nll = F.cross_entropy(logits.float(), torch.tensor(t_ids))
                out_rows.append(
                    {"source": source, "task_id": task.task_id, "ppl": float(nll.exp()), "tokens": len(t_ids)}
                )
        write_jsonl(out / "perplexity.jsonl", out_rows)
        by: dict[str, list[float]] = {}
        for r in out_rows:
            by.setdefault(r["source"], []).append(r["ppl"])
        return {"median_ppl": {k: sorted(v)[len(v) // 2] for k, v in by.items()}, "programs": len(out_rows)}
