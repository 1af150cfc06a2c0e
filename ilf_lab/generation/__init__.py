"""Sampling engines behind one interface: `make_engine(name, model_path).generate(prompts, SamplingParams)`."""

from __future__ import annotations

from typing import Any

from ilf_lab.generation.params import Engine, SamplingParams

__all__ = ["Engine", "SamplingParams", "make_engine", "vllm_available"]


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def make_engine(
    name: str,
    model_path: str,
    *,
    dtype: str = "float32",
    batch_size: int | None = None,
    model: Any = None,
    tokenizer: Any = None,
    prompt_kv: str | None = None,
    cpu_linear: str | None = None,
    attention: str | None = None,
    common_prefix: str | None = None,
) -> Engine:
    """An engine by name: "hf" (our batched loop, CPU or GPU) or "vllm" (GPU, needs the vllm extra).
    Pass an already-loaded `model`/`tokenizer` to reuse them (hf only; vLLM loads its own copy).
    int8 sampling (`sampling.quantize`): pass a model from `generation.quantize.quantize_linear`.
    `prompt_kv` (hf): "shared" holds a prompt's KV once for its n samples (generation/prefix.py; the default on
    Llama-family models), "copy" copies it into each sample's slot; None = the engine's default. `cpu_linear` (hf):
    "onednn" runs fp32 linear layers on CPU with oneDNN-packed weights (generation/packed.py; the default where
    available), "onednn_bf16" with them packed in bf16 (opt-in: new numerics), "aten" with F.linear. `attention` (hf): "kernel" attends over the shared prompt KV on CPU with a
    C++ kernel (generation/attention.py; the default where it builds), "matmul" with torch's batched matmuls.
    `common_prefix` (hf): "once" prefills the start all prompts of a call share once (generation/slots.py; the
    default on the slots backend on CPU), "each" with every prompt."""
    if name == "hf":
        from ilf_lab.generation.hf import HFEngine

        if model is None or tokenizer is None:
            from ilf_lab.models.loading import load_model, load_tokenizer

            if model is None:
                model, tok = load_model(model_path, dtype)
                tokenizer = tokenizer or tok
            else:
                tokenizer = load_tokenizer(model_path)
        return HFEngine(
            model, tokenizer, batch_size=batch_size, prompt_kv=prompt_kv, cpu_linear=cpu_linear, attention=attention,
            common_prefix=common_prefix,
        )
    if name == "vllm":
        if prompt_kv is not None:
            raise ValueError("prompt_kv applies to the hf engine (vLLM pages its own KV cache)")
        if cpu_linear is not None:
            raise ValueError("cpu_linear applies to the hf engine (vLLM runs on GPU)")
        if attention is not None:
            raise ValueError("attention applies to the hf engine (vLLM has its own)")
        if common_prefix is not None:
            raise ValueError("common_prefix applies to the hf engine (vLLM caches prefixes its own way)")
        from ilf_lab.generation.vllm_engine import VLLMEngine

        return VLLMEngine(model_path, dtype=dtype, batch_size=batch_size)
    raise ValueError(f"unknown engine {name!r} (expected 'hf' or 'vllm')")
