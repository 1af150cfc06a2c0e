"""A stage's cache key covers everything it depends on (ilf_lab/pipeline/stage.py), checked three ways:

1. audit: while any stage runs, nothing reads the composed config (every DictConfig access is recorded), and
   building its slice reads exactly the paths it declares;
2. mutation: for each stage, every setting that neither it nor its upstream stages declare is changed at once,
   in a fresh cache; its key must stay the same and its artifact must be byte-identical;
3. the properties the redesign fixed: a differently trained refiner is a different refine stage, evaluation
   subsets touch only the evaluate key, options at their default leave keys unchanged, defaults are pinned.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from ilf_lab.pipeline.cache import StageCache
from ilf_lab.pipeline.runner import Runner
from ilf_lab.pipeline.stage import paths, select, stage_key
from tests.conftest import dag_config, run_dag

# the three pipelines between them run every stage implementation
PIPELINES = {
    "ilf": ["eval=with_humaneval", "eval.perplexity=true"],
    "llm_policy_x0": ["feedback=instructgpt_1shot", "x0=policy"],
    "gold": ["experiment=mbpp_gold_all_tasks"],  # trains a policy even with a random model
}
# how each mutable setting is changed; everything else is structure (which stages run) or where things live
MUTATIONS: dict[str, Any] = {
    "seed": 3, "model.dtype": "bfloat16", "model.prompt_format": "docstring", "data.max_test_tasks": 2,
    "data.max_refine_tasks": 3, "data.max_train_tasks": 3, "data.max_edit_distance": 0.9,
    "data.require_refinement_passes": False, "data.one_per_task": False,
    "x0.n": 3, "x0.temperature": 0.5, "x0.top_p": 0.9, "x0.max_new_tokens": 16,
    "feedback.temperature": 0.7, "feedback.max_new_tokens": 40, "feedback.num_tasks": 2, "feedback.shots": 2,
    "feedback.top_p": 0.9, "feedback.n": 3, "refine.shots": 1,
    "refine.n": 3, "refine.temperature": 0.5, "refine.top_p": 0.9, "refine.max_new_tokens": 16,
    "sampling.n": 11, "sampling.temperature": 0.5, "sampling.top_p": 0.9, "sampling.max_new_tokens": 16,
    "sampling.batch_size": 3, "execution.timeout": 7.0, "execution.workers": 1, "execution.comparison": "approx",
    "execution.memory_mb": 2048, "eval.ks": [1, 2], "eval.humaneval_max_problems": 2,
    **{f"{o}.{k}": v for o in ("refiner", "policy") for k, v in
       {"lr": 3e-3, "weight_decay": 0.1, "warmup_ratio": 0.5, "scheduler": "constant", "batch_size": 2,
        "micro_batch_size": 1, "epochs": 2, "max_length": 256, "grad_clip": 0.5, "pack": False}.items()},
    "trainer.log_every_n_steps": 2,
}
# the base model's identity (an upstream of every stage that takes `model`)
MODEL_PATHS = {"model.source", "model.path", "model.tiny_hidden_size", "model.tiny_layers", "model.tiny_heads"}


def _cfg(mini_data: Path, tmp: Path, extra: list[str]) -> DictConfig:
    return dag_config(mini_data, tmp, extra)


def _run(cfg: DictConfig) -> Runner:
    return run_dag(cfg)


def _digest(path: Path) -> dict[str, str]:
    """Every file of an artifact but the timings (meta.json's and the trainer's seconds)."""
    skip = {"meta.json", "train_result.json"}
    return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(path.rglob("*")) if f.is_file() and f.name not in skip}


def _first_difference(a: Path, b: Path) -> str:
    """The first line that differs between two artifacts' files (for a failing digest check)."""
    for f in sorted(a.rglob("*")):
        g = b / f.relative_to(a)
        if f.is_file() and f.name not in {"meta.json", "train_result.json"} and f.read_bytes() != g.read_bytes():
            for i, (x, y) in enumerate(zip(f.read_text(errors="replace").splitlines(),
                                           g.read_text(errors="replace").splitlines(), strict=False)):
                if x != y:
                    return f"{f.relative_to(a)} line {i + 1}: {x[:300]!r} != {y[:300]!r}"
            return f"{f.relative_to(a)}: lengths differ"
    return "no file differs"


def _closure(run: Runner, stage: str) -> set[str]:
    """The config paths a stage's artifact may depend on: its own and its upstream stages' (and the model's)."""
    inst, ups = run.graph[stage]
    out = set(paths(type(inst).Config))
    for up in ups.values():
        if up in ("model", "data"):  # content-keyed sources: the base model's identity, the data's records
            out |= MODEL_PATHS if up == "model" else set()
        else:
            out |= _closure(run, up)
    return out


@pytest.fixture(scope="module", autouse=True)
def fresh_process_state():
    """The pipeline runs in its own process; here it shares pytest's with every earlier test module. Reset the
    process-wide state those may leave (Lightning's deterministic-algorithms flag, the loaded engine) so that a
    difference found below is the pipeline's, not another test's."""
    from ilf_lab.pipeline.stages import common

    torch.use_deterministic_algorithms(False)
    common._loaded.clear()
    yield
    common._loaded.clear()


@pytest.fixture(scope="module")
def baselines(mini_data, tmp_path_factory):
    out = {}
    for name, extra in PIPELINES.items():
        tmp = tmp_path_factory.mktemp(name)
        cfg = _cfg(mini_data, tmp, extra)
        out[name] = (extra, _run(cfg))
    return out


def test_stages_never_read_the_config_while_running(mini_data, tmp_path, monkeypatch):
    """Audit: record every DictConfig read; during a stage's run there must be none (a stage that reads the
    composed config — as `stages.Models` did for the engine settings — fails here), and building each slice
    reads exactly its declared paths."""
    log: list[tuple[str | None, str]] = []
    current: list[str | None] = [None]
    get_attr, get_item = DictConfig.__getattr__, DictConfig.__getitem__

    def rec(orig):
        def wrapped(self, key):
            value = orig(self, key)
            if not str(key).startswith("_"):
                log.append((current[0], f"{self._get_full_key(key)}"))
            return value
        return wrapped

    orig_cache_run = StageCache.run

    def audited(self, stage, key, compute):
        current[0] = stage
        try:
            return orig_cache_run(self, stage, key, compute)
        finally:
            current[0] = None

    monkeypatch.setattr(DictConfig, "__getattr__", rec(get_attr))
    monkeypatch.setattr(DictConfig, "__getitem__", rec(get_item))
    monkeypatch.setattr(StageCache, "run", audited)
    for extra in PIPELINES.values():
        run = _run(_cfg(mini_data, tmp_path / str(len(log)), extra))
        during = sorted({p for stage, p in log if stage is not None and stage != "data"})
        assert during == [], f"stages read the composed config while running: {during}"
        for inst, _ in run.graph.values():
            reads: list[str] = []
            select(type(inst).Config, run.cfg, reads=reads)
            assert set(reads) == set(paths(type(inst).Config)), inst.name


@pytest.mark.parametrize("pipeline", list(PIPELINES))
def test_undeclared_settings_never_change_an_artifact(pipeline, baselines, mini_data, tmp_path):
    extra, base = baselines[pipeline]
    from ilf_lab.config import ConfigError, validate

    checked = []
    for stage in base.graph:
        if pipeline != "ilf" and stage == "tasks":
            continue  # checked once
        mutate = {k: v for k, v in MUTATIONS.items() if k not in _closure(base, stage)}
        cfg = _cfg(mini_data, tmp_path / stage, extra)
        for k, v in mutate.items():
            OmegaConf.update(cfg, k, v, merge=False)
        try:
            validate(cfg)
        except ConfigError:  # e.g. feedback.shots=2 is fine, but keep the run valid whatever the mix
            for k in ("feedback.shots",):
                mutate.pop(k, None)
                OmegaConf.update(cfg, k, OmegaConf.select(base.cfg, k), merge=False)
            validate(cfg)
        if stage in ("tasks", "x0", "feedback", "train_refiner", "refine", "train_policy"):
            cfg.stop_after = stage
        run = _run(cfg)
        assert stage in run.done, f"{stage} did not run with {sorted(mutate)}"
        old, new = base.done[stage], run.done[stage]
        assert new.key == old.key, f"{stage}: undeclared settings changed its key: {sorted(mutate)}"
        assert not new.cached  # a fresh cache: recomputed
        assert _digest(new.path) == _digest(old.path), (
            f"{stage}: artifact changed under {sorted(mutate)}: {_first_difference(old.path, new.path)}")
        checked.append((stage, len(mutate)))
    assert len(checked) >= 4, checked


def test_a_differently_trained_refiner_is_a_different_refine_stage(baselines, mini_data, tmp_path):
    extra, base = baselines["ilf"]
    run = _run(_cfg(mini_data, tmp_path, [*extra, "refiner.lr=5e-3", "stop_after=refine"]))
    assert run.done["train_refiner"].key != base.done["train_refiner"].key
    assert run.done["refine"].key != base.done["refine"].key
    assert run.done["x0"].key == base.done["x0"].key  # upstream of the refiner: shared


def test_evaluation_subset_changes_only_the_evaluate_key(baselines, mini_data, tmp_path):
    extra, base = baselines["gold"]
    run = _run(_cfg(mini_data, tmp_path, [*extra, "data.max_test_tasks=2", "sampling.n=4"]))
    for stage in ("tasks", "x0", "feedback", "train_policy"):
        assert run.done[stage].key == base.done[stage].key
    assert run.done["evaluate"].key != base.done["evaluate"].key


def test_options_at_their_default_do_not_change_keys(baselines, mini_data, tmp_path):
    """Writing a default explicitly (as a new option added later would be) leaves every key as it was."""
    extra, base = baselines["ilf"]
    cfg = _cfg(mini_data, tmp_path, [*extra, "feedback.shuffle=false", "refine.refiner=trained",
                                     "execution.comparison=exact"])
    for name, (inst, ups) in base.graph.items():
        upstream = {n: base.done[u].key if u in base.done else None for n, u in ups.items()}
        if None in upstream.values():
            continue
        slice_ = select(type(inst).Config, cfg)
        assert stage_key(inst, slice_, {**upstream}) == base.done[name].key or "model" in ups


GOLDEN = Path(__file__).parent / "stage_defaults.json"


def test_schema_defaults_read_by_stages_are_pinned():
    """Keys omit values at their schema default, so changing a default changes what an old key means: it must
    come with a bump of the stage's `version` (and of this file: `python -m tests.test_stage_keys`)."""
    assert json.loads(GOLDEN.read_text()) == stage_defaults(), (
        "a schema default read by a stage changed: bump that stage's version, then regenerate "
        f"{GOLDEN.name} with `python -m tests.test_stage_keys`"
    )


def stage_defaults() -> dict[str, Any]:
    from ilf_lab.config import default_of
    from ilf_lab.pipeline.stages import evaluate, feedback, perplexity, refine, tasks, train, x0

    out = {}
    for mod in (tasks, x0, feedback, train, refine, evaluate, perplexity):
        for cls in vars(mod).values():
            if isinstance(cls, type) and hasattr(cls, "Config") and dataclasses.is_dataclass(cls.Config):
                out[f"{cls.name}:{cls.__name__}"] = {
                    "version": cls.version,
                    "defaults": {p: _plain(default_of(p)) for p in sorted(paths(cls.Config))},
                }
    return out


def _plain(v: Any) -> Any:
    return v if isinstance(v, (str, int, float, bool, type(None), list)) else repr(v)


if __name__ == "__main__":
    GOLDEN.write_text(json.dumps(stage_defaults(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}")
