"""results.json as one typed record: written by the pipeline, read by the report, the notebooks and W&B.

The file is architecture contract 2 (`experiment`, `feedback`, `train_on`, `model`, `pass@1`, `pass@10`,
`n_samples`, `num_tasks`, `stages` with `name` / `cached` / `seconds`). `schema_version` says which shape a file
has; `Results.load` accepts every earlier version (results are committed under `results/` and outlive the code
that wrote them) and names the file and the field when one is malformed.

Version history: 1 = no `schema_version` field (sessions 1-2); 2 = `schema_version` added, stage rows carry the
stage's cache key and status, nothing removed. A version-1 file without `eval_split` reads it from its `config`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ilf_lab.errors import IlfError

SCHEMA_VERSION = 2


class ResultsError(IlfError):
    """A results.json that cannot be read: the message names the file and the field."""


@dataclass
class StageRecord:
    """One stage of a run: where its artifact came from and how long it took."""

    name: str
    cached: bool = False
    seconds: float = 0.0
    key: str | None = None
    status: str = "ok"  # ok | empty | skipped
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Score:
    """pass@k over a benchmark's tasks; `per_task` maps task id -> {"n": samples, "c": passing}."""

    pass_at: dict[int, float | None] = field(default_factory=dict)
    num_tasks: int | None = None
    n_samples: int | None = None
    per_task: dict[str, dict[str, int]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            **{f"pass@{k}": v for k, v in sorted(self.pass_at.items())},
            "num_tasks": self.num_tasks,
            "n_samples": self.n_samples,
            "per_task": self.per_task,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any], where: str) -> Score:
        _require(isinstance(d, dict), where, "is not an object")
        pass_at = {}
        for key, v in d.items():
            if key.startswith("pass@"):
                _require(key[5:].isdigit(), where, f"has a malformed key {key!r}")
                pass_at[int(key[5:])] = _fraction(v, _at(where, key))
        per_task = d.get("per_task") or {}
        _require(isinstance(per_task, dict), _at(where, "per_task"), "is not an object")
        for tid, nc in per_task.items():
            ok = isinstance(nc, dict) and all(_is_count(nc.get(x)) for x in ("n", "c")) and nc["c"] <= nc["n"]
            _require(ok, _at(where, f"per_task.{tid}"), f"={nc!r} is not {{'n': samples, 'c': passing}}")
        return cls(
            pass_at=pass_at,
            num_tasks=_count(d.get("num_tasks"), _at(where, "num_tasks")),
            n_samples=_count(d.get("n_samples"), _at(where, "n_samples")),
            per_task={str(k): dict(v) for k, v in per_task.items()},
        )


@dataclass
class Results:
    """One run. `benchmarks["mbpp"]` is the headline score; its pass@1/pass@10 are repeated at the top level."""

    experiment: str
    feedback: str
    train_on: str
    model: str
    scale: str | None = None
    eval_split: str | None = "test"
    temperature: float | None = None
    seed: int | None = None
    rounds: int = 1
    stopped_after: str | None = None
    benchmarks: dict[str, Score] = field(default_factory=dict)
    refine: dict[str, Any] = field(default_factory=dict)  # Tables 2-3: how good the refinements are
    stages: list[StageRecord] = field(default_factory=list)
    counts: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    wall_seconds: float | None = None
    wandb: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    path: str | None = None  # where it was read from (not written)

    # ------------------------------------------------------------------------------------- reading it

    @property
    def score(self) -> Score:
        return self.benchmarks.get("mbpp") or Score()

    def metric(self, key: str, benchmark: str = "mbpp") -> float | None:
        """`pass@k` of a benchmark (None where the run has no such number)."""
        s = self.benchmarks.get(benchmark)
        return None if s is None or not key.startswith("pass@") else s.pass_at.get(int(key[5:]))

    @property
    def per_task(self) -> dict[str, dict[str, int]]:
        return self.score.per_task

    def setting(self, dotted: str) -> Any:
        """A value of the run's composed config, e.g. `feedback.num_tasks` (None when absent)."""
        node: Any = self.config
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node

    # --------------------------------------------------------------------------------------- the file

    def to_json(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("path", "benchmarks", "stages")}
        score = self.score
        head = {k: score.pass_at.get(int(k[5:])) for k in ("pass@1", "pass@10")}
        return {
            "schema_version": self.schema_version,
            **{k: d.pop(k) for k in ("experiment", "feedback", "train_on", "model", "scale")},
            **head,
            "n_samples": score.n_samples,
            "num_tasks": score.num_tasks,
            "per_task": score.per_task,
            "benchmarks": {name: s.to_json() for name, s in self.benchmarks.items()},
            "stages": [asdict(s) for s in self.stages],
            **{k: v for k, v in d.items() if k != "schema_version"},
        }

    def write(self, path: str | os.PathLike) -> None:
        from ilf_lab.io import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_json(), indent=1, default=str))

    @classmethod
    def from_json(cls, d: Any, where: str = "results.json") -> Results:
        """Any schema version; raises ResultsError naming `where` and the field."""
        _require(isinstance(d, dict), f"{where}:", "not a JSON object")
        version = d.get("schema_version", 1)
        _require(isinstance(version, int) and 1 <= version <= SCHEMA_VERSION, f"{where}: schema_version",
                 f"={version!r} is not one this code reads (1..{SCHEMA_VERSION})")
        missing = [k for k in ("experiment", "feedback", "train_on", "model", "pass@1", "pass@10",
                               "n_samples", "num_tasks") if k not in d]
        _require(not missing, f"{where}: missing", ", ".join(missing))
        for k in ("experiment", "feedback", "train_on", "model"):
            _require(isinstance(d[k], str), f"{where}: {k}", f"={d[k]!r} is not a string")
        benchmarks_raw = d.get("benchmarks") or {}
        _require(isinstance(benchmarks_raw, dict), f"{where}: benchmarks", "is not an object")
        benchmarks = {name: Score.from_json(s, f"{where}: benchmarks.{name}") for name, s in benchmarks_raw.items()}
        head = Score.from_json({k: d.get(k) for k in ("pass@1", "pass@10", "num_tasks", "n_samples", "per_task")},
                               f"{where}:")
        if "mbpp" in benchmarks:  # the top level is contract 2's copy of the headline score: it wins
            mbpp = benchmarks["mbpp"]
            mbpp.pass_at.update(head.pass_at)
            mbpp.num_tasks, mbpp.n_samples = head.num_tasks, head.n_samples
            if d.get("per_task") is not None:
                mbpp.per_task = head.per_task
        else:  # version 1 before HumanEval: the headline score was only at the top level
            benchmarks["mbpp"] = head
        stages_raw = d.get("stages") or []
        _require(isinstance(stages_raw, list), f"{where}: stages", "is not a list")
        stages = []
        for i, s in enumerate(stages_raw):
            ok = isinstance(s, dict) and isinstance(s.get("name"), str)
            _require(ok, f"{where}: stages[{i}]", "is not an object with a name")
            key = s.get("key")
            _require(key is None or isinstance(key, str), f"{where}: stages[{i}].key",
                     f"={key!r} is not a string or null")
            known = {f.name for f in fields(StageRecord)}
            stages.append(StageRecord(**{k: v for k, v in s.items() if k in known}))
        kw: dict[str, Any] = {}
        for f in fields(cls):
            if f.name in ("benchmarks", "stages", "path", "schema_version") or f.name not in d:
                continue
            kw[f.name] = d[f.name]
        for k in ("refine", "counts", "training", "artifacts", "config", "wandb"):
            if kw.get(k) is None:
                kw.pop(k, None)
            else:
                _require(isinstance(kw[k], dict), f"{where}: {k}", "is not an object")
        if kw.get("overrides") is None:
            kw.pop("overrides", None)
        else:
            _require(isinstance(kw["overrides"], list), f"{where}: overrides", "is not a list")
            kw["overrides"] = [str(o) for o in kw["overrides"]]
        if kw.get("rounds") is None:
            kw.pop("rounds", None)
        else:
            _count(kw["rounds"], f"{where}: rounds")
        if "eval_split" not in d:  # version 1 files before the field: the composed config says
            split = (kw.get("config") or {}).get("eval", {})
            kw["eval_split"] = split.get("split", "test") if isinstance(split, dict) else "test"
        _check_refine(kw.get("refine") or {}, f"{where}: refine")
        return cls(**kw, benchmarks=benchmarks, stages=stages, schema_version=version)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Results:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ResultsError(f"{path}: malformed results.json ({type(e).__name__}: {e})") from None
        r = cls.from_json(data, str(path))
        r.path = str(path)
        return r


def _require(ok: bool, where: str, problem: str) -> None:
    if not ok:
        raise ResultsError(f"{where}{'' if problem.startswith('=') else ' '}{problem}")


def _at(where: str, key: str) -> str:
    """`file: a.b` + `c` -> `file: a.b.c`; `file:` + `c` -> `file: c`."""
    return f"{where} {key}" if where.endswith(":") else f"{where}.{key}"


def _check_refine(refine: dict[str, Any], where: str) -> None:
    """The numbers Tables 2-3 compute with: counts of tasks and samples, pass@k and shares as fractions."""
    for k, v in refine.items():
        if k in ("tasks", "samples_per_task", "tasks_with_passing"):
            _count(v, _at(where, k))
        elif k.startswith("pass@") or k == "frac_tasks_with_passing":
            _fraction(v, _at(where, k))


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _count(v: Any, where: str) -> int | None:
    _require(v is None or _is_count(v), where, f"={v!r} is not a count")
    return v


def _fraction(v: Any, where: str) -> float | None:
    if v is None:
        return None  # n_samples < k
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v) and 0.0 <= v <= 1.0
    _require(ok, where, f"={v!r} is not a fraction in [0, 1] or null")
    return float(v)
