"""What the pipeline needs from experiment tracking, a tracker that does nothing, and the one failure boundary.

Tracking is a side channel: whatever goes wrong in a tracker (a bad config, no credentials, an unreachable
server, an exception while logging) must never fail the run. Implementations therefore just raise; `SafeTracker`
is the single place that catches, prints one line and carries on as a `NullTracker`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, Protocol, TypeVar, runtime_checkable

from omegaconf import DictConfig, OmegaConf

from ilf_lab.errors import ConfigError

T = TypeVar("T")

# logger.name -> implementation, for configs that do not name one with `_target_`
BY_NAME = {
    "wandb": "ilf_lab.tracking.wandb.WandbTracker",
    "none": "ilf_lab.tracking.base.NullTracker",
}


@runtime_checkable
class Tracker(Protocol):
    """One tracked pipeline run. `finish` is idempotent; `info` is what results.json records about the run."""

    @classmethod
    def from_config(cls, cfg: DictConfig) -> Tracker:
        """Build from the composed config. On the protocol itself this is `make_tracker` (the old spelling
        `Tracker.from_config(cfg)`); every implementation overrides it."""
        return make_tracker(cfg)

    @property
    def info(self) -> dict[str, Any]: ...

    def log_stage(
        self, name: str, seconds: float, cached: bool, status: str = "ok", info: dict | None = None
    ) -> None: ...

    def log_metrics(self, metrics: dict, step: int | None = None) -> None: ...

    def log_table(self, name: str, rows: list[dict]) -> None: ...

    def lightning_logger(self, prefix: str) -> Any: ...

    def finish(self, exit_code: int = 0) -> None: ...


class NullTracker:
    """Tracking off (`logger=none`, or a tracker that broke): every call does nothing."""

    @classmethod
    def from_config(cls, cfg: DictConfig | None = None) -> NullTracker:
        return cls()

    @property
    def info(self) -> dict[str, Any]:
        return {}

    def log_stage(
        self, name: str, seconds: float, cached: bool, status: str = "ok", info: dict | None = None
    ) -> None:
        pass

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        pass

    def log_table(self, name: str, rows: list[dict]) -> None:
        pass

    def lightning_logger(self, prefix: str) -> Any:
        return None

    def finish(self, exit_code: int = 0) -> None:
        pass


class SafeTracker:
    """Wraps a tracker so that nothing it does can fail the run.

    The first exception (from building the inner tracker or from any of its methods) prints one line
    `wandb: disabled (<reason>)`, closes the inner tracker as failed if it can, and from then on the wrapper is a
    `NullTracker` whose `info` records why. KeyboardInterrupt is never swallowed.
    """

    def __init__(self, build: Callable[[], Tracker]) -> None:
        self._inner: Tracker = NullTracker()
        self._info: dict[str, Any] | None = None  # frozen once disabled or finished
        self._finished = False
        self._inner = self._guard(build, NullTracker())

    @classmethod
    def from_config(cls, cfg: DictConfig) -> SafeTracker:
        """The tracker `cfg.logger` selects, wrapped: `make_tracker`."""
        return make_tracker(cfg)

    @property
    def inner(self) -> Tracker:
        """The wrapped tracker (a `NullTracker` once disabled)."""
        return self._inner

    @property
    def info(self) -> dict[str, Any]:
        if self._info is not None:
            return dict(self._info)
        return dict(self._guard(lambda: self._inner.info, {}))

    def log_stage(
        self, name: str, seconds: float, cached: bool, status: str = "ok", info: dict | None = None
    ) -> None:
        self._guard(lambda: self._inner.log_stage(name, seconds, cached, status=status, info=info), None)

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        self._guard(lambda: self._inner.log_metrics(metrics, step=step), None)

    def log_table(self, name: str, rows: list[dict]) -> None:
        self._guard(lambda: self._inner.log_table(name, rows), None)

    def lightning_logger(self, prefix: str) -> Any:
        return self._guard(lambda: self._inner.lightning_logger(prefix), None)

    def finish(self, exit_code: int = 0) -> None:
        """Finish the inner tracker once; afterwards every call is a no-op and `info` stays what the run was."""
        if self._finished:
            return
        info = self.info
        self._guard(lambda: self._inner.finish(exit_code=exit_code), None)
        if not self._finished:  # not disabled by a failing finish: keep what the run was
            self._finished, self._info, self._inner = True, info, NullTracker()

    def _guard(self, fn: Callable[[], T], default: T) -> T:
        try:
            return fn()
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # noqa: BLE001  wandb raises SystemExit-like errors too
            self._disable(f"{type(e).__name__}: {one_line(e)}")
            return default

    def _disable(self, reason: str) -> None:
        broken, self._inner = self._inner, NullTracker()
        self._finished = True
        self._info = {"mode": "disabled", "run_dir": None, "run_id": None, "reason": reason}
        print(f"wandb: disabled ({reason})", file=sys.stderr, flush=True)  # once: a NullTracker cannot fail
        try:
            broken.finish(exit_code=1)  # mark the run failed where the backend still answers
        except KeyboardInterrupt:
            raise
        except BaseException:  # noqa: BLE001, S110  already reported above
            pass


def make_tracker(cfg: DictConfig) -> Tracker:
    """The tracker `cfg.logger` asks for, behind the failure boundary: never raises (but KeyboardInterrupt).

    `cfg.logger._target_` names the class (e.g. `ilf_lab.tracking.wandb.WandbTracker`); without it
    `cfg.logger.name` picks one of `BY_NAME`. The class builds itself with `from_config(cfg)`.
    """
    return SafeTracker(lambda: _build(cfg))


def _build(cfg: DictConfig) -> Tracker:
    tracker = tracker_class(cfg).from_config(cfg)
    if not isinstance(tracker, Tracker):
        raise TypeError(f"{type(tracker).__name__} does not implement ilf_lab.tracking.Tracker")
    return tracker


def tracker_class(cfg: DictConfig) -> type:
    """The implementation class for `cfg.logger` (raises ConfigError/ImportError/TypeError when there is none)."""
    from hydra.utils import get_class

    logger = OmegaConf.select(cfg, "logger", default=None)
    if logger is None:
        raise ConfigError("no logger section in the config")
    path = logger.get("_target_")
    if not path:
        name = str(logger.get("name", "none"))
        if name not in BY_NAME:
            raise ConfigError(f"logger.name={name!r} is not one of {', '.join(BY_NAME)}")
        path = BY_NAME[name]
    cls = get_class(str(path))
    if not callable(getattr(cls, "from_config", None)):
        raise TypeError(f"{path} has no from_config(cfg): not a tracker")
    return cls


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:200] if text else "no message"
