"""fp32 linear layers through oneDNN with weights packed once, for the slots backend on CPU (`sampling.cpu_linear`).

`F.linear` on CPU hands each call to MKL's sgemm, which re-lays the weight out for its kernel on every call; at the
decode step's shapes (~100 rows against a 576 x 1536 weight) that is a real share of the work. oneDNN can take
the weight already in its blocked layout (`_reorder_linear_weight`, done once per weight here) and fuse the MLP's
SiLU into the gate projection. On this project's AVX2 host that is 1.1-1.6 x `F.linear`'s GFLOP/s at the decode
shapes and 2.4 x for the LM head at 32 rows (results/sampling/README.md, session 11). There it was also
row-independent (a row's output bitwise the same at 1 to 2,048 rows, which `F.linear`'s is not at 1-3 rows;
tests/test_packed.py checks it on the host that runs them). Sums are blocked differently from MKL's, so logits
agree with `F.linear` to float rounding, not bitwise. The engine packs at the start of each sampling call and
drops the copies at its end: they never outlive, or go stale against, the weights they copy.
"""

from __future__ import annotations

from typing import Any

import torch

CPU_LINEARS = ("aten", "onednn")
PACK_ROWS = 64  # the row count hinted to oneDNN's packing (a decode step's order); any row count works with it


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
    packable = any(_plain(m) for m in model.modules())  # an int8 model keeps no fp32 linear layer
    if choice == "onednn":
        if not fits:
            raise ValueError(f"cpu_linear=onednn needs fp32 weights on CPU and the slots backend (got {p.dtype} on "
                             f"{p.device.type}, backend {backend})")
        if not packable:
            raise ValueError("cpu_linear=onednn: the model has no plain fp32 nn.Linear layer to pack (int8?)")
        if not onednn_available():
            raise ValueError("cpu_linear=onednn: this torch build has no oneDNN packed linear (use aten)")
    return choice or ("onednn" if fits and packable and onednn_available() else "aten")


class PackedLinears:
    """Calls a model's plain fp32 `nn.Linear` layers with oneDNN-packed weights, packed on first use; anything
    else (int8 layers, a Linear subclass, a layer with hooks, another dtype) is called as it is. Meant to live for
    one sampling call, while the weights cannot change (`HFEngine.generate` makes one per call)."""

    def __init__(self) -> None:
        self._packed: dict[int, tuple[torch.nn.Module, torch.Tensor]] = {}  # id(layer) -> (layer, packed weight)
        # id(attention) -> (attention, packed [q; k; v] weight or None where it cannot be fused, bias or None)
        self._fused: dict[int, tuple[Any, torch.Tensor | None, torch.Tensor | None]] = {}

    def __len__(self) -> int:
        return len(self._packed)

    def _weight(self, m: torch.nn.Linear) -> torch.Tensor:
        hit = self._packed.get(id(m))
        if hit is None or hit[0] is not m:  # the layer is held, so its id is not reused while the entry lives
            hit = (m, torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), PACK_ROWS))
            self._packed[id(m)] = hit
        return hit[1]

    def pack(self, model: Any) -> None:
        """Pack every plain fp32 linear layer now (before the engine sizes its batch from free memory: the packed
        copies take as much as the weights)."""
        for m in model.modules():
            if _plain(m):
                self._weight(m)
            elif all(hasattr(m, name) for name in ("q_proj", "k_proj", "v_proj")):
                self._fused_weight(m)  # decode's fused [q; k; v] copy, counted with the rest

    def linear(self, m: Any, x: torch.Tensor, act: str = "none") -> torch.Tensor:
        """m(x), with `act` ("none" or "swish" = SiLU) applied after it."""
        if _plain(m) and x.dtype == torch.float32:
            return torch.ops.mkldnn._linear_pointwise(x, self._weight(m), m.bias, act, [], "")
        y = m(x)
        return torch.nn.functional.silu(y) if act == "swish" else y

    def qkv(self, attn: Any, x: torch.Tensor) -> torch.Tensor | None:
        """[q | k | v] = x @ [q_proj; k_proj; v_proj]^T in one matmul (one weight read, one call instead of three),
        or None where the three are not plain fp32 layers with biases alike (then call them one by one)."""
        _, weight, bias = self._fused_weight(attn)
        if weight is None or x.dtype != torch.float32:
            return None
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")

    def _fused_weight(self, attn: Any) -> tuple[Any, torch.Tensor | None, torch.Tensor | None]:
        hit = self._fused.get(id(attn))
        if hit is None or hit[0] is not attn:  # the entry holds attn, so its id is not reused while it lives
            hit = self._fuse(attn)
            self._fused[id(attn)] = hit
        return hit

    @staticmethod
    def _fuse(attn: Any) -> tuple[Any, torch.Tensor | None, torch.Tensor | None]:
        layers = [getattr(attn, name, None) for name in ("q_proj", "k_proj", "v_proj")]
        if not all(_plain(m) for m in layers) or len({m.bias is None for m in layers}) != 1:
            return attn, None, None
        weight = torch.cat([m.weight.detach() for m in layers])
        bias = None if layers[0].bias is None else torch.cat([m.bias.detach() for m in layers])
        return attn, torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS), bias

    def mlp(self, mlp: Any, x: torch.Tensor) -> torch.Tensor:
        """A Llama-family MLP, down(silu(gate(x)) * up(x)), with the SiLU fused into the gate projection; an MLP of
        another shape or activation runs as it is."""
        if not (hasattr(mlp, "gate_proj") and hasattr(mlp, "up_proj") and hasattr(mlp, "down_proj")):
            return mlp(x)
        if not _is_silu(getattr(mlp, "act_fn", None)):
            return mlp(x)
        gate = self.linear(mlp.gate_proj, x, "swish")
        return self.linear(mlp.down_proj, gate.mul_(self.linear(mlp.up_proj, x)))


def _plain(m: Any) -> bool:
    """An fp32 `nn.Linear` whose call is exactly F.linear: not a subclass, no hooks, no patched forward."""
    return (type(m) is torch.nn.Linear and m.weight.dtype == torch.float32 and not m._forward_hooks
            and not m._forward_pre_hooks and "forward" not in m.__dict__)


def _is_silu(fn: Any) -> bool:
    """transformers' "silu" activation (its own class or torch's)."""
    return isinstance(fn, torch.nn.SiLU) or type(fn).__name__ == "SiLUActivation"
