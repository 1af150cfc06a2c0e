"""Weights & Biases for the pipeline (architecture contract 5).

Offline by default (no account, no network; `wandb sync <run_dir>` uploads later). This class just raises on
any W&B problem: `make_tracker` wraps it in `SafeTracker`, which turns failures into one line on stderr and a
no-op tracker, so W&B never fails a run. What the run is called and where it writes: `wandb_settings`.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ilf_lab.errors import ConfigError
from ilf_lab.tracking.base import NullTracker, Tracker
from ilf_lab.tracking.wandb_settings import RunSettings, has_credentials, run_settings


class WandbTracker:
    """One open W&B run for one pipeline run (a Hydra multirun job gets a fresh one each)."""

    def __init__(self, run: Any, settings: RunSettings) -> None:
        self._run = run
        self.settings = settings
        self._stages: list[list[Any]] = []
        self._info = {
            "mode": settings.mode,
            "run_dir": str(getattr(run.settings, "sync_dir", None) or Path(run.dir).parent),
            "group": settings.group,
            "run_id": run.id,
        }

    @classmethod
    def from_config(cls, cfg: DictConfig) -> Tracker:
        """Start the run that `cfg` (and the environment, and Hydra) describes; mode `disabled` -> NullTracker."""
        settings = run_settings(cfg)
        if settings.mode == "disabled":
            return NullTracker()
        return cls.start(settings)

    @classmethod
    def start(cls, s: RunSettings) -> WandbTracker:
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        os.environ.setdefault("WANDB_CONSOLE", "off")
        if s.mode == "online" and not has_credentials():
            raise ConfigError("online mode but no W&B API key (run `wandb login`, or logger.mode=offline)")
        if s.dir:
            Path(s.dir).mkdir(parents=True, exist_ok=True)
        run = wandb.init(
            project=s.project,
            entity=s.entity,
            mode=s.mode,
            group=s.group,
            name=s.name,
            job_type=s.job_type,
            tags=s.tags or None,
            dir=s.dir,
            config=s.config,
            reinit="create_new",  # a Hydra multirun runs its jobs in one process: never reuse the last run
            settings=wandb.Settings(
                silent=True, console="off", init_timeout=float(os.environ.get("WANDB_INIT_TIMEOUT", 30))
            ),
        )
        return cls(run, s)

    @property
    def info(self) -> dict[str, Any]:
        """mode, run_dir (for `wandb sync`), group and run_id."""
        return dict(self._info)

    @property
    def run(self) -> Any:
        """The underlying `wandb.Run` (None once finished)."""
        return self._run

    def log_stage(
        self, name: str, seconds: float, cached: bool, status: str = "ok", info: dict | None = None
    ) -> None:
        """One pipeline stage: its time and whether it came from the cache (summary + a table at finish)."""
        self._stages.append([name, bool(cached), float(seconds), status, json.dumps(info or {}, default=str)])
        metrics: dict[str, Any] = {
            f"stage/{name}/seconds": float(seconds),
            f"stage/{name}/cached": int(bool(cached)),
        }
        metrics.update({f"stage/{name}/{k}": v for k, v in _flatten(info or {}).items() if _is_number(v)})
        self._log_and_summarise(metrics)
        self._open().summary[f"stage/{name}/status"] = status

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        """Scalar metrics (nested dicts flattened with '/'); each is also the run's summary value.

        `step` is recorded as the metric `pipeline/step`, not as W&B's own step, so that it never conflicts
        with the training curves Lightning logs into the same run.
        """
        flat = {k: v for k, v in _flatten(metrics).items() if v is not None}
        if step is not None:
            flat["pipeline/step"] = step
        self._log_and_summarise(flat)

    def log_table(self, name: str, rows: list[dict]) -> None:
        """A W&B Table (samples, feedback, refinements with their verdicts); columns = union of row keys."""
        if not rows:
            return
        cols: list[str] = list(dict.fromkeys(k for r in rows for k in r))
        self._log_table(name, cols, [[_cell(r.get(c)) for c in cols] for r in rows])

    def lightning_logger(self, prefix: str) -> Any:
        """A Lightning `WandbLogger` writing into this run (keys `<prefix>-...`)."""
        from pytorch_lightning.loggers import WandbLogger

        return WandbLogger(experiment=self._open(), prefix=prefix, log_model=False)

    def finish(self, exit_code: int = 0) -> None:
        """Log the stage table and close the run (idempotent); offline files are flushed by `run.finish`."""
        if self._run is None:
            return
        try:
            if self._stages:
                self._log_table("stages", ["name", "cached", "seconds", "status", "info"], self._stages)
        finally:
            run, self._run = self._run, None
            run.finish(exit_code=exit_code)

    def _open(self) -> Any:
        if self._run is None:
            raise RuntimeError("the W&B run is already finished")
        return self._run

    def _log_table(self, name: str, cols: list[str], data: list[list[Any]]) -> None:
        import wandb

        self._open().log({name: wandb.Table(columns=cols, data=data)})

    def _log_and_summarise(self, metrics: dict[str, Any]) -> None:
        run = self._open()
        run.log(metrics)
        for k, v in metrics.items():
            run.summary[k] = v


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _cell(v: Any) -> Any:
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    return json.dumps(v, default=str)
