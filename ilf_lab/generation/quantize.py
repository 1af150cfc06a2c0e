"""Opt-in int8 linear layers for the sampling engine on CPU (`sampling.quantize=int8`).

Each weight is stored as int8 with one scale per output row; each input row is quantised to int8 with its own
scale at call time; the product runs as an int8 GEMM with exact int32 accumulation (`torch._int_mm`), then is
rescaled. At the decode shapes that is 3-4 x fp32's rate on this project's hosts (results/sampling/README.md).

Why per row and not torch.ao's dynamic quantisation (one activation scale per call): with a per-call scale a
row's output would depend on the other rows in the batch, so a prompt's samples would change with whatever
was batched beside it. Here each row's output depends only on that row, and integer accumulation is exact, so
the samples depend neither on batching nor on threads. Numerics differ from fp32, so it is opt-in and judged by
zero-shot pass@k against fp32 on the same seeds, never assumed equal.
"""

from __future__ import annotations

import copy as _copy
import functools
import logging
import time
from typing import Any

import torch

from ilf_lab.errors import ConfigError

log = logging.getLogger(__name__)

QUANTIZE_MODES = ("int8",)


class Int8Linear(torch.nn.Module):
    """`nn.Linear` with int8 weights (per output row scales) and int8 inputs (per row scales)."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        scale = w.abs().amax(1).clamp(min=torch.finfo(torch.float32).tiny) / 127
        q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        self.register_buffer("weight_t", q.t().contiguous())  # [in, out]: what _int_mm takes
        self.register_buffer("scale", scale)
        bias = linear.bias
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).float()
        sx = x2.abs().amax(1, keepdim=True).clamp_(min=torch.finfo(torch.float32).tiny).div_(127)
        xq = torch.div(x2, sx).round_().to(torch.int8)  # |x / sx| <= 127: no clamp needed
        out = torch._int_mm(xq, self.weight_t).float().mul_(sx).mul_(self.scale)
        if self.bias is not None:
            out.add_(self.bias)
        return out.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantize_linear(model: Any, mode: str, copy: bool = True) -> Any:
    """`model` with its `nn.Linear` layers (the LM head too) as `Int8Linear`: a copy by default, since a trainer
    may share the input; `copy=False` converts in place (a model loaded only to sample: no second fp32 copy in
    memory). Needs fp32 weights on CPU, and a model whose every weight matrix is an `nn.Linear`."""
    if mode not in QUANTIZE_MODES:
        raise ConfigError(f"sampling.quantize={mode!r} is not one of {', '.join(QUANTIZE_MODES)} (or null)")
    p = next(model.parameters())
    if p.device.type != "cpu" or p.dtype != torch.float32:
        raise ConfigError(
            f"sampling.quantize={mode} needs fp32 weights on CPU (got {p.dtype} on {p.device.type}): "
            "leave sampling.dtype null or float32, and sample on CPU"
        )
    # layers int8 cannot take (a Linear subclass, GPT-2/CodeGen-style Conv1D) would leave the run mostly fp32
    other = [n for n, m in model.named_modules()
             if (isinstance(m, torch.nn.Linear) and type(m) is not torch.nn.Linear) or type(m).__name__ == "Conv1D"]
    linears = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear]
    if other or not linears:
        raise ConfigError(f"sampling.quantize={mode} converts plain nn.Linear layers only; this model has "
                          f"{len(linears)} and {len(other)} others ({', '.join(other[:3]) or 'none'})")
    out = _copy.deepcopy(model) if copy else model
    for name in linears:
        parent, _, attr = name.rpartition(".")
        q = Int8Linear(out.get_submodule(name))
        try:  # fail here, with the reason, rather than at the first sample
            q(torch.zeros(1, q.in_features))
        except RuntimeError as e:
            raise ConfigError(f"sampling.quantize={mode}: no CPU int8 GEMM for {name} in this torch ({e})") from None
        setattr(out.get_submodule(parent), attr, q)
    if (speedup := int8_speedup()) < 1:
        log.warning(int8_speed_note(speedup))
    return out.eval()


@functools.cache
def int8_speedup(rows: int = 64, k: int = 1024, n: int = 1024) -> float:
    """How many times faster int8 GEMM is than fp32's on this CPU at a decode-like shape (fp32's best time over
    int8's, a few calls each; measured once per process, on fixed inputs: the global RNG is left alone).
    Without int8 dot-product instructions (AVX512-VNNI, AMX) torch's CPU `_int_mm` falls back to a slow path:
    0.05 x fp32 on an AVX2-only EPYC (results/sampling/README.md, session 11)."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g)
    xq, wq = x.to(torch.int8), w.t().contiguous().to(torch.int8)

    def best(f) -> float:
        f()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            f()
            times.append(time.perf_counter() - t0)
        return min(times)

    return best(lambda: torch.nn.functional.linear(x, w)) / best(lambda: torch._int_mm(xq, wq))


def int8_speed_note(speedup: float) -> str:
    """The warning for a host whose int8 GEMM is slower than fp32 (the option exists only to be faster)."""
    return (f"sampling.quantize=int8: this CPU's int8 GEMM runs at {speedup:.2f} x fp32's speed (no fast int8 "
            f"kernels here, e.g. no AVX512-VNNI), so int8 sampling will be slower than fp32: leave sampling.quantize "
            f"null on this host")


def is_quantized(module: Any) -> bool:
    """True for a linear layer with int8 weights (the slot forward then calls it as it is)."""
    return isinstance(module, Int8Linear)
