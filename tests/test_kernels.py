"""The CPU kernels' library (generation/kernels.py), its residual add + RMSNorm kernel (csrc/rms_norm.cpp), its
rotary embedding + cache write (csrc/rope.cpp) and its SiLU-and-multiply (csrc/silu_mul.cpp): one build keyed by
every source and header, prefill and decode steps equal to torch's RMSNorm to float rounding and bitwise torch's
q/k/v projections and rotary embedding."""

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
    assert {p.name for p in kernels.SOURCES} >= {"decode_attention.cpp", "top_p.cpp", "rms_norm.cpp", "rope.cpp"}


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
def test_silu_mul_kernel_is_torchs_to_rounding_and_row_independent():
    """SiLU(gate) * up after the fused gate/up product (packed.py): torch's to float rounding at SmolLM2's width and
    at one that is not a multiple of 8; a row's output is the same whatever rows are beside it and whatever the
    thread count; arguments it cannot take are refused."""
    fn = kernel("ilf_silu_mul")
    torch.manual_seed(5)
    for f in (1536, 37):
        x = torch.randn(50, 2 * f) * 3
        out, alone, serial = torch.empty(50, f), torch.empty(3, f), torch.empty(50, f)
        assert fn(x.data_ptr(), out.data_ptr(), 50, f, 2) == 0
        torch.testing.assert_close(out, torch.nn.functional.silu(x[:, :f]) * x[:, f:], rtol=1e-5, atol=1e-6)
        assert fn(x[7:10].data_ptr(), alone.data_ptr(), 3, f, 2) == 0 and torch.equal(alone, out[7:10])
        assert fn(x.data_ptr(), serial.data_ptr(), 50, f, 1) == 0 and torch.equal(serial, out)
    assert fn(x.data_ptr(), out.data_ptr(), 5, 0, 2) == 1 and fn(x.data_ptr(), out.data_ptr(), 5, f, 0) == 1


PROMPTS = [[5, 9, 2], [7] * 11, [3, 4, 5, 6]]  # right-padded to 11 tokens in one prefill


def _decode_both(fast, plain, compare) -> None:
    """Prefill three prompts x 2 rows into both caches, then 5 decode steps; compare(fast's, plain's) per step."""
    with torch.inference_mode():
        for c in (fast, plain):
            c.prefill(PROMPTS, 0, 2)
        lens = torch.tensor([len(p) for p in PROMPTS for _ in range(2)])
        for step in range(5):
            tokens = (torch.arange(6) * 7 + step) % 97
            compare(fast.decode(tokens, lens, int(lens.max()) + 1), plain.decode(tokens, lens, int(lens.max()) + 1))
            lens += 1


@needs_kernels
def test_decode_steps_with_the_norm_kernel_match_torchs_norms():
    """SlotCache's prefill and decode with the kernel (the default on CPU) and with torch's RMSNorm modules: the same
    logits to float rounding over several steps, grouped-query heads, rows of different lengths."""
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
    _decode_both(fast, plain, lambda got, want: torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4))
    layers = cfg.num_hidden_layers  # prefill's norms (3 prompts right-padded to 11 tokens: 33 rows; the last
    # layer's second norm at each prompt's last position only), then every norm of every step, all in the kernel
    assert calls == [33] * (2 * layers - 1) + [3] + [6] * (5 * (2 * layers + 1))


def _tiny_llama(bias: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, attention_bias=bias)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for m in model.modules():  # transformers starts biases at zero: a dropped or misplaced one would not show
            if isinstance(m, torch.nn.Linear) and m.bias is not None:
                m.bias.normal_()
    return model


@needs_kernels
@pytest.mark.parametrize("shared", [False, True], ids=["copied_kv", "shared_kv"])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "qkv_bias"])
def test_decode_steps_with_the_rope_kernel_are_bitwise_torchs(shared, bias):
    """One packed q/k/v matmul + the rope kernel (the CPU default with packed linears, in prefill and decode)
    against three projections and torch's rotary embedding, concatenation and index copies: the same logits and
    cache step after step (to rounding: the kernel is bitwise torch's, `check_rope`, but one matmul for three need
    not sum in the same blocks on every CPU)."""
    from ilf_lab.generation.packed import PackedLinears
    from ilf_lab.generation.prefix import SharedPromptCache
    from ilf_lab.generation.slots import SlotCache

    model = _tiny_llama(bias)

    def cache():
        if shared:
            return SharedPromptCache(model, 6, 16, 12, linears=PackedLinears(), attention="kernel")
        return SlotCache(model, 6, 32, linears=PackedLinears())

    fast, plain = cache(), cache()
    assert fast.rope_kernel is not None
    plain.rope_kernel = None
    calls: list[int] = []
    real = fast.rope_kernel
    fast.rope_kernel = lambda *args: (calls.append(args[10]), real(*args))[1]  # counts the kernel's calls (rows)
    _decode_both(fast, plain, lambda got, want: torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5))
    # every cache column a row reads: the padding past a prompt is never read (its attention is zero in the prefill
    # kernel, attention.py, and whatever torch's masked attention makes of it without it)
    for slot, n in enumerate(len(p) + 5 for p in PROMPTS for _ in range(2)):
        torch.testing.assert_close(fast.kv[:, :, slot, :, :n], plain.kv[:, :, slot, :, :n], rtol=1e-5, atol=1e-5)
    layers = model.config.num_hidden_layers
    assert calls == [3 * 11] * layers + [6] * (5 * layers)  # every layer of the prefill (3 prompts right-padded to
    # 11 tokens) and of every step ran in the kernel


@needs_kernels
def test_the_rope_kernel_gets_only_write_indices_inside_the_cache():
    from ilf_lab.generation.packed import PackedLinears
    from ilf_lab.generation.slots import SlotCache

    cache = SlotCache(_tiny_llama(False), 2, 8, linears=PackedLinears())
    rows = cache.kv[0, 0].numel() // cache.head_dim
    with pytest.raises(ValueError, match="write index"):
        cache._check_write_index(torch.tensor([0, 1, 2, rows]), 2)
    with pytest.raises(ValueError, match="write index"):
        cache._check_write_index(torch.tensor([-1, 1, 2, 3]), 2)
    cache._check_write_index(torch.tensor([0, 1, 2, rows - 1]), 2)
    assert kernels.SIGNATURES.keys() == kernels._checks(kernels._loaded()[0]).keys()  # each kernel is checked
    assert kernels._checks(kernels._loaded()[0])["ilf_rope_qkv"] is None


def test_the_rope_check_fails_a_kernel_that_writes_nothing():
    from ilf_lab.generation.slots import check_rope

    assert "bitwise" in check_rope(lambda *args: 0)
    assert "code 1" in check_rope(lambda *args: 1)


def test_one_packed_qkv_matmul_is_the_three_projections_to_rounding():
    """At SmolLM2's shapes (576 -> 9 + 3 + 3 heads of 64) and decode-step row counts, with and without biases."""
    from types import SimpleNamespace

    from ilf_lab.generation.packed import PackedLinears, onednn_available

    if not onednn_available():
        pytest.skip("no oneDNN packed linear in this torch")
    torch.manual_seed(3)
    for bias in (False, True):
        attn = SimpleNamespace(q_proj=torch.nn.Linear(576, 576, bias=bias), k_proj=torch.nn.Linear(576, 192, bias=bias),
                               v_proj=torch.nn.Linear(576, 192, bias=bias))
        linears = PackedLinears()
        for rows in (1, 7, 110):
            x = torch.randn(rows, 1, 576)
            with torch.inference_mode():
                want = torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], -1)
                torch.testing.assert_close(linears.qkv(attn, x), want, rtol=1e-5, atol=1e-5)
    attn.k_proj = torch.nn.Linear(576, 192, bias=False)  # biases not alike: no fused matmul
    assert PackedLinears().qkv(attn, x) is None


@needs_kernels
def test_a_kernel_that_fails_its_check_is_refused_alone(monkeypatch, tmp_path):
    """One library, but a kernel off against torch takes only itself out; the file is not left for the next process."""
    from ilf_lab.generation import slots
    from ilf_lab.generation.kernels import KernelUnavailable

    monkeypatch.setenv("ILF_LAB_KERNEL_DIR", str(tmp_path))
    monkeypatch.setattr(slots, "check_rope", lambda fn: "is off")
    kernels._loaded.cache_clear()
    try:
        with pytest.raises(KernelUnavailable, match="ilf_rope_qkv is off"):
            kernel("ilf_rope_qkv")
        assert "ilf_rope_qkv is off" in kernels.kernel_error("ilf_rope_qkv") and kernels.kernel_error() is None
        assert kernel("ilf_add_rms_norm") is not None and kernel("ilf_decode_attention") is not None
        assert not kernels.library_path(kernels._compiler()).exists()
    finally:
        kernels._loaded.cache_clear()


@needs_kernels
def test_another_march_is_its_own_build_and_passes_the_checks(monkeypatch, tmp_path):
    """$ILF_LAB_KERNEL_MARCH=x86-64-v3 builds as an AVX2 host would (session 23's slow-host emulation): its own key,
    every kernel checked against torch like the native build's; a target that assumes a feature this CPU lacks, an
    unknown one, or no target at all is refused with the reason instead of a SIGILL."""
    import platform
    import subprocess

    cxx = kernels._compiler()
    if platform.machine() != "x86_64" or "__AVX2__" not in kernels._features(cxx, "native"):
        pytest.skip("an x86-64 host with AVX2")
    monkeypatch.delenv(kernels.MARCH_ENV, raising=False)
    native = kernels.build_key(cxx)
    monkeypatch.setenv("ILF_LAB_KERNEL_DIR", str(tmp_path))
    monkeypatch.setenv(kernels.MARCH_ENV, "x86-64-v3")
    assert "-march=x86-64-v3" in kernels.flags() and kernels.build_key(cxx) != native
    built = []
    run = subprocess.run
    monkeypatch.setattr(kernels.subprocess, "run", lambda args, **kw: (built.append(args), run(args, **kw))[1])
    kernels._loaded.cache_clear()
    try:
        assert all(kernels.kernel_error(name) is None for name in kernels.SIGNATURES)
        assert kernels.library_path(cxx).exists()
        assert any("-march=x86-64-v3" in a and "-shared" in a for a in built)  # the library itself, for the target
    finally:
        kernels._loaded.cache_clear()
    for bad, why in [("x86-64-v2; rm -rf /", "is not a -march target"), ("-march=x86-64-v3", "the target alone"),
                     ("no-such-cpu", "does not know")]:
        monkeypatch.setenv(kernels.MARCH_ENV, bad)
        with pytest.raises(kernels.KernelUnavailable, match=why):
            kernels._build(cxx, tmp_path / "bad.so")
    # a CPU without AVX2 (as the compiler sees -march=native): x86-64-v3 is refused before anything is built
    real = kernels._features
    monkeypatch.setattr(kernels, "_features", lambda c, m: real(c, m) - {"__AVX2__"} if m == "native" else real(c, m))
    monkeypatch.setenv(kernels.MARCH_ENV, "x86-64-v3")
    with pytest.raises(kernels.KernelUnavailable, match="__AVX2__.*which this CPU lacks"):
        kernels._build(cxx, tmp_path / "bad.so")
    assert not (tmp_path / "bad.so").exists()
