"""What a W&B run is called, grouped and tagged, and where it writes: from the config, the environment and Hydra.

Precedence, per setting: an explicit `logger.<key>=...` on the command line (Hydra's task overrides), then the
standard W&B variable (`WANDB_MODE`, `WANDB_DIR`, `WANDB_PROJECT`, `WANDB_ENTITY`, `WANDB_RUN_GROUP`), then the
config. So a cluster-wide `WANDB_DIR`/`WANDB_MODE` is honoured without editing configs, and a one-off override
still wins. Every job of a Hydra sweep is its own run; all jobs of one sweep share a group derived from the sweep
directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ilf_lab.errors import ConfigError

MODES = ("offline", "online", "disabled")
_ALIASES = {"dryrun": "offline", "run": "online"}  # wandb's legacy WANDB_MODE values
_ENV = {
    "mode": "WANDB_MODE",
    "dir": "WANDB_DIR",
    "project": "WANDB_PROJECT",
    "entity": "WANDB_ENTITY",
    "group": "WANDB_RUN_GROUP",
}
_MAX_TAG = 64  # W&B rejects longer tags


@dataclass
class RunSettings:
    """The arguments of `wandb.init` for one pipeline run."""

    project: str = "ilf_lab"
    entity: str | None = None
    mode: str = "offline"
    group: str | None = None
    name: str = "run"
    job_type: str = "experiment"
    tags: list[str] = field(default_factory=list)
    dir: str | None = None
    config: dict[str, Any] = field(default_factory=dict)


def run_settings(cfg: DictConfig) -> RunSettings:
    """Resolve the run's settings (raises ConfigError for a mode W&B does not have)."""
    hydra = hydra_job()
    given = _override_keys(hydra.get("overrides", []))
    mode = str(setting(cfg, "mode", given) or "offline").lower()
    mode = _ALIASES.get(mode, mode)
    if mode not in MODES:
        source = (
            "$WANDB_MODE" if os.environ.get("WANDB_MODE") and "logger.mode" not in given else "logger.mode"
        )
        raise ConfigError(f"{source}={mode!r} is not one of {', '.join(MODES)}")
    experiment = str(OmegaConf.select(cfg, "name", default="run"))
    group = setting(cfg, "group", given) or _derive_group(hydra, experiment)
    overrides = hydra.get("override_dirname") or ""
    name = f"{experiment} {overrides}".strip() if overrides else experiment
    if hydra.get("multirun") and hydra.get("job_num") is not None:
        name = f"{hydra['job_num']}:{name}"
    config = _config_dict(cfg)
    if hydra:
        config["_hydra"] = {k: v for k, v in hydra.items() if k != "multirun"}
    return RunSettings(
        project=str(setting(cfg, "project", given) or "ilf_lab"),
        entity=setting(cfg, "entity", given) or None,
        mode=mode,
        group=str(group) if group is not None else None,
        name=name[:128],
        job_type="sweep_job" if hydra.get("multirun") else "experiment",
        tags=_tags(cfg, bool(hydra.get("multirun")), experiment),
        dir=setting(cfg, "dir", given),
        config=config,
    )


def setting(cfg: DictConfig, key: str, given: set[str]) -> Any:
    """`logger.<key>`: the command-line value, else `$WANDB_...`, else the config's (None when unresolvable)."""
    if f"logger.{key}" not in given and os.environ.get(_ENV[key]):
        return os.environ[_ENV[key]]
    fallbacks = ["paths.output_dir"] if key == "dir" else []
    for path in (f"logger.{key}", *fallbacks):
        try:
            value = OmegaConf.select(cfg, path, default=None, throw_on_resolution_failure=True)
        except Exception:  # e.g. `${hydra:...}` outside a Hydra app
            continue
        if value is not None:
            return str(value) if key == "dir" else value
    return None


def _override_keys(overrides: list[str]) -> set[str]:
    """`logger.mode` for `logger.mode=online`, `+logger.group=x`, `++logger.dir=...` or `~logger.entity`."""
    return {o.split("=", 1)[0].lstrip("+~").strip() for o in overrides}


def _tags(cfg: DictConfig, multirun: bool, experiment: str) -> list[str]:
    tags = [f"experiment:{experiment}"]
    for key in ("feedback.name", "train_on.source", "model.name", "scale"):
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None:
            tags.append(f"{key.split('.')[0]}:{value}")
    tags.append("sweep" if multirun else "single")
    tags += [str(t) for t in (OmegaConf.select(cfg, "logger.tags", default=None) or [])]
    return [t[:_MAX_TAG] for t in dict.fromkeys(tags)]


def hydra_job() -> dict[str, Any]:
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


def has_credentials() -> bool:
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
