"""What a stage is: a typed config slice, named upstream inputs, and `run(inputs, cfg, out) -> meta`.

A stage never sees the composed config. Its slice is a frozen dataclass whose fields say where each value comes
from (`at("sampling.n")`); `select` builds it by reading exactly those paths, and the cache key hashes exactly
that slice, the upstream keys and the stage's version. So a stage cannot depend on a setting its key does not
cover: there is nothing else for it to read.

Keys hash only the values that differ from the schema's default. An option added later with a default that keeps
behaviour unchanged therefore leaves every existing key (and cache) valid, with no list of exceptions to keep.
The price: changing a schema default changes what an old key means, so `tests/test_stage_keys.py` pins the
defaults each stage reads; changing one needs a bump of that stage's `version`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from omegaconf import OmegaConf

from ilf_lab.data.prompts import VERSION as PROMPTS_VERSION

# bump to invalidate every stage at once (3: the declared-stage redesign; 4: the paper's protocol — annotations
# as released, matched baselines, LLM feedback sampling, the reference's truncation). Prompt templates carry
# their own version (ilf_lab.data.prompts.VERSION), part of every key too.
CACHE_VERSION = 4

_UNSET = object()


def at(path: str) -> Any:
    """A slice field read from `path` of the composed config (a dotted key; a node for a nested slice)."""
    return field(metadata={"path": path})


def nested() -> Any:
    """A nested slice whose fields name their own paths (e.g. the sampling engine's settings)."""
    return field(metadata={"path": ""})


@dataclass(frozen=True)
class Artifact:
    """A finished stage's output: its directory, the metadata `run` returned, and its key."""

    stage: str
    key: str
    path: Path
    meta: dict[str, Any] = field(default_factory=dict)
    cached: bool = False
    seconds: float = 0.0

    def file(self, name: str) -> Path:
        return self.path / name


class Stage:
    """Subclasses set `name`, `version`, `Config` (a frozen dataclass of `at(...)` fields) and `inputs`, and
    implement `run`. Variants of one stage (e.g. x0 from annotations or from the policy) share `name`."""

    name: ClassVar[str]
    version: ClassVar[int] = 1
    Config: ClassVar[type]
    inputs: ClassVar[tuple[str, ...]] = ()

    def params(self) -> dict[str, Any]:
        """Arguments the DAG gives this instance (e.g. the round); part of the key like the slice."""
        return {}

    def resolved(self, cfg: Any) -> dict[str, Any]:
        """What `auto` settings of the slice resolve to on this machine (e.g. the training world size): part of
        the key, so `devices=auto` on 1 and on 8 GPUs are different artifacts."""
        return {}

    def run(self, inputs: dict[str, Artifact], cfg: Any, out: Path) -> dict[str, Any]:
        raise NotImplementedError


# ------------------------------------------------------------------------------------------- slices and keys


def paths(cls: type, prefix: str = "") -> dict[str, Any]:
    """Every config path a slice type reads -> the field's type (nested slices flattened)."""
    out: dict[str, Any] = {}
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        p = _path(f, prefix)
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(paths(hints[f.name], p))
        else:
            out[p] = hints[f.name]
    return out


def _path(f: dataclasses.Field, prefix: str) -> str:
    """A field's config path: its own `at(...)`, else `<prefix>.<name>` (nested slices read from their node)."""
    own = f.metadata.get("path")
    return own if own else f"{prefix}.{f.name}".lstrip(".")


def select(cls: type, cfg: Any, prefix: str = "", reads: list[str] | None = None) -> Any:
    """Build the slice `cls` from the composed config, reading only its declared paths (recorded in `reads`)."""
    import typing

    hints = typing.get_type_hints(cls)
    kw = {}
    for f in dataclasses.fields(cls):
        p = _path(f, prefix)
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            kw[f.name] = select(t, cfg, p, reads)
            continue
        value = OmegaConf.select(cfg, p, default=_UNSET)
        if value is _UNSET:
            raise KeyError(f"{cls.__name__}.{f.name}: no config key {p!r}")
        if reads is not None:
            reads.append(p)
        value = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        kw[f.name] = tuple(value) if isinstance(value, list) else value
    return cls(**kw)


def _schema_default(p: str) -> Any:
    from ilf_lab.config import default_of

    return default_of(p)


def key_payload(cls: type, slice_: Any, prefix: str = "") -> dict[str, Any]:
    """The slice's values that differ from the schema default, by config path."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        p = _path(f, prefix)
        value = getattr(slice_, f.name)
        if dataclasses.is_dataclass(value):
            out.update(key_payload(type(value), value, p))
            continue
        default = _schema_default(p)
        if isinstance(default, list):
            default = tuple(default)
        if value != default:
            out[p] = value
    return out


def stage_key(stage: Stage, slice_: Any, upstream: dict[str, str]) -> str:
    """sha256 of (stage, implementation, versions, non-default slice values, params, upstream keys)."""
    payload = {
        "stage": stage.name,
        "impl": type(stage).__name__,
        "version": [CACHE_VERSION, PROMPTS_VERSION, stage.version],
        "config": key_payload(type(stage).Config, slice_),
        "params": stage.params(),
        "resolved": stage.resolved(slice_),
        "upstream": upstream,
    }
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def content_key(kind: str, content: Any) -> str:
    """A key for something that is not computed by a stage (data records, a model's weights): its content."""
    blob = json.dumps({"kind": kind, "content": content}, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
