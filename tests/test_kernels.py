"""The CPU kernels' library (generation/kernels.py) and its residual add + RMSNorm kernel (csrc/rms_norm.cpp): one
build keyed by every source and header, and decode steps equal to torch's RMSNorm to float rounding."""

from __future__ import annotations

import pytest
import torch

from ilf_lab.generation import kernels
from ilf_lab.generation.kernels import kernel, unbuildable

# skipped only where the kernels cannot be built at all; a build that fails its check against torch fails here
needs_kernels = pytest.mark.skipif(unbuildable() is not None, reason=f"no CPU kernels here: {unbuildable()}")


def test_the_build_key_covers_every_source_and_header(monkeypatch, tmp_path):
    """A header edit must not serve the old library: the key hashes all of csrc/, not only the .cpp files."""
    cxx = kernels._compiler()
    if cxx is None:
        pytest.skip("no C++ compiler")
    csrc = tmp_path / "csrc"
    csrc.mkdir()
    for p in kernels.CSRC.iterdir():
        (csrc / p.name).write_text(p.read_text())
    monkeypatch.setattr(kernels, "CSRC", csrc)
    key = kernels.build_key(cxx)
    (csrc / "vec.h").write_text((csrc / "vec.h").read_text() + "\n// edited\n")
    assert kernels.build_key(cxx) != key
    assert {p.name for p in kernels.SOURCES} >= {"decode_attention.cpp", "top_p.cpp", "rms_norm.cpp"}


@needs_kernels
@pytest.mark.parametrize("n", [576, 64, 77])  # SmolLM2's hidden size, the tests' tiny models', a ragged tail
def test_add_rms_norm_is_torchs_to_rounding(n):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    gen = torch.Generator().manual_seed(n)
    norm = LlamaRMSNorm(n, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(n, generator=gen))
    x, d = torch.randn(13, 1, n, generator=gen), torch.randn(13, 1, n, generator=gen)
    want_x = x + d
    want = norm(want_x)
    fn = kernel("ilf_add_rms_norm")
    out = torch.empty_like(x)
    assert fn(x.data_ptr(), d.data_ptr(), norm.weight.data_ptr(), out.data_ptr(), 13, n, 1e-5) == 0
    torch.testing.assert_close(x, want_x, rtol=0, atol=0)  # the add is exact, in place
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert fn(x.data_ptr(), None, norm.weight.data_ptr(), out.data_ptr(), 13, n, 1e-5) == 0  # no add
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert fn(x.data_ptr(), None, norm.weight.data_ptr(), out.data_ptr(), 13, 0, 1e-5) == 1  # refused


@needs_kernels
def test_decode_steps_with_the_norm_kernel_match_torchs_norms():
    """SlotCache.decode with the kernel (the default on CPU) and with torch's RMSNorm modules: the same logits to
    float rounding over several steps, grouped-query heads, rows of different lengths."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ilf_lab.generation.slots import SlotCache

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg).eval()
    fast, plain = SlotCache(model, 6, 32), SlotCache(model, 6, 32)
    assert fast.norm_kernel is not None and len(fast._rms_norms) == 2 * cfg.num_hidden_layers + 1
    plain._rms_norms = {}  # torch's modules
    calls: list[int] = []
    real = fast.norm_kernel
    fast.norm_kernel = lambda *args: (calls.append(args[4]), real(*args))[1]  # counts the kernel's calls (rows)
    prompts = [[5, 9, 2], [7] * 11, [3, 4, 5, 6]]
    with torch.inference_mode():
        for c in (fast, plain):
            c.prefill(prompts, 0, 2)
        lens = torch.tensor([len(p) for p in prompts for _ in range(2)])
        for step in range(5):
            tokens = (torch.arange(6) * 7 + step) % 97
            got = fast.decode(tokens, lens, int(lens.max()) + 1)
            torch.testing.assert_close(got, plain.decode(tokens, lens, int(lens.max()) + 1), rtol=1e-4, atol=1e-4)
            lens += 1
    assert calls == [6] * (5 * (2 * cfg.num_hidden_layers + 1))  # every norm of every step ran in the kernel
