"""Opt-in int8 sampling (generation/quantize.py, `sampling.quantize=int8`): close to fp32, samples that depend
only on their own prompt, refusals, and the warning where this host's int8 GEMM is slower than fp32."""

from __future__ import annotations

import copy

import pytest
import torch

from ilf_lab.generation import SamplingParams
from ilf_lab.generation.hf import HFEngine
from ilf_lab.models.loading import build_tiny_random, load_model
from tests.conftest import PROMPTS


def test_int8_linear_layers_track_fp32_and_leave_the_model_alone(peaked_llama, tmp_path):
    """`sampling.quantize=int8`: every linear layer (the LM head too) of a copy becomes int8; its logits stay
    within int8's rounding of fp32's (a bug in scales or layout would be off by O(1)); the input model is
    untouched, since a trainer may hold it."""
    from ilf_lab.generation.quantize import Int8Linear, quantize_linear

    model, tok = load_model(str(build_tiny_random(tmp_path)))  # default init: no blown-up activations
    q = quantize_linear(model, "int8")
    assert isinstance(q.lm_head, Int8Linear) and isinstance(q.model.layers[0].mlp.down_proj, Int8Linear)
    assert not any(isinstance(m, Int8Linear) for m in model.modules())
    ids = tok(PROMPTS[2], return_tensors="pt").input_ids
    with torch.inference_mode():
        ref, got = model(ids).logits, q(ids).logits
    err = float((got - ref).norm() / ref.norm())
    assert 0 < err < 0.05, err
    lin = torch.nn.Linear(64, 5, bias=True)
    x = torch.randn(3, 7, 64)
    with torch.no_grad():
        err = float((Int8Linear(lin)(x) - lin(x)).norm() / lin(x).norm())
        assert 0 < err < 0.02, err
        assert torch.equal(Int8Linear(lin)(torch.zeros(2, 64)), lin.bias.expand(2, 5))


@pytest.mark.parametrize("prompt_kv", ["shared", "copy"])
def test_int8_samples_depend_only_on_their_own_prompt(peaked_llama, prompt_kv):
    """Inputs are quantised per row, and int8 products sum exactly, so a prompt's samples do not depend on what
    is batched beside it or on the batch size; the seed still decides them (with either prompt KV cache)."""
    from ilf_lab.generation.quantize import quantize_linear

    _, model, tok = peaked_llama
    int8 = quantize_linear(model, "int8")
    eng = HFEngine(int8, tok, batch_size=5, prompt_kv=prompt_kv)
    p = SamplingParams(n=3, temperature=1.0, max_new_tokens=10, seed=3)
    together = eng.generate(PROMPTS, p)
    assert together[2] == eng.generate([PROMPTS[2]], p)[0]
    assert together == HFEngine(int8, tok, batch_size=12, prompt_kv=prompt_kv).generate(PROMPTS, p)
    assert together != eng.generate(PROMPTS, SamplingParams(n=3, temperature=1.0, max_new_tokens=10, seed=4))
    greedy = SamplingParams(n=1, temperature=0, max_new_tokens=12)
    assert eng.generate(PROMPTS, greedy) == HFEngine(eng.model, tok, backend="generic").generate(PROMPTS, greedy)


def test_int8_warns_where_the_host_int8_gemm_is_slower_than_fp32(peaked_llama, caplog):
    """int8 exists only to be faster; where this CPU's int8 GEMM is slower than fp32 (AVX2 without VNNI: 0.05 x)
    the conversion says so, naming the measured ratio, and is quiet where int8 pays."""
    import logging

    from ilf_lab.generation.quantize import int8_speed_note, int8_speedup, quantize_linear

    speedup = int8_speedup()
    assert 0 < speedup < float("inf")
    with caplog.at_level(logging.WARNING, logger="ilf_lab.generation.quantize"):
        quantize_linear(peaked_llama[1], "int8")
    warned = [r.getMessage() for r in caplog.records if "GEMM" in r.getMessage()]
    assert warned == ([int8_speed_note(speedup)] if speedup < 1 else [])
    assert "0.05 x fp32" in int8_speed_note(0.05) and "slower than fp32" in int8_speed_note(0.05)


def test_int8_needs_fp32_weights_on_cpu(peaked_llama):
    from ilf_lab.errors import ConfigError
    from ilf_lab.generation.quantize import quantize_linear

    with pytest.raises(ConfigError, match="needs fp32 weights on CPU"):
        quantize_linear(copy.deepcopy(peaked_llama[1]).to(torch.bfloat16), "int8")


def test_int8_refuses_models_it_would_only_partly_convert():
    """A weight matrix int8 cannot take (GPT-2/CodeGen-style Conv1D, a Linear subclass) would leave an "int8" run
    mostly fp32: refused, as is a model with no linear layer at all."""
    from transformers.pytorch_utils import Conv1D

    from ilf_lab.errors import ConfigError
    from ilf_lab.generation.quantize import is_quantized, quantize_linear

    class Sub(torch.nn.Linear):
        pass

    for model in (torch.nn.Sequential(torch.nn.Linear(8, 8), Conv1D(8, 8)), torch.nn.Sequential(Sub(8, 8)),
                  torch.nn.Sequential(torch.nn.Embedding(4, 8))):
        with pytest.raises(ConfigError, match="plain nn.Linear layers only"):
            quantize_linear(model, "int8")
    inplace = torch.nn.Sequential(torch.nn.Linear(8, 8))
    assert quantize_linear(inplace, "int8", copy=False) is inplace and is_quantized(inplace[0])
