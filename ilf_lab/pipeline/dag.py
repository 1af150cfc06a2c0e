"""ILF as a DAG of declared stages, top to bottom (Chen et al. 2023, Algorithm 1).

Each `run(Stage(...), **artifacts)` gets or computes one cached artifact; a stage sees only its config slice
and the upstream artifacts it declares, and its key covers exactly those (stage.py). The config groups pick the
implementations: `x0`, `feedback` and `train_on` name theirs with `_target_`.
"""

from __future__ import annotations

from hydra.utils import get_class
from omegaconf import DictConfig

from ilf_lab.pipeline.runner import Runner
from ilf_lab.pipeline.stages.evaluate import Evaluate, EvaluateHumanEval
from ilf_lab.pipeline.stages.perplexity import Perplexity
from ilf_lab.pipeline.stages.refine import LLMRefinements, SampledRefinements
from ilf_lab.pipeline.stages.tasks import Tasks
from ilf_lab.pipeline.stages.train import TrainPolicy, TrainRefiner
from ilf_lab.pipeline.stages.x0 import PolicyX0


def ilf(cfg: DictConfig, run: Runner) -> None:
    base = run.model()                                      # πθ, the base policy
    tasks = run(Tasks(), data=run.data())                   # MBPP's splits, the human annotations
    source = get_class(cfg.train_on._target_)()             # πθ*'s fine-tuning data: the Table 4 row
    X0, Feedback = get_class(cfg.x0._target_), get_class(cfg.feedback._target_)
    writer = run.model(feedback_model(cfg.feedback)) if feedback_model(cfg.feedback) else base
    policy, refined = base, None
    for r in range(1, cfg.rounds + 1):
        run.round = r
        if not source.inputs:                               # zero-shot: no feedback, no fine-tuning
            break
        x0 = run((X0 if r == 1 else PolicyX0)(round=r), tasks=tasks, policy=policy)  # failing programs
        fb = run(Feedback(), tasks=tasks, x0=x0, model=writer)          # feedback f (an LLM writes x1 too)
        if "refine" in source.inputs and Feedback.writes_refinements:
            refined = run(LLMRefinements(round=r), tasks=tasks, feedback=fb)
        elif "refine" in source.inputs:                     # πRefine (or the base model, zero-shot) refines
            refiner = base if cfg.refine.refiner == "base" else run.trained(
                run(TrainRefiner(), tasks=tasks, feedback=fb, model=base), otherwise=base)
            refined = run(SampledRefinements(round=r), tasks=tasks, feedback=fb, model=refiner)
        trained = run(TrainPolicy(source), tasks=tasks, model=policy, feedback=fb, refine=refined)
        policy = run.trained(trained, otherwise=policy)     # πθ* (nothing passed: the policy stays)
    if cfg.eval.perplexity:                                 # Figure 3
        run(Perplexity(with_refinements=refined is not None), tasks=tasks, model=base, refine=refined)
    run(Evaluate.for_split(cfg.eval.split), tasks=tasks, model=policy)  # pass@k on MBPPTest
    if "humaneval" in cfg.eval.benchmarks:                  # transfer
        run(EvaluateHumanEval(), model=policy)


def feedback_model(feedback: DictConfig) -> dict | None:
    """A model other than the base model that writes LLM feedback locally (`feedback.model` with backend hf)."""
    if feedback.get("backend") == "hf" and feedback.get("model"):
        return {"source": "hub", "path": feedback.model}
    return None
