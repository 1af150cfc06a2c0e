"""Slices and helpers shared by the stages that sample and test programs: sample -> run tests -> score, once.

The engine that samples is part of every sampling stage's slice (`EngineConfig`), and the one engine kept loaded
is keyed by the model *and* those settings, so no stage can be handed an engine built for another's settings.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ilf_lab.data.prompts import Task, program_from_completion, stop_sequences, task_prompt
from ilf_lab.pipeline.stage import at

log = logging.getLogger(__name__)

# version of every stage whose artifact is sampled by the engine (x0 from the policy, sampled refinements, LLM
# feedback, both evaluations): bumped when the engine's samples change, so no cached artifact of the old engine
# is served. 2: sampling.prompt_kv=null shares a prompt's KV on the slots backend; 3: the shared KV in runs of
# prompts, merged as flash-decoding does (float rounding); 4: fp32 linear layers through oneDNN with packed weights
# on CPU (sampling.cpu_linear=null, float rounding); 5: attention over the shared prompt KV through a C++ kernel
# on CPU (sampling.attention=null, float rounding); 6: the prompts' common start prefilled once per call
# (sampling.common_prefix=null) and the top-p choice through a C++ kernel on CPU (float rounding); 7: the attention
# kernel's scores and value sums in register tiles, a score's lanes summed in another order (float rounding); 8:
# gate and up in one matmul with torch's SiLU after it, q/k/v in one matmul in prefill too, and prefill's last
# layer past K and V at each prompt's last position only (float rounding); 9: SiLU(gate) * up in a C++ pass, and
# prefill's norms through the RMSNorm kernel and its rotary embedding through the rope kernel (float rounding); 10:
# prefill's causal attention through a C++ kernel, only the unmasked half (float rounding); 11: on AVX-512 hosts the
# decode attention kernel on 16 lanes, its sums grouped differently (float rounding); 12: the decode kernel's prompt
# part over blocked keys, a score summed over the head dimension in order (float rounding).
SAMPLING_VERSION = 12


@dataclass(frozen=True)
class EngineConfig:
    """How a model is loaded and batched for sampling."""

    engine: str = at("sampling.engine")
    batch_size: int | None = at("sampling.batch_size")
    dtype: str = at("model.dtype")
    trust_remote_code: bool = at("model.trust_remote_code")
    sampling_dtype: str | None = at("sampling.dtype")  # overrides dtype for sampling only
    quantize: str | None = at("sampling.quantize")  # int8 linear layers (opt-in, CPU)
    prompt_kv: str | None = at("sampling.prompt_kv")  # copy|shared; null: the engine's default (shared on slots)
    cpu_linear: str | None = at("sampling.cpu_linear")  # aten|onednn|onednn_bf16; null: the default (onednn on CPU)
    attention: str | None = at("sampling.attention")  # matmul|kernel; null: the engine's default (kernel on CPU)
    common_prefix: str | None = at("sampling.common_prefix")  # once|each; null: the engine's default (once on CPU)

    @property
    def weights_dtype(self) -> str:
        return self.sampling_dtype or self.dtype


@dataclass(frozen=True)
class SampleConfig:
    """n samples per prompt at a temperature; read from the node a stage names (x0, refine, sampling)."""

    n: int
    temperature: float
    top_p: float
    max_new_tokens: int


@dataclass(frozen=True)
class ExecConfig:
    """The sandbox's settings (see ilf_lab/execution)."""

    timeout: float = at("execution.timeout")
    workers: int | None = at("execution.workers")
    comparison: str = at("execution.comparison")
    memory_mb: int = at("execution.memory_mb")


_loaded: dict[str, Any] = {}  # one engine at a time: {"id": (path, EngineConfig), "engine": ..., "tokenizer": ...}


def engine_for(path: str, cfg: EngineConfig) -> tuple[Any, Any]:
    """(engine, tokenizer) for a model dir; reloaded when the model or the engine settings change."""
    if _loaded.get("id") != (path, cfg):
        from ilf_lab.generation import make_engine
        from ilf_lab.models.loading import load_model

        _loaded.clear()
        model, tok = load_model(path, cfg.weights_dtype, cfg.trust_remote_code)
        if cfg.quantize:  # loaded only to sample: convert in place (no second fp32 copy)
            from ilf_lab.generation.quantize import quantize_linear

            model = quantize_linear(model, cfg.quantize, copy=False)
        engine = make_engine(
            cfg.engine, path, dtype=cfg.weights_dtype, batch_size=cfg.batch_size, model=model, tokenizer=tok,
            prompt_kv=cfg.prompt_kv, cpu_linear=cfg.cpu_linear, attention=cfg.attention,
            common_prefix=cfg.common_prefix,
        )
        _loaded.update(id=(path, cfg), engine=engine, tokenizer=tok)
    return _loaded["engine"], _loaded["tokenizer"]


def sample_programs(
    path: str,
    engine_cfg: EngineConfig,
    tasks: Sequence[Task],
    prompts: Sequence[str] | None,
    params: SampleConfig,
    *,
    fmt: str,
    seed: int,
) -> list[list[tuple[str, str]]]:
    """n (completion, program) pairs per task; `prompts` default to the task prompts of the format."""
    from ilf_lab.generation import SamplingParams

    engine, tok = engine_for(path, engine_cfg)
    if prompts is None:
        prompts = [task_prompt(t, fmt, tok) for t in tasks]
    sp = SamplingParams(
        n=params.n,
        temperature=params.temperature,
        top_p=params.top_p,
        max_new_tokens=params.max_new_tokens,
        stop=stop_sequences(fmt),
        seed=seed,
    )
    outs = engine.generate(list(prompts), sp, progress=True)
    return [[(c, program_from_completion(t, c, fmt)) for c in cs] for t, cs in zip(tasks, outs, strict=True)]


def run_tests(ex: ExecConfig, items: Sequence[dict[str, Any]], comparison: str | None = None) -> list[Any]:
    """Verdicts through the sandbox for {task_id, program, tests, setup} items, in order."""
    from ilf_lab.execution import run_programs

    if not items:
        return []
    return run_programs(
        items,
        timeout=ex.timeout,
        workers=ex.workers,
        comparison=comparison or ex.comparison,
        memory_mb=ex.memory_mb,
        progress=len(items) > 50,
    )


def test_items(rows: Sequence[tuple[Task, str]]) -> list[dict[str, Any]]:
    """MBPP's test_setup_code + all test_list asserts for each (task, program)."""
    return [{"task_id": t.task_id, "program": p, "tests": list(t.tests), "setup": t.setup} for t, p in rows]


def score(
    flat: Sequence[tuple[Any, int, str, str]], verdicts: Sequence[Any], ks: Sequence[int], n: int
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Sample rows with verdicts, and per-task counts with pass@k for every k <= n (null above n)."""
    rows, per_task = [], {}
    for (task_id, i, c, p), v in zip(flat, verdicts, strict=True):
        rows.append(
            {"task_id": task_id, "sample_idx": i, "completion": c, "program": p, "passed": v.passed,
             "result": v.result}
        )
        pt = per_task.setdefault(str(task_id), {"n": 0, "c": 0})
        pt["n"] += 1
        pt["c"] += int(v.passed)
    counts = [(pt["n"], pt["c"]) for pt in per_task.values()]
    return rows, {**pass_at(counts, ks, n), "num_tasks": len(per_task), "n_samples": n, "per_task": per_task}


def pass_at(counts: Sequence[tuple[int, int]], ks: Sequence[int], n: int) -> dict[str, float | None]:
    """The one pass@k aggregation: mean unbiased estimate over tasks for each k <= n, null above n."""
    from ilf_lab.execution import mean_pass_at_k

    return {f"pass@{k}": (mean_pass_at_k(counts, k) if counts and k <= n else None) for k in ks}
