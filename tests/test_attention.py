"""The C++ decode-attention kernel (generation/attention.py, `sampling.attention`): torch's attention to float
rounding, row-independent, built once per host and checked before use, and the default only where it applies."""

from __future__ import annotations

import logging

import pytest
import torch

from ilf_lab.generation import SamplingParams, attention, kernels
from ilf_lab.generation.attention import (
    DecodeAttention,
    KernelUnavailable,
    kernel_error,
    kernel_store,
    keys_blocked,
    load_kernel,
    reference,
    resolve_attention,
)
from ilf_lab.generation.hf import HFEngine
from ilf_lab.generation.kernels import unbuildable
from tests.conftest import PROMPTS

# skipped only where the kernels cannot be built at all; a build that fails its check against torch fails here
needs_kernel = pytest.mark.skipif(unbuildable() is not None, reason=f"no CPU kernels here: {unbuildable()}")


def caches(gen, prompts: int, rows: int, kvh: int, hd: int, longest: int, new: int):
    """A layer-2 prompt store and own cache of random values ([layer, k|v, slot, kv_head, position, head_dim])."""
    pkv = torch.randn(2, 2, prompts + 1, kvh, longest, hd, generator=gen)
    kv = torch.randn(2, 2, rows + 1, kvh, new, hd, generator=gen)
    return pkv, kv


@needs_kernel
@pytest.mark.parametrize("kvh,group,hd", [(3, 3, 64), (2, 1, 16), (1, 4, 32), (2, 2, 128), (1, 1, 8)])
def test_kernel_is_torch_attention_to_rounding(kvh, group, hd):
    """Prompts and own columns shorter and longer than a key block (64), 1-9 rows a prompt; NaN and inf in the
    prompt store past each prompt (the last key block's unused columns among them) are never read."""
    gen = torch.Generator().manual_seed(hd + group)
    pkv, kv = caches(gen, 4, 20, kvh, hd, 200, 100)
    row_prompt = [int(p) for p in torch.randint(0, 4, (20,), generator=gen)]
    row_prompt[:4] = [0, 1, 2, 3]  # every prompt has a row
    prompt_len = [1, 64, 65, 200]
    own = [int(n) for n in torch.randint(1, 101, (20,), generator=gen)]
    own[:3] = [1, 64, 100]
    q = torch.randn(20, kvh * group, 1, hd, generator=gen)
    for p, n in enumerate(prompt_len):  # what a slot may hold past its prompt (a longer prompt's, or worse)
        pkv[1, 0, p, :, n:], pkv[1, 1, p, :, n:] = float("nan"), float("inf")
    att = DecodeAttention(kernel_store(pkv), kv, kvh * group)
    got = att(1, q, att.plan(row_prompt, prompt_len, own), hd**-0.5)
    want = reference(q, pkv[1, 0], pkv[1, 1], kv[1, 0], kv[1, 1], row_prompt, prompt_len, own, hd**-0.5)
    assert got.shape == (20 * kvh, group, hd)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("group", [3, 2])  # 2: a row's queries straddle the kernel's 3-query tiles (and 8, 6)
def test_a_rows_result_does_not_depend_on_the_batch(group):
    """A row (its prompt's columns, its own columns, its query) gives bitwise the same output alone, at another row
    index beside other rows, and under another thread count: whatever tile of the kernel its queries land in."""
    gen = torch.Generator().manual_seed(1)
    heads = 3 * group
    pkv, kv = caches(gen, 3, 6, 3, 64, 150, 30)
    q = torch.randn(6, heads, 1, 64, generator=gen)
    att = DecodeAttention(kernel_store(pkv), kv, heads)
    lens, own = [150, 90, 7], [30, 1, 12, 5, 19, 2]
    full = att(0, q, att.plan([0, 1, 2, 1, 0, 2], lens, own), 0.125).view(6, 3, group, 64)

    alone_pkv, alone_kv = torch.zeros_like(pkv), torch.zeros_like(kv)
    alone_pkv[:, :, 0], alone_kv[:, :, 0] = pkv[:, :, 1], kv[:, :, 3]  # row 3 (prompt 1) as the only row
    alone = DecodeAttention(kernel_store(alone_pkv), alone_kv, heads)
    assert torch.equal(alone(0, q[3:4], alone.plan([0], [90], [5]), 0.125).view(3, group, 64), full[3])

    kv[:, :, 5] = kv[:, :, 3]  # row 3 again, now also at index 5, beside the others, on one thread
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if threads > 1 else 2)
    try:
        moved = att(0, torch.cat([q[:5], q[3:4]]), att.plan([0, 1, 2, 1, 0, 1], lens, own[:5] + [5]), 0.125)
    finally:
        torch.set_num_threads(threads)
    moved = moved.view(6, 3, group, 64)
    assert torch.equal(moved[5], full[3]) and torch.equal(moved[:5], full[:5])


def test_keys_are_blocked_by_64_positions_each_transposed():
    k = torch.arange(2 * 128 * 8, dtype=torch.float32).view(2, 128, 8)  # [head, position, head_dim]
    b = keys_blocked(k)
    assert b.shape == k.shape
    flat = b.reshape(2, 2, 8, 64)  # [head, block, head_dim, position in block]
    assert torch.equal(flat[1, 1, 3, 5], k[1, 64 + 5, 3]) and torch.equal(flat[0, 0, 7], k[0, :64, 7])
    with pytest.raises(ValueError, match="whole blocks of 64"):
        keys_blocked(k[:, :100])
    store = kernel_store(torch.randn(1, 2, 1, 2, 70, 8))  # padded to 128, the padding zero
    assert store.shape[4] == 128 and store[0, 1, 0, :, 70:].abs().sum() == 0
    one = torch.randn(1, 2, 1, 2, 64, 64)  # one block of 64 x 64: keys_blocked is then a view of what it blocks
    assert torch.equal(kernel_store(one)[:, 0], keys_blocked(one[:, 0]))


@needs_kernel
def test_a_slot_without_rows_is_skipped():
    """A prompt slot no row samples from (a hole the next prompt will take) is read by no query: the rows of the
    slots around it get torch's attention, whatever the hole holds."""
    gen = torch.Generator().manual_seed(5)
    pkv, kv = caches(gen, 3, 4, 3, 64, 130, 70)
    pkv[:, :, 1] = float("nan")
    q = torch.randn(4, 9, 1, 64, generator=gen)
    att = DecodeAttention(kernel_store(pkv), kv, 9)
    rows, lens, own = [0, 2, 2, 0], [130, 1, 66], [70, 1, 64, 3]
    got = att(1, q, att.plan(rows, lens, own), 0.125)
    want = reference(q, pkv[1, 0], pkv[1, 1], kv[1, 0], kv[1, 1], rows, lens, own, 0.125)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_plan_rejects_rows_the_caches_cannot_hold():
    gen = torch.Generator().manual_seed(2)
    pkv, kv = caches(gen, 2, 4, 1, 16, 10, 5)
    att = DecodeAttention(kernel_store(pkv), kv, 2)
    with pytest.raises(ValueError, match="out of range"):
        att.plan([0, 2], [4, 4], [1, 1])  # prompt slot 2 of 2
    with pytest.raises(ValueError, match="out of range"):
        att.plan([0, 1], [4, 4], [1, 6])  # 6 own columns of 5
    with pytest.raises(ValueError, match="prompt length"):
        att.plan([0, 1], [4, 65], [1, 1])  # the store holds 64 positions (one block)
    with pytest.raises(ValueError, match="do not fit"):
        att.plan([0] * 6, [4], [1] * 6)
    with pytest.raises(ValueError, match="do not match"):
        att(0, torch.randn(3, 2, 1, 16), att.plan([0, 1], [4, 4], [1, 1]), 0.25)
    with pytest.raises(ValueError, match="fp32"):
        DecodeAttention(kernel_store(pkv).double(), kv, 2)
    with pytest.raises(ValueError, match="differ"):
        DecodeAttention(torch.zeros(2, 2, 3, 1, 64, 8), kv, 2)  # another head_dim
    with pytest.raises(ValueError, match="contiguous"):
        DecodeAttention(kernel_store(pkv).transpose(4, 5).contiguous().transpose(4, 5), kv, 2)
    with pytest.raises(ValueError, match="head_dim in"):
        DecodeAttention(torch.zeros(2, 2, 2, 1, 64, 24), torch.zeros(2, 2, 2, 1, 4, 24), 2)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        DecodeAttention(torch.zeros(2, 2, 2, 2, 64, 16), torch.zeros(2, 2, 2, 2, 4, 16), 3)
    with pytest.raises(ValueError, match="blocks of 64 positions"):
        DecodeAttention(pkv, kv, 2)  # keys as rows, 10 positions
    other = DecodeAttention(kernel_store(pkv), kv.clone(), 2)
    with pytest.raises(ValueError, match="made by the DecodeAttention"):
        att(0, torch.randn(2, 2, 1, 16), other.plan([0, 1], [4, 4], [1, 1]), 0.25)


@needs_kernel
def test_engine_kernel_samples_as_the_matmuls_and_independently_of_the_batch(peaked_llama):
    """Greedy decoding on a tiny Llama: the kernel's tokens are the matmuls'; seeded samples do not depend on the
    batch size (rows beside a row, refills, compaction)."""
    _, model, tok = peaked_llama
    greedy = SamplingParams(n=1, temperature=0, max_new_tokens=12)
    kernel = HFEngine(model, tok, batch_size=8, attention="kernel")
    assert kernel.attention == "kernel"
    assert kernel.generate(PROMPTS, greedy) == HFEngine(model, tok, batch_size=8, attention="matmul").generate(
        PROMPTS, greedy)
    params = SamplingParams(n=3, temperature=1.0, top_p=0.95, max_new_tokens=12, seed=7)
    wide = kernel.generate(PROMPTS, params)
    assert HFEngine(model, tok, batch_size=3, attention="kernel").generate(PROMPTS, params) == wide


def test_default_and_errors(peaked_llama, monkeypatch, tmp_path, caplog):
    """Runs where the kernel cannot build too: the fallback is what such a host gets."""
    _, model, tok = peaked_llama
    default = "kernel" if kernel_error() is None else "matmul"
    assert HFEngine(model, tok).attention == default  # CPU, slots backend, shared prompt KV
    assert HFEngine(model, tok, prompt_kv="copy").attention == "matmul"
    with pytest.raises(ValueError, match="shared prompt KV"):
        HFEngine(model, tok, prompt_kv="copy", attention="kernel")
    with pytest.raises(ValueError, match="attention must be"):
        resolve_attention("flash", model, "slots", "shared")
    # no compiler: the default falls back to the matmuls with a warning; asking for the kernel is an error
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("ILF_LAB_KERNEL_DIR", str(tmp_path / "kernels"))
    kernels._loaded.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="ilf_lab.generation.attention"):
            assert resolve_attention(None, model, "slots", "shared") == "matmul"
        assert "no-such-compiler" in caplog.text
        with pytest.raises(ValueError, match="no-such-compiler"):
            resolve_attention("kernel", model, "slots", "shared")
        caplog.clear()
        assert resolve_attention(None, model, "slots", "shared") == "matmul"  # the failure is remembered
        assert "no-such-compiler" in caplog.text
        monkeypatch.setenv("CXX", "true")  # ...not retried within the process, even once a compiler appears
        assert kernel_error() is not None and "no-such-compiler" in kernel_error()
    finally:
        kernels._loaded.cache_clear()


@needs_kernel
def test_a_build_is_checked_before_it_is_served(monkeypatch, tmp_path):
    """A file at the build's name that does not load is rebuilt once; a build that computes something else than
    torch's attention is refused and removed. (A library this process has loaded is never rewritten here.)"""
    monkeypatch.setenv("ILF_LAB_KERNEL_DIR", str(tmp_path))
    path = kernels.library_path(kernels._compiler())
    path.write_bytes(b"not a shared library")
    kernels._loaded.cache_clear()
    try:
        load_kernel()
        assert path.read_bytes()[:4] == b"\x7fELF"  # rebuilt over the damaged file, then loaded
        kernels._loaded.cache_clear()
        monkeypatch.setattr(attention, "_self_check", lambda fn, hd: float("nan"))  # disagrees with torch
        with pytest.raises(KernelUnavailable, match="ilf_decode_attention disagrees"):
            load_kernel()
        assert not path.exists()  # not left for the next process
    finally:
        kernels._loaded.cache_clear()
