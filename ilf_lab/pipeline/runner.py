"""Runs declared stages through the cache: builds each one's slice, derives its key, records what happened.

`Runner.__call__(stage, **available)` hands the stage only the upstream artifacts it declares and only its slice;
the content-keyed sources (`data`, the base `model`) come from `Runner.data` / `Runner.model`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ilf_lab.config import STAGES  # results.json lists each, skipped ones too
from ilf_lab.pipeline.cache import StageCache
from ilf_lab.pipeline.stage import Artifact, Stage, content_key, select, stage_key
from ilf_lab.results import StageRecord

log = logging.getLogger("ilf_lab.pipeline")



class StopAfter(Exception):
    """Raised once the stage named by `stop_after` is recorded: the run ends there (results without pass@k)."""


class Runner:
    def __init__(self, cfg: DictConfig, cache: StageCache, tracker: Any, rounds: int = 1):
        self.cfg, self.cache, self.tracker = cfg, cache, tracker
        self.rows: list[StageRecord] = []
        self.done: dict[str, Artifact] = {}  # the last artifact of each stage name (results.json reads these)
        self.graph: dict[str, tuple[Stage, dict[str, str]]] = {}  # stage -> (instance, {input: upstream stage})
        self.rounds, self.round = rounds, 1

    # ---------------------------------------------------------------------------------------- sources

    def data(self) -> Artifact:
        """MBPP and the annotation records, keyed by their content (not by file names, sizes or mtimes)."""
        from ilf_lab.data.mbpp import load_annotation_records, load_mbpp_records
        from ilf_lab.io import write_jsonl

        mbpp, anns = load_mbpp_records(self.cfg.data), load_annotation_records(self.cfg.data)
        key = content_key("data", {"mbpp": mbpp, "annotations": anns})

        def write(out: Path) -> dict[str, Any]:
            write_jsonl(out / "mbpp.jsonl", mbpp)
            write_jsonl(out / "annotations.jsonl", anns)
            return {"mbpp": len(mbpp), "annotations": len(anns)}

        return self.cache.run("data", key, write)

    def model(self, model_cfg: Any = None) -> Artifact:
        """The base model as a local HF dir, keyed by what it is (weights' content, a hub snapshot's commit, or the
        tiny builder's settings). The DAG asks for it first, so what cannot work on this machine fails before any
        stage runs, in one line: a hub model neither cached nor reachable, trainer settings this machine lacks."""
        from ilf_lab.models.loading import model_identity, resolve_model_dir
        from ilf_lab.training.finetune import check_trainer

        check_trainer(self.cfg.trainer)
        model_cfg = model_cfg if model_cfg is not None else self.cfg.model
        path = resolve_model_dir(model_cfg, self.cfg.paths.cache_dir)
        return Artifact("model", content_key("model", model_identity(model_cfg, path)), Path(path), cached=True)

    # ----------------------------------------------------------------------------------------- stages

    def __call__(self, stage: Stage, **available: Artifact | None) -> Artifact:
        """Run (or fetch) `stage` on the upstream artifacts it declares, picked from `available`."""
        missing = [n for n in stage.inputs if available.get(n) is None]
        if missing:
            raise RuntimeError(f"stage {stage.name} needs {', '.join(missing)}, which this run did not produce")
        inputs = {n: available[n] for n in stage.inputs}
        slice_ = select(type(stage).Config, self.cfg)
        key = stage_key(stage, slice_, {n: a.key for n, a in inputs.items()})
        if hasattr(stage, "scratch"):  # training: checkpoints that survive a kill of this key
            stage.scratch = self.cache.scratch(stage.name, key)
            stage.logger = self._train_logger(stage.name)
        def compute(out: Path) -> dict[str, Any]:
            sizes = {n: _brief(a.meta) for n, a in inputs.items() if _brief(a.meta)}
            log.info("stage %-14s start    %s", self._name(stage.name), json.dumps(sizes)[:160])
            return stage.run(inputs, slice_, out)

        art = self.cache.run(stage.name, key, compute)
        self.done[stage.name] = art
        self.graph[stage.name] = (stage, {n: a.stage for n, a in inputs.items()})
        empty = _is_empty(stage.name, art.meta)
        info = {k: v for k, v in art.meta.items() if k not in ("per_task", "training")}
        self._record(StageRecord(self._name(stage.name), art.cached, round(art.seconds, 3), key,
                                 "empty" if empty else "ok", info))
        return art

    def skip(self, name: str, status: str = "skipped", **info: Any) -> None:
        self._record(StageRecord(self._name(name), status=status, info=info))

    def trained(self, art: Artifact, otherwise: Artifact) -> Artifact:
        """The model a training stage published, or `otherwise` when it had nothing to train on."""
        if not art.meta.get("examples"):
            return otherwise
        return Artifact(art.stage, art.key, art.file("model"), cached=art.cached)

    def _name(self, name: str) -> str:
        return f"{name}[{self.round}]" if self.rounds > 1 and name in STAGES[1:6] else name

    def _record(self, row: StageRecord) -> None:
        base = row.name.split("[")[0]
        if base in STAGES and row.key is not None:  # the stages of the round it skipped, in order
            seen = {r.name for r in self.rows}
            for name in STAGES[: STAGES.index(base)]:
                if self._name(name) not in seen and name not in seen:
                    self._record(StageRecord(self._name(name), status="skipped"))
        self.rows.append(row)
        how = "skipped" if row.key is None else ("cached" if row.cached else f"ran in {row.seconds:.1f} s")
        log.info("stage %-14s %-8s %s %s", row.name, row.status, how, json.dumps(row.info, default=str)[:160])
        self.tracker.log_stage(row.name, row.seconds, row.cached, status=row.status, info=row.info)
        if row.name.split("[")[0] == self.cfg.stop_after:
            raise StopAfter(row.name)

    def _train_logger(self, stage: str) -> Any:
        """Training curves go to the run's tracker when training stays in this process (one device)."""
        t = self.cfg.trainer
        single = str(t.devices) in ("1", "auto") and t.num_nodes == 1
        prefix = {"train_refiner": "refiner", "train_policy": "policy"}[stage]
        return self.tracker.lightning_logger(prefix) if single else None


def _brief(meta: dict[str, Any]) -> dict[str, int]:
    """The counts in an artifact's metadata (how big an input is), for the stage's start line."""
    return {k: v for k, v in meta.items() if isinstance(v, int) and not isinstance(v, bool)}


def _is_empty(stage: str, meta: dict[str, Any]) -> bool:
    """A stage that ran but produced nothing to go on (no x0, no passing refinement, no training data)."""
    field_ = {"x0": "x0", "feedback": "feedback", "refine": "tasks_with_passing", "train_refiner": "examples",
              "train_policy": "examples"}.get(stage)
    return field_ is not None and not meta.get(field_)
