"""Weights & Biases for the pipeline (architecture contract 5).

Offline by default (no account, no network; `wandb sync <run_dir>` uploads later); `logger=none` turns it off.
Every job of a Hydra sweep is its own W&B run and all jobs of one sweep share one group, derived from the sweep
directory. Tracking is a side channel: any W&B failure (unknown mode, no credentials, unreachable server, an
exception while logging) turns the tracker into a no-op with one line on stderr, and never fails the run.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

_MODES = ("offline", "online", "disabled")
_MAX_TAG = 64  # W&B rejects longer tags


class Tracker:
    """One W&B run for one pipeline run; a no-op when disabled or broken.

    Usage (the pipeline): ``tracker = Tracker.from_config(cfg); tracker.start()`` then ``log_*`` while running,
    and ``tracker.finish(code)`` in a ``finally``. Every method is safe to call in any state.
    """

    def __init__(
        self,
        *,
        enabled: bool,
        project: str = "ilf_lab",
        entity: str | None = None,
        mode: str = "offline",
        group: str | None = None,
        name: str | None = None,
        job_type: str | None = None,
        tags: list[str] | None = None,
        dir: str | None = None,
        config: dict[str, Any] | None = None,
        reason: str | None = None,
    ) -> None:
        self.enabled = enabled
        self.project = project
        self.entity = entity
        self.mode = mode
        self.group = group
        self.name = name
        self.job_type = job_type
        self.tags = list(tags or [])
        self.dir = dir
        self.config: dict[str, Any] = dict(config or {})
        self._run: Any = None
        self._finished = False
        self._started = False
        self._stages: list[dict[str, Any]] = []
        self.info: dict[str, Any] = {
            "mode": mode if enabled else "disabled",
            "run_dir": None,
            "group": group,
            "run_id": None,
        }
        if not enabled and reason:
            self._disable(reason)

    # ------------------------------------------------------------------------------------------ construction

    @classmethod
    def from_config(cls, cfg: DictConfig) -> Tracker:
        """Build the tracker for the composed config (`cfg.logger`) and the Hydra job it runs in."""
        try:
            lg = cfg.logger
            name = str(OmegaConf.select(cfg, "logger.name", default="none"))
            mode = str(OmegaConf.select(cfg, "logger.mode", default="offline"))
        except Exception as e:  # a config without a logger section: no tracking, and say so
            return cls(enabled=False, mode="disabled", reason=f"no logger config ({e})")
        if name == "none" or mode == "disabled":
            return cls(enabled=False, mode="disabled")  # asked for: silent
        hydra = _hydra_job()
        experiment = str(OmegaConf.select(cfg, "name", default="run"))
        group = OmegaConf.select(cfg, "logger.group", default=None) or _derive_group(hydra, experiment)
        overrides = hydra.get("override_dirname") or ""
        run_name = f"{experiment} {overrides}".strip() if overrides else experiment
        if hydra.get("multirun") and hydra.get("job_num") is not None:
            run_name = f"{hydra['job_num']}:{run_name}"
        tags = [f"experiment:{experiment}"]
        for key in ("feedback.name", "train_on.source", "model.name", "scale"):
            value = OmegaConf.select(cfg, key, default=None)
            if value is not None:
                tags.append(f"{key.split('.')[0]}:{value}")
        tags.append("sweep" if hydra.get("multirun") else "single")
        tags += [str(t) for t in (OmegaConf.select(cfg, "logger.tags", default=None) or [])]
        config = _config_dict(cfg)
        if hydra:
            config["_hydra"] = {k: v for k, v in hydra.items() if k != "multirun"}
        kwargs = dict(
            project=str(lg.get("project") or "ilf_lab"),
            entity=OmegaConf.select(cfg, "logger.entity", default=None),
            mode=mode,
            group=str(group) if group is not None else None,
            name=run_name[:128],
            job_type="sweep_job" if hydra.get("multirun") else "experiment",
            tags=[t[:_MAX_TAG] for t in dict.fromkeys(tags)],
            dir=_logger_dir(cfg),
            config=config,
        )
        if name != "wandb":
            return cls(enabled=False, reason=f"logger.name={name!r} is not one of wandb, none", **kwargs)
        if mode not in _MODES:
            return cls(
                enabled=False, reason=f"logger.mode={mode!r} is not one of {', '.join(_MODES)}", **kwargs
            )
        return cls(enabled=True, **kwargs)

    # ------------------------------------------------------------------------------------------ lifecycle

    def start(self) -> Tracker:
        """Create the W&B run (once). Failures disable the tracker instead of raising."""
        if not self.enabled or self._started:
            return self
        self._started = True
        try:
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            os.environ.setdefault("WANDB_CONSOLE", "off")
            if self.mode == "online" and not _has_credentials():
                raise RuntimeError(
                    "online mode but no W&B API key (run `wandb login`, or logger.mode=offline)"
                )
            if self.dir:
                Path(self.dir).mkdir(parents=True, exist_ok=True)
            settings = wandb.Settings(
                silent=True,
                console="off",
                init_timeout=float(os.environ.get("WANDB_INIT_TIMEOUT", 30)),
            )
            self._run = wandb.init(
                project=self.project,
                entity=self.entity,
                mode=self.mode,
                group=self.group,
                name=self.name,
                job_type=self.job_type,
                tags=self.tags or None,
                dir=self.dir,
                config=self.config,
                # a Hydra multirun runs its jobs in one process: every job gets a fresh run
                reinit="create_new",
                settings=settings,
            )
            self.info.update(
                mode=self.mode,
                run_dir=str(getattr(self._run.settings, "sync_dir", None) or Path(self._run.dir).parent),
                group=self.group,
                run_id=self._run.id,
            )
        except BaseException as e:  # noqa: BLE001  wandb raises SystemExit/KeyboardInterrupt-like errors too
            if isinstance(e, KeyboardInterrupt):
                raise
            self._disable(f"{type(e).__name__}: {_one_line(e)}")
        return self

    def log_config(self, cfg: DictConfig | dict | None = None) -> Tracker:
        """Start the run (if not yet) and log the resolved config (merged into the run's config)."""
        if cfg is not None:
            extra = _config_dict(cfg) if isinstance(cfg, DictConfig) else dict(cfg)
            self.config.update(extra)
            if self._run is not None:
                self._safe(lambda: self._run.config.update(extra, allow_val_change=True))
        return self.start()

    def finish(self, exit_code: int = 0) -> None:
        """Close the run (idempotent): log the stage table, flush the offline files."""
        if self._finished:
            return
        self._finished = True
        run, self._run = self._run, None
        if run is None:
            return
        try:
            if self._stages:
                import wandb

                cols = ["name", "cached", "seconds", "status", "info"]
                rows = [[s["name"], s["cached"], s["seconds"], s["status"], s["info"]] for s in self._stages]
                run.log({"stages": wandb.Table(columns=cols, data=rows)})
        except Exception:
            pass
        try:
            run.finish(exit_code=exit_code)
        except Exception as e:
            self._say(f"wandb: finish failed ({type(e).__name__}: {_one_line(e)})")

    @property
    def active(self) -> bool:
        """True while a W&B run is open."""
        return self._run is not None

    @property
    def run(self) -> Any:
        """The underlying `wandb.Run`, or None."""
        return self._run

    # ------------------------------------------------------------------------------------------ logging

    def log_stage(
        self, name: str, seconds: float, cached: bool, status: str = "ok", info: dict | None = None
    ) -> None:
        """One pipeline stage: its time and whether it came from the cache (summary + a table at finish)."""
        self._stages.append(
            {
                "name": name,
                "cached": bool(cached),
                "seconds": float(seconds),
                "status": status,
                "info": json.dumps(info or {}, default=str),
            }
        )
        if self._ensure() is None:
            return
        metrics: dict[str, Any] = {
            f"stage/{name}/seconds": float(seconds),
            f"stage/{name}/cached": int(bool(cached)),
        }
        for k, v in _flatten(info or {}).items():
            if _is_number(v):
                metrics[f"stage/{name}/{k}"] = v
        self._safe(lambda: self._log_and_summarise(metrics))
        self._safe(lambda: self._run.summary.__setitem__(f"stage/{name}/status", status))

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        """Scalar metrics (nested dicts flattened with '/'); each is also the run's summary value.

        `step` is recorded as the metric `pipeline/step`, not as W&B's own step, so that it never conflicts
        with the training curves Lightning logs into the same run.
        """
        if self._ensure() is None:
            return
        flat = {k: v for k, v in _flatten(metrics).items() if v is not None}
        if step is not None:
            flat["pipeline/step"] = step
        self._safe(lambda: self._log_and_summarise(flat))

    def log_table(self, name: str, rows: list[dict]) -> None:
        """A W&B Table (samples, feedback, refinements with their verdicts); columns = union of row keys."""
        if not rows or self._ensure() is None:
            return

        def _do() -> None:
            import wandb

            cols: list[str] = list(dict.fromkeys(k for r in rows for k in r))
            data = [[_cell(r.get(c)) for c in cols] for r in rows]
            self._run.log({name: wandb.Table(columns=cols, data=data)})

        self._safe(_do)

    def lightning_logger(self, prefix: str) -> Any:
        """A Lightning `WandbLogger` writing into this run (keys `<prefix>-...`), or None when disabled."""
        if self._ensure() is None:
            return None
        try:
            from pytorch_lightning.loggers import WandbLogger

            return WandbLogger(experiment=self._run, prefix=prefix, log_model=False)
        except Exception as e:
            self._say(f"wandb: no Lightning logger ({type(e).__name__}: {_one_line(e)})")
            return None

    # ------------------------------------------------------------------------------------------ internals

    def _ensure(self) -> Any:
        """The open run, starting it on first use (the pipeline need not call `start`)."""
        if self.enabled and not self._started and not self._finished:
            self.start()
        return self._run

    def _log_and_summarise(self, metrics: dict[str, Any]) -> None:
        self._run.log(metrics)
        for k, v in metrics.items():
            self._run.summary[k] = v

    def _safe(self, fn: Any) -> None:
        try:
            fn()
        except Exception as e:
            run, self._run = self._run, None
            self._disable(f"{type(e).__name__}: {_one_line(e)}")
            try:
                if run is not None:
                    run.finish(exit_code=1, quiet=True)
            except Exception:
                pass

    def _disable(self, reason: str) -> None:
        self.enabled = False
        self.info.update(mode="disabled", run_dir=None, run_id=None, reason=reason)
        self._say(f"wandb: disabled ({reason})")

    _said = False

    def _say(self, line: str) -> None:
        if not self._said:  # exactly one line per tracker, however many things go wrong
            self._said = True
            print(line, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- helpers


def _hydra_job() -> dict[str, Any]:
    """What we need from HydraConfig, or {} outside a Hydra app."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized():
            return {}
        hc = HydraConfig.get()
        multirun = hc.mode == RunMode.MULTIRUN
        out: dict[str, Any] = {
            "multirun": multirun,
            "mode": str(hc.mode.name if hc.mode is not None else "RUN"),
            "override_dirname": OmegaConf.select(hc, "job.override_dirname", default="") or "",
            "overrides": list(OmegaConf.select(hc, "overrides.task", default=[]) or []),
            "job_num": OmegaConf.select(hc, "job.num", default=None),
        }
        if multirun:
            out["sweep_dir"] = str(hc.sweep.dir)
        return out
    except Exception:
        return {}


def _derive_group(hydra: dict[str, Any], experiment: str) -> str | None:
    """A sweep's jobs share a group named after the sweep dir's last two parts (e.g. `multirun-2026-01-02_03-04-05`,
    `paper_table-2026-...`): the same in every job, also for SLURM jobs on other nodes (no absolute paths), and a
    fresh one per sweep (the timestamp). A single run is grouped by its experiment."""
    sweep_dir = hydra.get("sweep_dir")
    if hydra.get("multirun") and sweep_dir:
        parts = [p for p in Path(os.path.normpath(sweep_dir)).parts[-2:] if p not in ("/", "", ".", "..")]
        return "-".join(parts)[-128:] or "sweep"
    return experiment


def _config_dict(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config; unresolvable interpolations (no Hydra context) are kept as written."""
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)  # type: ignore[return-value]
    except Exception:
        out: dict[str, Any] = {}
        for key in cfg:
            try:
                node = cfg[key]
                out[str(key)] = (
                    OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
                )
            except Exception:
                out[str(key)] = OmegaConf.to_container(cfg, resolve=False).get(key)  # type: ignore[union-attr]
        return out


def _logger_dir(cfg: DictConfig) -> str | None:
    for key in ("logger.dir", "paths.output_dir"):
        try:
            value = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=True)
        except Exception:
            continue
        if value:
            return str(value)
    return None


def _has_credentials() -> bool:
    """True when wandb can authenticate without prompting (env, netrc or an earlier login)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    try:
        import wandb
        from wandb.sdk.lib.wbauth.authenticate import authenticate_session

        host = wandb.Settings().base_url
        return (
            authenticate_session(host=host, source="ilf_lab", prompt=False, update_session=False) is not None
        )
    except ImportError:
        return True  # a wandb without this API: let wandb.init decide (it raises when it cannot prompt)
    except Exception:
        return False


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


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:200] if text else "no message"


# ---------------------------------------------------------------------------------------------- reading back


def read_offline_run(run_dir: str | os.PathLike, wait: float = 15.0) -> dict[str, Any]:
    """Read an offline run back from its `run-<id>.wandb` file: config, summary, group, name, tags, history.

    wandb 0.31 writes no `wandb-summary.json` offline; the records live only in the LevelDB-style log (a 7-byte
    W&B header, then 32 KiB blocks of `crc32c(4) length(2) type(1)` chunks holding protobuf `Record`s).
    Useful for tests and for checking what a run recorded before `wandb sync`. wandb-core writes the file
    asynchronously, even after `run.finish()` returned: wait up to `wait` seconds for the run's exit record.
    """
    deadline = time.monotonic() + wait
    while True:
        out = _read_offline_once(Path(run_dir))
        if out["exit_code"] is not None or time.monotonic() >= deadline:
            return out
        time.sleep(0.1)


def _read_offline_once(run_dir: Path) -> dict[str, Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    files = sorted(run_dir.glob("run-*.wandb"))
    if not files:
        raise FileNotFoundError(f"no run-*.wandb file in {run_dir}")
    data = files[0].read_bytes()
    out: dict[str, Any] = {
        "config": {},
        "summary": {},
        "history": [],
        "group": None,
        "name": None,
        "tags": [],
        "job_type": None,
        "run_id": None,
        "project": None,
        "exit_code": None,
    }
    for payload in _leveldb_records(data):
        rec = pb.Record()
        rec.ParseFromString(payload)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run
            out.update(
                group=r.run_group or None,
                name=r.display_name or None,
                tags=list(r.tags),
                job_type=r.job_type or None,
                run_id=r.run_id,
                project=r.project,
            )
            _apply_config(out["config"], r.config)
        elif kind == "config":
            _apply_config(out["config"], rec.config)
        elif kind == "summary":
            for item in rec.summary.update:
                keys = list(item.nested_key) or [item.key]
                _set_nested(out["summary"], keys, json.loads(item.value_json))
        elif kind == "history":
            row: dict[str, Any] = {}
            for item in rec.history.item:
                keys = list(item.nested_key) or [item.key]
                row["/".join(keys)] = json.loads(item.value_json)
            out["history"].append(row)
        elif kind == "exit":
            out["exit_code"] = rec.exit.exit_code
    return out


def _apply_config(target: dict[str, Any], config: Any) -> None:
    for item in config.update:
        keys = list(item.nested_key) or [item.key]
        _set_nested(target, keys, json.loads(item.value_json))


def _set_nested(target: dict[str, Any], keys: list[str], value: Any) -> None:
    for k in keys[:-1]:
        target = target.setdefault(k, {})
    target[keys[-1]] = value


def _leveldb_records(data: bytes, block: int = 32768) -> list[bytes]:
    records: list[bytes] = []
    pos, pending = 7, b""  # skip the ':W&B' + magic + version header
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        chunk = data[pos : pos + length]
        pos += length
        if kind == 0 and length == 0:
            break
        if kind == 1:  # FULL
            records.append(chunk)
        elif kind == 2:  # FIRST
            pending = chunk
        elif kind == 3:  # MIDDLE
            pending += chunk
        elif kind == 4:  # LAST
            records.append(pending + chunk)
            pending = b""
    return records
