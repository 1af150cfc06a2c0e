"""fp32 linear layers through oneDNN with weights packed once, for the slots backend on CPU (`sampling.cpu_linear`).

`F.linear` on CPU hands each call to MKL's sgemm, which re-lays the weight out for its kernel on every call; at the
decode step's shapes (~100 rows against a 576 x 1536 weight) that is a real share of the work. oneDNN can take
the weight already in its blocked layout (`_reorder_linear_weight`, done once per weight here) and fuse the MLP's
SiLU into the gate projection. On this project's AVX2 host that is 1.1-1.6 x `F.linear`'s GFLOP/s at the decode
shapes and 2.4 x for the LM head at 32 rows (results/sampling/README.md, session 11). It is also row-independent:
a row's output is bitwise the same whatever other rows share the call, which `F.linear` is not for 1-3 rows.
Sums are blocked differently from MKL's, so logits agree with `F.linear` to float rounding, not bitwise.
"""

from __future__ import annotations

from typing import Any

import torch

CPU_LINEARS = ("aten", "onednn")
PACK_ROWS = 64  # the row count oneDNN's packing is tuned for; any row count works with the packed weight


def onednn_available() -> bool:
    """Whether this torch has oneDNN's packed fp32 linear (CPU builds with mkldnn, x86 and arm64)."""
    ops = torch.ops.mkldnn
    return bool(torch.backends.mkldnn.is_available()) and all(
        hasattr(ops, name) for name in ("_linear_pointwise", "_reorder_linear_weight")
    )


def resolve_cpu_linear(choice: str | None, model: Any, backend: str) -> str:
    """`choice` or the default: onednn for fp32 weights on CPU in the slots backend where this torch has it,
    else aten (`F.linear`). An explicit onednn that cannot apply is an error naming why."""
    if choice not in (None, *CPU_LINEARS):
        raise ValueError(f"cpu_linear must be aten, onednn or None (the default), got {choice!r}")
    p = next(model.parameters())
    fits = backend == "slots" and p.device.type == "cpu" and p.dtype == torch.float32
    if choice == "onednn":
        if not fits:
            raise ValueError(f"cpu_linear=onednn needs fp32 weights on CPU and the slots backend (got {p.dtype} on "
                             f"{p.device.type}, backend {backend})")
        if not onednn_available():
            raise ValueError("cpu_linear=onednn: this torch build has no oneDNN packed linear (use aten)")
    return choice or ("onednn" if fits and onednn_available() else "aten")


class PackedLinears:
    """Calls a model's plain fp32 `nn.Linear` layers with oneDNN-packed weights; anything else (int8 layers, a
    Linear subclass, another dtype) is called as it is. A packed weight is rebuilt when its layer's weight is
    replaced or changed in place (its data pointer or version counter moves), so it never serves stale weights."""

    def __init__(self) -> None:
        self._packed: dict[int, tuple[torch.nn.Module, tuple[int, int], torch.Tensor]] = {}

    def _weight(self, m: torch.nn.Linear) -> torch.Tensor:
        w = m.weight
        try:
            key = (w.data_ptr(), w._version)
        except RuntimeError:  # an inference tensor has no version counter; it cannot change in place either
            key = (w.data_ptr(), -1)
        hit = self._packed.get(id(m))
        if hit is None or hit[0] is not m or hit[1] != key:
            hit = (m, key, torch.ops.mkldnn._reorder_linear_weight(w.detach(), PACK_ROWS))
            self._packed[id(m)] = hit
        return hit[2]

    def pack(self, model: Any) -> None:
        """Pack every plain fp32 linear layer now (before the engine sizes its batch from free memory: the packed
        copies take as much as the weights)."""
        for m in model.modules():
            if type(m) is torch.nn.Linear and m.weight.dtype == torch.float32:
                self._weight(m)

    def linear(self, m: Any, x: torch.Tensor, act: str = "none") -> torch.Tensor:
        """m(x), with `act` ("none" or "swish" = SiLU) applied after it."""
        if type(m) is torch.nn.Linear and m.weight.dtype == torch.float32 and x.dtype == torch.float32:
            return torch.ops.mkldnn._linear_pointwise(x, self._weight(m), m.bias, act, [], "")
        y = m(x)
        return torch.nn.functional.silu(y) if act == "swish" else y

    def mlp(self, mlp: Any, x: torch.Tensor) -> torch.Tensor:
        """A Llama-family MLP, down(silu(gate(x)) * up(x)), with the SiLU fused into the gate projection; an MLP of
        another shape or activation runs as it is."""
        if not (hasattr(mlp, "gate_proj") and hasattr(mlp, "up_proj") and hasattr(mlp, "down_proj")):
            return mlp(x)
        if not _is_silu(getattr(mlp, "act_fn", None)):
            return mlp(x)
        gate = self.linear(mlp.gate_proj, x, "swish")
        return self.linear(mlp.down_proj, gate.mul_(self.linear(mlp.up_proj, x)))


def _is_silu(fn: Any) -> bool:
    """transformers' "silu" activation (its own class or torch's)."""
    return isinstance(fn, torch.nn.SiLU) or type(fn).__name__ == "SiLUActivation"
