"""oneDNN-packed fp32 linear layers (generation/packed.py, `sampling.cpu_linear`): the same products as F.linear to
float rounding, row-independent, never stale, and the engine's default only where it applies."""

from __future__ import annotations

import copy

import pytest
import torch

from ilf_lab.generation import SamplingParams, make_engine
from ilf_lab.generation.hf import HFEngine
from ilf_lab.generation.packed import PackedLinears, bf16_available, onednn_available, resolve_cpu_linear
from tests.conftest import PROMPTS

pytestmark = pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN packed linear")

def test_packed_linear_is_f_linear_to_rounding_and_row_independent():
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 200, bias=True)
    packed = PackedLinears()
    x = torch.randn(300, 96)
    with torch.no_grad():
        got, ref = packed.linear(lin, x), lin(x)
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5) and got.shape == ref.shape
        for rows in (1, 3, 17, 64, 299):  # a row's output does not depend on the rows beside it
            assert torch.equal(packed.linear(lin, x[:rows].contiguous()), got[:rows])
        three = packed.linear(lin, x.view(3, 100, 96))  # any leading dims
        assert three.shape == (3, 100, 200) and torch.equal(three.reshape(300, 200), got)
        strided = x.t().contiguous().t()  # not contiguous
        assert not strided.is_contiguous() and torch.allclose(packed.linear(lin, strided), ref, rtol=1e-5, atol=1e-5)
        swish = packed.linear(lin, x, "swish")
        assert torch.allclose(swish, torch.nn.functional.silu(ref), rtol=1e-5, atol=1e-5)


needs_bf16 = pytest.mark.skipif(not bf16_available(), reason="no native bf16 matmul in this host's oneDNN")


@needs_bf16
def test_bf16_packed_linear_is_the_bf16_product_in_fp32_and_row_independent():
    """cpu_linear=onednn_bf16: input and weights rounded to bf16, fp32 sums, the output rounded to bf16 and handed
    back in fp32: each element within half a bf16 step of the product of the rounded operands (plus fp32 summation
    error); a row's output does not depend on the rows beside it, at the model's widths too (so samples do not
    depend on the batch); a layer in `keep` stays the fp32 product."""
    torch.manual_seed(0)
    lin, wide = torch.nn.Linear(96, 200, bias=True), torch.nn.Linear(1536, 576, bias=False)
    packed = PackedLinears(torch.bfloat16, keep=(wide,))
    x = torch.randn(300, 96)
    with torch.no_grad():
        got = packed.linear(lin, x)
        assert got.dtype == torch.float32 and got.shape == (300, 200)
        xb, wb, bb = x.bfloat16().double(), lin.weight.bfloat16().double(), lin.bias.bfloat16().double()
        rounded = xb @ wb.t() + bb
        magnitude = xb.abs() @ wb.abs().t() + bb.abs()  # what the sums' rounding scales with
        assert ((got.double() - rounded).abs() <= 2**-8 * rounded.abs() + 1e-5 * magnitude).all()
        assert torch.equal(got, got.bfloat16().float())  # bf16 values
        assert not torch.equal(got, lin(x))  # not the fp32 product: the option has its own numerics
        for rows in (1, 3, 17, 64, 299):
            assert torch.equal(packed.linear(lin, x[:rows].contiguous()), got[:rows])
        swish = packed.linear(lin, x, "swish")
        assert torch.allclose(swish, torch.nn.functional.silu(got), rtol=2e-2, atol=2e-2)
        mlp = torch.nn.Linear(1536, 576, bias=False)  # the model's down projection's shape
        h = torch.randn(160, 1536)
        full = packed.linear(mlp, h)
        for rows in (1, 2, 7, 64, 128):
            assert torch.equal(packed.linear(mlp, h[:rows].contiguous()), full[:rows])
        kept = packed.linear(wide, h)
        assert torch.allclose(kept, wide(h), rtol=1e-5, atol=1e-5) and not torch.equal(kept, kept.bfloat16().float())
    assert sorted(str(w.dtype) for w in packed.weights()) == ["torch.bfloat16", "torch.bfloat16", "torch.float32"]
    both = torch.nn.ModuleList([lin, wide])  # what the engine budgets: bf16 layers at half size, the kept one in full
    assert packed.size(both) == (96 * 200 + 200) * 2 + 1536 * 576 * 4
    assert PackedLinears().size(both) == (96 * 200 + 200 + 1536 * 576) * 4
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        PackedLinears(torch.float16)


@needs_bf16
def test_bf16_engine_samples_independently_of_the_batch_and_near_fp32(peaked_llama):
    """The opt-in samples depend only on the seed and their own prompt; on the tiny model's peaked logits its
    greedy paths are fp32's; it is never the default."""
    _, model, tok = peaked_llama
    assert HFEngine(model, tok).cpu_linear == "onednn"
    bf16 = HFEngine(model, tok, batch_size=5, cpu_linear="onednn_bf16")
    greedy = SamplingParams(n=1, temperature=0, max_new_tokens=12)
    assert bf16.generate(PROMPTS, greedy) == HFEngine(model, tok, batch_size=5).generate(PROMPTS, greedy)
    stats = bf16.last_stats  # every layer's weights in bf16 but the LM head's
    assert stats["packed_bf16"] > 0 and stats["packed_linears"] == stats["packed_bf16"] + 1
    p = SamplingParams(n=3, temperature=1.0, max_new_tokens=10, seed=3)
    together = bf16.generate(PROMPTS, p)
    assert together[2] == bf16.generate([PROMPTS[2]], p)[0]
    assert together == HFEngine(model, tok, batch_size=12, cpu_linear="onednn_bf16").generate(PROMPTS, p)
    with pytest.raises(ValueError, match="needs fp32 weights on CPU and the slots backend"):
        HFEngine(model, tok, backend="generic", cpu_linear="onednn_bf16")


def test_bf16_is_refused_where_onednn_would_emulate_it(peaked_llama, monkeypatch):
    """On a host without native bf16 matmuls (AVX2: oneDNN would emulate them, slower than fp32) the opt-in is an
    error naming the way out, not a slow run."""
    import ilf_lab.generation.packed as packed

    _, model, tok = peaked_llama
    monkeypatch.setattr(packed, "bf16_available", lambda: False)  # this host's answer, as an AVX2 host gives it
    with pytest.raises(ValueError, match="no native bf16 matmul .* use onednn"):
        resolve_cpu_linear("onednn_bf16", model, "slots")
    assert resolve_cpu_linear(None, model, "slots") == "onednn"


def test_weights_changed_between_calls_are_sampled_with(peaked_llama):
    """A trainer may update the weights between two sampling calls, in place and even through `.data` (no version
    bump): the engine packs afresh each call, so the second call samples the new weights, and drops the copies."""
    _, model, tok = peaked_llama
    model = copy.deepcopy(model)
    one = HFEngine(model, tok, batch_size=5, cpu_linear="onednn")
    greedy = SamplingParams(n=1, temperature=0, max_new_tokens=8)
    before = one.generate(PROMPTS, greedy)
    assert one.last_stats["packed_linears"] > 0 and one._linears is None
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.data.mul_(-3.0)
        model.lm_head.weight.data.copy_(model.lm_head.weight.data.flip(0))  # tied to the embedding
    after = one.generate(PROMPTS, greedy)
    assert after != before and after == HFEngine(model, tok, batch_size=5, cpu_linear="aten").generate(PROMPTS, greedy)


def test_other_layers_run_as_they_are():
    """An int8 layer, a Linear subclass, a bf16 layer or an MLP of another shape is called as it is."""
    from ilf_lab.generation.quantize import Int8Linear

    class Sub(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) + 1

    torch.manual_seed(2)
    packed, x = PackedLinears(), torch.randn(3, 16)
    q = Int8Linear(torch.nn.Linear(16, 4))
    sub, half = Sub(16, 4), torch.nn.Linear(16, 4).to(torch.bfloat16)
    hooked = torch.nn.Linear(16, 4)
    hooked.register_forward_hook(lambda mod, inp, out: out * 0)
    gelu_mlp = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.GELU())

    class GeluGated(torch.nn.Module):  # a gate/up/down MLP whose activation is not SiLU
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj = (torch.nn.Linear(16, 8), torch.nn.Linear(16, 8),
                                                            torch.nn.Linear(8, 16))
            self.act_fn = torch.nn.GELU()

        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    gated = GeluGated()
    with torch.no_grad():
        assert torch.equal(packed.linear(q, x), q(x)) and torch.equal(packed.linear(sub, x), sub(x))
        assert torch.equal(packed.linear(half, x.bfloat16()), half(x.bfloat16()))
        assert torch.equal(packed.linear(hooked, x), torch.zeros(3, 4))  # its hook still runs
        assert torch.equal(packed.mlp(gelu_mlp, x), gelu_mlp(x)) and torch.equal(packed.mlp(gated, x), gated(x))
    assert len(packed) == 0  # none of them was packed
    gelu_packed = PackedLinears()
    gelu_packed.pack(gated)  # its gate and up are not fused (mlp() would not call them fused): packed one by one
    assert len(gelu_packed) == 3 and not gelu_packed._fused


def test_llama_mlp_with_fused_silu_matches_the_model(peaked_llama):
    _, model, _ = peaked_llama
    mlp, x = model.model.layers[0].mlp, torch.randn(5, 1, model.config.hidden_size)
    with torch.no_grad():
        assert torch.allclose(PackedLinears().mlp(mlp, x), mlp(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "mlp_bias"])
def test_gate_and_up_in_one_matmul_are_the_mlp_to_rounding(bias):
    """At SmolLM2's MLP shapes (576 -> 2 x 1536 -> 576) and decode and prefill row counts: one matmul for gate and
    up, then the SiLU-and-multiply kernel (or torch's SiLU), is the module to rounding; `pack` holds the fused copy, not gate and up alone. Gate and
    up with unalike biases do not fuse: the SiLU goes back into the gate projection, with the same result."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(4)
    mlp = LlamaMLP(LlamaConfig(hidden_size=576, intermediate_size=1536, mlp_bias=bias)).eval()
    packed = PackedLinears()
    packed.pack(mlp)
    assert len(packed) == 2 and id(mlp.gate_proj) not in packed._packed and id(mlp.down_proj) in packed._packed
    calls: list[int] = []  # rows through the SiLU-and-multiply kernel, where the kernels build (else torch's SiLU)
    if (real := packed._silu_mul) is not None:
        packed._silu_mul = lambda *args: (calls.append(args[2]), real(*args))[1]
    with torch.inference_mode():
        for rows in (1, 7, 110, 600):
            x = torch.randn(rows, 1, 576)
            torch.testing.assert_close(packed.mlp(mlp, x), mlp(x), rtol=1e-4, atol=1e-5)
        assert calls == ([1, 7, 110, 600] if real is not None else [])
        packed._silu_mul = None  # torch's SiLU after the fused product
        torch.testing.assert_close(packed.mlp(mlp, x), mlp(x), rtol=1e-4, atol=1e-5)
        mlp.up_proj = torch.nn.Linear(576, 1536, bias=not bias)  # biases not alike: no fused matmul
        alone = PackedLinears()
        alone.pack(mlp)
        assert len(alone) == 3 and alone._fused_call(mlp, ("gate_proj", "up_proj"), x) is None
        torch.testing.assert_close(alone.mlp(mlp, x), mlp(x), rtol=1e-4, atol=1e-5)


def test_engine_default_and_its_checks(peaked_llama):
    _, model, tok = peaked_llama
    assert HFEngine(model, tok).cpu_linear == "onednn"  # fp32 on CPU, slots backend
    assert HFEngine(model, tok, backend="generic").cpu_linear == "aten"
    assert HFEngine(model, tok, cpu_linear="aten").cpu_linear == "aten"
    with pytest.raises(ValueError, match="cpu_linear must be aten, onednn, onednn_bf16 or None"):
        resolve_cpu_linear("mkl", model, "slots")
    with pytest.raises(ValueError, match="needs fp32 weights on CPU and the slots backend"):
        HFEngine(model, tok, backend="generic", cpu_linear="onednn")
    half = copy.deepcopy(model).to(torch.bfloat16)
    assert HFEngine(half, tok).cpu_linear == "aten"
    with pytest.raises(ValueError, match=r"got torch.bfloat16 on cpu"):
        HFEngine(half, tok, cpu_linear="onednn")
    with pytest.raises(ValueError, match="cpu_linear applies to the hf engine"):
        make_engine("vllm", "unused", cpu_linear="aten")
    from ilf_lab.generation.quantize import quantize_linear

    int8 = quantize_linear(model, "int8")  # nothing left to pack: the default is aten, onednn is refused
    assert HFEngine(int8, tok).cpu_linear == "aten"
    with pytest.raises(ValueError, match="no plain fp32 nn.Linear layer to pack"):
        HFEngine(int8, tok, cpu_linear="onednn")


@pytest.mark.parametrize("prompt_kv", ["shared", "copy"])
def test_onednn_engine_samples_like_aten_and_independently_of_the_batch(peaked_llama, prompt_kv):
    """Greedy paths equal F.linear's (the tiny model's logits are peaked); sampled paths depend only on the seed
    and their own prompt, not on the batch size or on which prompts share the call."""
    _, model, tok = peaked_llama
    one = HFEngine(model, tok, batch_size=5, prompt_kv=prompt_kv, cpu_linear="onednn")
    aten = HFEngine(model, tok, batch_size=5, prompt_kv=prompt_kv, cpu_linear="aten")
    greedy = SamplingParams(n=1, temperature=0, max_new_tokens=12)
    assert one.generate(PROMPTS, greedy) == aten.generate(PROMPTS, greedy)
    assert one.last_stats["packed_linears"] > 0 and aten.last_stats["packed_linears"] == 0
    p = SamplingParams(n=3, temperature=1.0, max_new_tokens=10, seed=3)
    together = one.generate(PROMPTS, p)
    assert together[2] == one.generate([PROMPTS[2]], p)[0]
    big = HFEngine(model, tok, batch_size=12, prompt_kv=prompt_kv, cpu_linear="onednn")
    assert together == big.generate(PROMPTS, p)


def test_large_logits_in_row_chunks_sample_the_same(peaked_llama, monkeypatch):
    """Logits past glibc's mmap ceiling run the packed LM head in row chunks into the cache's buffer (no fresh
    mapping a step): the same samples as one matmul, since the packed matmul is row-independent."""
    from ilf_lab.generation import slots

    _, model, tok = peaked_llama
    p = SamplingParams(n=3, temperature=1.0, max_new_tokens=10, seed=3)
    greedy = SamplingParams(n=1, temperature=0, max_new_tokens=12)
    whole = [HFEngine(model, tok, batch_size=7, cpu_linear="onednn").generate(PROMPTS, q) for q in (p, greedy)]
    vocab = model.lm_head.out_features
    monkeypatch.setattr(slots, "LOGITS_MMAP_BYTES", 4 * vocab * 4)  # past 4 rows, in chunks of 4 (and a partial one)
    calls, buffers = [], set()
    real = slots.SlotCache._head_in_chunks

    def spy(self, h, vocab):
        out = real(self, h, vocab)
        calls.append(h.shape[0])
        buffers.add(out.data_ptr())
        return out

    monkeypatch.setattr(slots.SlotCache, "_head_in_chunks", spy)
    chunked = [HFEngine(model, tok, batch_size=7, cpu_linear="onednn").generate(PROMPTS, q) for q in (p, greedy)]
    assert chunked == whole and len(calls) > 5 and all(c > 4 for c in calls) and any(c % 4 for c in calls)
    assert len(buffers) <= 2  # one buffer per call's cache, reused step after step


def test_prefill_mlp_in_row_chunks_is_the_same(peaked_llama, monkeypatch):
    """Prefill's MLP runs in chunks of MLP_ROWS rows (its gate/up product stays in cache): the packed matmul is
    row-independent, so the prompts' logits are bitwise those of one pass, and so are the samples."""
    from ilf_lab.generation import slots
    from ilf_lab.generation.prefix import SharedPromptCache

    _, model, tok = peaked_llama
    ids = [tok(t)["input_ids"] for t in PROMPTS]
    p = SamplingParams(n=3, temperature=1.0, max_new_tokens=10, seed=3)

    def logits():
        cache = SharedPromptCache(model, 9, max(map(len, ids)), 4, linears=PackedLinears())
        with torch.inference_mode():
            return cache.prefill(ids, 0, 3)

    whole, whole_samples = logits(), HFEngine(model, tok, batch_size=7, cpu_linear="onednn").generate(PROMPTS, p)
    monkeypatch.setattr(slots, "MLP_ROWS", 3)
    rows, real = [], PackedLinears.mlp
    monkeypatch.setattr(PackedLinears, "mlp", lambda self, mlp, x: (rows.append(x.numel() // x.shape[-1]),
                                                                    real(self, mlp, x))[1])
    assert torch.equal(logits(), whole)
    assert max(rows) == 3 and sum(r < 3 for r in rows) > 0  # chunks of 3, the last one partial
    assert HFEngine(model, tok, batch_size=7, cpu_linear="onednn").generate(PROMPTS, p) == whole_samples
