"""The roofline the sampling benchmark measures against: fp32 matmul GFLOP/s at a decode step's own shapes on this
host, and the FLOPs a generated token (and a prompt's prefill) costs (benchmarks/sampling.py).

The rates are measured with one weight per shape, a few short trials, the best kept, so a moment of contention
from another process does not define the roofline (thirty distinct weights cycled as the layers stream them ran at
the same rate on session 17's AVX2 host, 8-16 % under it on the Zen 5 host of sessions 21-22; the engine's matmul
phases run ~14 % under it: results/sampling/README.md).
"""

from __future__ import annotations

import time

import torch


def mm_gflops(m: int, k: int, n: int, seconds: float = 0.3, trials: int = 5, kind: str = "aten") -> float:
    """fp32 throughput of x[m,k] @ W[n,k]^T: `aten` = F.linear (MKL, as the model calls it), `onednn` = oneDNN with
    the weight packed once (the engine's default on CPU, generation/packed.py), `onednn_bf16` = the same packed in
    bf16 with the input rounded to bf16 (the opt-in, its FLOPs counted as fp32's), `int8` = the engine's int8 layer
    (likewise); best of a few short trials, so a moment of contention from another process does not define the
    roofline."""
    if kind not in ("aten", "onednn", "onednn_bf16", "int8"):
        raise ValueError(f"unknown matmul kind {kind!r}")
    x, w = torch.randn(m, k), torch.randn(n, k)
    f = lambda: torch.nn.functional.linear(x, w)  # noqa: E731
    if kind in ("onednn", "onednn_bf16"):
        from ilf_lab.generation.packed import PACKED, PackedLinears

        lin = torch.nn.Linear(k, n, bias=False)
        lin.weight.data = w
        packed = PackedLinears(PACKED[kind])
        _, weight, bias = packed._weight(lin)  # the call itself only, as the roofline had it before session 22
        f = lambda: packed._call(x, weight, bias, "none")  # noqa: E731
    elif kind == "int8":
        from ilf_lab.generation.quantize import Int8Linear

        lin = torch.nn.Linear(k, n, bias=False)
        lin.weight.data = w
        q = Int8Linear(lin)
        f = lambda: q(x)  # noqa: E731
    for _ in range(3):
        f()
    best = 0.0
    for _ in range(trials):
        it, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            f()
            it += 1
        best = max(best, 2 * m * k * n * it / (time.perf_counter() - t0) / 1e9)
    return best


def decode_shapes(model) -> list[tuple[int, int, int]]:
    """(in, out, count per token) of every matmul of one decode step: the layers' projections and the LM head."""
    c = model.config
    kvh = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    h, f, L = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    return [
        (h, c.num_attention_heads * hd, 2 * L),  # q, o
        (h, kvh * hd, 2 * L),  # k, v
        (h, f, 2 * L),  # gate, up
        (f, h, L),  # down
        (h, c.vocab_size, 1),  # lm_head
    ]


def roofline(model, rows: int, kinds: tuple[str, ...] = ("aten",)) -> tuple[dict[str, float], float]:
    """({kind: GFLOP/s over the decode step's linear layers at `rows` rows, weighted by their FLOPs; "best": each
    shape at the fastest kind}, GFLOP per token of those layers = 2 x their parameters). Each shape and kind is
    measured once."""
    total, secs = 0.0, {kind: 0.0 for kind in (*kinds, "best")}
    for k, n, count in decode_shapes(model):
        f = 2 * k * n * count
        rates = {kind: mm_gflops(rows, k, n, kind=kind) for kind in kinds}
        rates["best"] = max(rates.values())
        total += f
        for kind, g in rates.items():
            secs[kind] += f / (g * 1e9)
    return {kind: total / s / 1e9 for kind, s in secs.items()}, total / 1e9


def attention_gflop_per_token(model, context: float) -> float:
    c = model.config
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * 2 * c.num_hidden_layers * c.num_attention_heads * hd * context / 1e9  # q.K and p.V


PREFILL_ROWS = 512  # rows of a prefill matmul for the ceiling's rate (a few prompts of a few hundred tokens)


def prefill_gflop(model, prompt_lens: list[int], shared: int = 0) -> float:
    """FLOPs of prefilling each prompt once, unpadded: every position through the layers' linear layers and causal
    attention, the LM head at the last position only (as the engine computes it); the first `shared` positions
    (the prompts' common start under sampling.common_prefix=once) once for all prompts."""
    c = model.config
    head = 2 * c.hidden_size * c.vocab_size / 1e9
    layers = sum(2 * k * n * count for k, n, count in decode_shapes(model)) / 1e9 - head
    spans = ([(0, shared)] if shared else []) + [(shared, t) for t in prompt_lens]  # positions [a, b) run together
    attn = sum(attention_gflop_per_token(model, (a + b + 1) / 2) * (b - a) for a, b in spans)  # mean causal context
    return sum(b - a for a, b in spans) * layers + len(prompt_lens) * head + attn


def ceiling(
    gen_tokens: int, kept: int, gflop: float, prefill: float, rate: float, baseline: float, prefill_rate: float
) -> dict:
    """The best any engine could do on this host at these FLOPs: every matmul (decode and prefill) at the roofline
    `rate` (prefill's at `prefill_rate`), attention's memory traffic, sampling and Python free. Its seconds, the
    roofline share and the ratio to `baseline` kept tok/s it would reach: the share's cap is below 100 % because
    prefill is work the share does not count (long refine prompts: ~30 % of the ideal call)."""
    decode, pre = gen_tokens * gflop / rate, prefill / prefill_rate
    return {"seconds": decode + pre, "share": decode / (decode + pre), "ratio": kept / (decode + pre) / baseline}
