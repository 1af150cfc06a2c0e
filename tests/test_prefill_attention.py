"""The C++ prefill-attention kernel (generation/attention.py `prefill_attention`, csrc/prefill_attention.cpp): causal
attention after a held prefix, equal to torch's to float rounding, a prompt's result independent of the batch and its
padding, bad arguments refused, and the prefill's default where the kernels build."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ilf_lab.generation import attention, kernels
from ilf_lab.generation.attention import prefill_attention, prefill_reference
from ilf_lab.generation.kernels import kernel, unbuildable

needs_kernel = pytest.mark.skipif(unbuildable() is not None, reason=f"no CPU kernels here: {unbuildable()}")


def inputs(gen, b: int, t: int, c: int, kvh: int, g: int, hd: int):
    """q as prefill makes it (a [b, heads, t, hd] view of [b, t, heads, hd]), k and v with the prefix's c first."""
    q = torch.randn(b, t, kvh * g, hd, generator=gen).transpose(1, 2)
    k, v = (torch.randn(b, kvh, c + t, hd, generator=gen) for _ in range(2))
    return q, k, v


@needs_kernel
@pytest.mark.parametrize("kvh,g,hd", [(3, 3, 64), (2, 1, 16), (1, 4, 32), (2, 2, 128), (1, 1, 8)])
@pytest.mark.parametrize("c", [0, 57])
def test_prefill_kernel_is_torch_attention_to_rounding(kvh, g, hd, c):
    """Prompts of 37 positions (blocks of 8 and a partial one) down to none, with and without a prefix: the
    reference in float64 and torch's masked scaled_dot_product_attention (what prefill ran before) on every real
    position; zero on the padding."""
    gen = torch.Generator().manual_seed(hd + g + c)
    q, k, v = inputs(gen, 5, 37, c, kvh, g, hd)
    lens = torch.tensor([37, 20, 8, 1, 0])
    got = prefill_attention(kernel("ilf_prefill_attention"), q, k, v, lens, hd**-0.5)
    assert got.shape == (5, 37, kvh * g * hd)
    torch.testing.assert_close(got.double(), prefill_reference(q, k, v, lens, hd**-0.5), rtol=1e-5, atol=1e-5)
    cols, rows = torch.arange(c + 37), torch.arange(37)
    mask = (cols.unsqueeze(0) < c) | (cols.unsqueeze(0) - c <= rows.unsqueeze(1))
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=hd**-0.5, enable_gqa=True)
    sdpa = sdpa.transpose(1, 2).reshape(5, 37, -1)
    for p, n in enumerate(lens.tolist()):
        torch.testing.assert_close(got[p, :n], sdpa[p, :n], rtol=1e-5, atol=1e-5)
        assert not got[p, n:].any()


@needs_kernel
def test_a_prompts_result_does_not_depend_on_the_batch():
    """A prompt alone and unpadded, and beside others in a wider padded batch on another thread count: bitwise the
    same output."""
    gen = torch.Generator().manual_seed(3)
    fn = kernel("ilf_prefill_attention")
    q, k, v = inputs(gen, 3, 30, 11, 3, 3, 64)
    lens = torch.tensor([30, 19, 26])
    full = prefill_attention(fn, q, k, v, lens, 0.125)
    alone_q = q[1:2, :, :19].transpose(1, 2).contiguous().transpose(1, 2)
    alone_k, alone_v = (x[1:2, :, : 11 + 19].contiguous() for x in (k, v))
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if threads > 1 else 2)
    try:
        alone = prefill_attention(fn, alone_q, alone_k, alone_v, torch.tensor([19]), 0.125)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(alone[0], full[1, :19])


@needs_kernel
def test_prefill_attention_refuses_what_it_cannot_take():
    gen = torch.Generator().manual_seed(4)
    fn = kernel("ilf_prefill_attention")
    q, k, v = inputs(gen, 2, 9, 0, 1, 2, 16)
    lens = torch.tensor([9, 4])
    with pytest.raises(ValueError, match="contiguous fp32"):
        prefill_attention(fn, q.contiguous(), k, v, lens, 0.25)  # q not in prefill's [b, t, heads, hd] memory order
    with pytest.raises(ValueError, match="contiguous fp32"):
        prefill_attention(fn, q, k.double(), v.double(), lens, 0.25)
    with pytest.raises(ValueError, match="int64 lens"):
        prefill_attention(fn, q, k, v, lens.int(), 0.25)
    with pytest.raises(ValueError, match="int64 lens"):
        prefill_attention(fn, q, k, v, torch.tensor([9]), 0.25)
    with pytest.raises(ValueError, match="contiguous fp32"):
        prefill_attention(fn, q, k[:, :, :5].contiguous(), v[:, :, :5].contiguous(), lens, 0.25)  # < t positions
    with pytest.raises(RuntimeError, match="code 1"):
        prefill_attention(fn, q, k, v, torch.tensor([10, 4]), 0.25)  # more positions than the batch has
    with pytest.raises(RuntimeError, match="code 1"):
        prefill_attention(fn, q, k, v, torch.tensor([-1, 4]), 0.25)


@needs_kernel
def test_prefill_runs_every_layer_but_the_last_through_the_kernel():
    """SlotCache's prefill with packed linears (the CPU default) attends through the kernel in every layer whose
    every position is read on (the last layer runs one query per prompt: torch's), with each prompt's own length."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ilf_lab.generation.packed import PackedLinears
    from ilf_lab.generation.slots import SlotCache

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg).eval()
    cache = SlotCache(model, 4, 40, linears=PackedLinears())
    assert cache.prefill_kernel is not None
    calls: list[tuple] = []
    real = cache.prefill_kernel
    cache.prefill_kernel = lambda *args: (calls.append(args), real(*args))[1]  # counts the calls
    prompts = [[5, 9, 2], [7] * 11, [3, 4, 5, 6]]
    with torch.inference_mode():
        got = cache.prefill(prompts, 0, 1)
    assert len(calls) == cfg.num_hidden_layers - 1
    assert all(args[5:8] == (3, 11, 0) for args in calls)  # b, t, prefix
    for p, row in zip(prompts, got, strict=True):
        torch.testing.assert_close(row, model(torch.tensor([p])).logits[0, -1], rtol=1e-4, atol=1e-4)


@needs_kernel
def test_a_prefill_kernel_that_disagrees_is_not_served(monkeypatch, tmp_path):
    """A build whose prefill kernel computes something else than torch's attention: that kernel is refused with a
    warning naming it, the others are still served, and prefill runs torch's attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ilf_lab.generation.packed import PackedLinears
    from ilf_lab.generation.slots import SlotCache

    monkeypatch.setenv("ILF_LAB_KERNEL_DIR", str(tmp_path))
    monkeypatch.setattr(attention, "check_prefill", lambda fn: "disagrees with torch's attention by nan")
    kernels._loaded.cache_clear()
    try:
        assert "ilf_prefill_attention disagrees" in kernels.kernel_error("ilf_prefill_attention")
        assert kernels.kernel_error("ilf_rope_qkv") is None and kernels.kernel_error("ilf_decode_attention") is None
        cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
        cache = SlotCache(LlamaForCausalLM(cfg).eval(), 2, 16, linears=PackedLinears())
        assert cache.rope_kernel is not None and cache.prefill_kernel is None
    finally:
        kernels._loaded.cache_clear()


@needs_kernel
def test_prefill_falls_back_to_torch_for_head_sizes_the_kernel_lacks():
    """Head size 24 (not compiled): the rope kernel still runs, prefill attends with torch's, and the wrapper refuses
    such inputs by name."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ilf_lab.generation.packed import PackedLinears
    from ilf_lab.generation.slots import SlotCache

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=96, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg).eval()
    cache = SlotCache(model, 2, 16, linears=PackedLinears())
    assert cache.rope_kernel is not None and cache.prefill_kernel is None
    with torch.inference_mode():
        got = cache.prefill([[5, 9, 2, 7]], 0, 1)
    torch.testing.assert_close(got[0], model(torch.tensor([[5, 9, 2, 7]])).logits[0, -1], rtol=1e-4, atol=1e-4)
    q, k, v = inputs(torch.Generator().manual_seed(0), 1, 4, 0, 2, 2, 24)
    with pytest.raises(ValueError, match="hd in"):
        prefill_attention(kernel("ilf_prefill_attention"), q, k, v, torch.tensor([4]), 0.2)
