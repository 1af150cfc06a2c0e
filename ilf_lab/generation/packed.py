"""fp32 linear layers through oneDNN with weights packed once, for the slots backend on CPU (`sampling.cpu_linear`).

`F.linear` on CPU hands each call to MKL's sgemm, which re-lays the weight out for its kernel on every call; at the
decode step's shapes (~100 rows against a 576 x 1536 weight) that is a real share of the work. oneDNN can take
the weight already in its blocked layout (`_reorder_linear_weight`, done once per weight here). On this project's
AVX2 host that is 1.1-1.6 x `F.linear`'s GFLOP/s at the decode shapes and 2.4 x for the LM head at 32 rows
(results/sampling/README.md, session 11); q/k/v and the MLP's gate/up are stacked into one packed weight each
(one wider matmul, which runs faster at decode's rows: sessions 14-15). There it was also
row-independent (a row's output bitwise the same at 1 to 2,048 rows, which `F.linear`'s is not at 1-3 rows;
tests/test_packed.py checks it on the host that runs them). Sums are blocked differently from MKL's, so logits
agree with `F.linear` to float rounding, not bitwise. The engine packs at the start of each sampling call and
drops the copies at its end: they never outlive, or go stale against, the weights they copy.

`onednn_bf16` (opt-in) packs the decoder layers' linear weights in bf16 and rounds each of their matmuls' input
to bf16; oneDNN sums in fp32 and rounds the output to bf16, which comes back as fp32. ~2 x the fp32 matmul's
GFLOP/s where the host has AVX512-BF16 or AMX (session 22: 860-940 against 450-480 at 128 rows). The LM head stays
fp32 (`keep`: logits rounded to bf16 would move top-p's cut; at |logit| 16-32 bf16's step is 0.125), as does the
rest of the model (norms, rotary embedding, the residual stream, the KV cache, attention, sampling). New
numerics: pass@k against fp32's on the same seeds is in results/sampling/README.md.
"""

from __future__ import annotations

import platform
from typing import Any

import torch

from ilf_lab.generation.kernels import kernel, kernel_error

CPU_LINEARS = ("aten", "onednn", "onednn_bf16")
PACKED = {"onednn": torch.float32, "onednn_bf16": torch.bfloat16}  # a packed choice -> its weights' dtype
PACK_ROWS = 64  # the row count hinted to oneDNN's packing (a decode step's order); any row count works with it


def onednn_available() -> bool:
    """Whether this torch has oneDNN's packed fp32 linear (CPU builds with mkldnn, x86 and arm64)."""
    ops = torch.ops.mkldnn
    return bool(torch.backends.mkldnn.is_available()) and all(
        hasattr(ops, name) for name in ("_linear_pointwise", "_reorder_linear_weight")
    )


def bf16_available() -> bool:
    """Whether oneDNN runs bf16 matmuls natively here: AVX512-BF16 or AMX on x86 (oneDNN's own check passes any
    AVX-512 host, where it would emulate bf16 slower than fp32), its own check elsewhere (arm64)."""
    if not onednn_available():
        return False
    cpu = torch.cpu
    if platform.machine().lower() in ("x86_64", "amd64", "i686", "x86"):
        native = (getattr(cpu, "_is_avx512_bf16_supported", None), getattr(cpu, "_is_amx_tile_supported", None))
        return any(f is not None and bool(f()) for f in native)
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return check is not None and bool(check())


def resolve_cpu_linear(choice: str | None, model: Any, backend: str) -> str:
    """`choice` or the default: onednn for fp32 weights on CPU in the slots backend where this torch has it,
    else aten (`F.linear`); onednn_bf16 only when asked for. An explicit packed choice that cannot apply is an
    error naming why."""
    if choice not in (None, *CPU_LINEARS):
        raise ValueError(f"cpu_linear must be aten, onednn, onednn_bf16 or None (the default), got {choice!r}")
    p = next(model.parameters())
    fits = backend == "slots" and p.device.type == "cpu" and p.dtype == torch.float32
    packable = any(_plain(m) for m in model.modules())  # an int8 model keeps no fp32 linear layer
    if choice in PACKED:
        if not fits:
            raise ValueError(f"cpu_linear={choice} needs fp32 weights on CPU and the slots backend (got {p.dtype} "
                             f"on {p.device.type}, backend {backend})")
        if not packable:
            raise ValueError(f"cpu_linear={choice}: the model has no plain fp32 nn.Linear layer to pack (int8?)")
        if not onednn_available():
            raise ValueError(f"cpu_linear={choice}: this torch build has no oneDNN packed linear (use aten)")
        if choice == "onednn_bf16" and not bf16_available():
            raise ValueError("cpu_linear=onednn_bf16: this host's oneDNN has no native bf16 matmul (AVX512-BF16 "
                             "or AMX); use onednn")
    return choice or ("onednn" if fits and packable and onednn_available() else "aten")


QKV = ("q_proj", "k_proj", "v_proj")  # an attention's projections, fused into one matmul
GATE_UP = ("gate_proj", "up_proj")  # a gated MLP's first two, fused into one matmul


class PackedLinears:
    """Calls a model's plain fp32 `nn.Linear` layers with oneDNN-packed weights, packed on first use; anything
    else (int8 layers, a Linear subclass, a layer with hooks, another dtype) is called as it is. Meant to live for
    one sampling call, while the weights cannot change (`HFEngine.generate` makes one per call). `dtype`: the
    packed weights' (fp32, or bf16 for cpu_linear=onednn_bf16: inputs and outputs rounded to bf16, sums in fp32,
    results handed back in fp32); `keep`: layers packed in fp32 whatever `dtype` (the LM head)."""

    def __init__(self, dtype: torch.dtype = torch.float32, keep: tuple[Any, ...] = ()) -> None:
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"packed weights are float32 or bfloat16, got {dtype}")
        self.dtype, self._keep = dtype, {id(m) for m in keep}
        # SiLU(gate) * up after the fused gate/up product in one C++ pass (csrc/silu_mul.cpp), where it builds
        self._silu_mul = kernel("ilf_silu_mul") if kernel_error("ilf_silu_mul") is None else None
        # id(layer) -> (layer, packed weight, bias in its dtype)
        self._packed: dict[int, tuple[torch.nn.Module, torch.Tensor, torch.Tensor | None]] = {}
        # (id(module), names) -> (module, packed concatenated weight or None where they cannot be fused, bias)
        self._fused: dict[tuple[int, tuple[str, ...]], tuple[Any, torch.Tensor | None, torch.Tensor | None]] = {}

    def __len__(self) -> int:
        """Packed weights held (single layers and fused groups)."""
        return len(self.weights())

    def size(self, model: Any) -> int:
        """Bytes the packed copies of `model` take at most: its parameters, those outside `keep` at `dtype`'s size
        (what the engine budgets for before it sizes its batch, and hands to pages.heap_only)."""
        total = sum(p.numel() * p.element_size() for p in model.parameters())
        kept = sum(p.numel() * p.element_size() for m in model.modules() if id(m) in self._keep for p in m.parameters())
        return kept + (total - kept) * self.dtype.itemsize // 4

    def weights(self) -> list[torch.Tensor]:
        """The packed weights held (single layers and fused groups)."""
        return [w for _, w, _ in self._packed.values()] + [w for _, w, _ in self._fused.values() if w is not None]

    def _weight(self, m: torch.nn.Linear) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor | None]:
        """(m, its packed weight, its bias), in fp32 for a kept layer, else in `dtype`."""
        hit = self._packed.get(id(m))
        if hit is None or hit[0] is not m:  # the layer is held, so its id is not reused while the entry lives
            dt = torch.float32 if id(m) in self._keep else self.dtype
            hit = (m, torch.ops.mkldnn._reorder_linear_weight(m.weight.detach().to(dt), PACK_ROWS),
                   None if m.bias is None else m.bias.detach().to(dt))
            self._packed[id(m)] = hit
        return hit

    def pack(self, model: Any) -> None:
        """Pack every plain fp32 linear layer now (before the engine sizes its batch from free memory: the packed
        copies take as much as the weights); q/k/v and gate/up that fuse are packed once, as their fused copy."""
        fused: set[int] = set()
        for m in model.modules():
            groups = (QKV,) + ((GATE_UP,) if _gated_silu(m) else ())  # the groups qkv() and mlp() would call
            for names in groups:
                if all(hasattr(m, name) for name in names) and self._fused_weight(m, names)[1] is not None:
                    fused.update(id(getattr(m, name)) for name in names)
        for m in model.modules():
            if _plain(m) and id(m) not in fused:
                self._weight(m)

    def linear(self, m: Any, x: torch.Tensor, act: str = "none") -> torch.Tensor:
        """m(x), with `act` ("none" or "swish" = SiLU) applied after it."""
        if _plain(m) and x.dtype == torch.float32:
            _, weight, bias = self._weight(m)
            return self._call(x, weight, bias, act)
        y = m(x)
        return torch.nn.functional.silu(y) if act == "swish" else y

    def qkv(self, attn: Any, x: torch.Tensor) -> torch.Tensor | None:
        """[q | k | v] = x @ [q_proj; k_proj; v_proj]^T in one matmul (one weight read, one call instead of three),
        or None where the three are not plain fp32 layers with biases alike (then call them one by one)."""
        return self._fused_call(attn, QKV, x)

    def mlp(self, mlp: Any, x: torch.Tensor) -> torch.Tensor:
        """A Llama-family MLP, down(silu(gate(x)) * up(x)), with gate and up in one matmul and SiLU(gate) * up in one
        C++ pass after it (on this project's host oneDNN's wider product runs faster, and its SiLU post-op costs ~14 %
        of the gate matmul: results/sampling/README.md, session 15); where they do not fuse, the SiLU is fused into
        the gate projection. An MLP of another shape or activation runs as it is."""
        if not _gated_silu(mlp):
            return mlp(x)
        both = self._fused_call(mlp, GATE_UP, x)
        if both is None:
            gate = self.linear(mlp.gate_proj, x, "swish")
            return self.linear(mlp.down_proj, gate.mul_(self.linear(mlp.up_proj, x)))
        f = mlp.gate_proj.out_features
        if self._silu_mul is None or not both.is_contiguous():
            return self.linear(mlp.down_proj, torch.nn.functional.silu(both[..., :f]).mul_(both[..., f:]))
        h = both.new_empty(*both.shape[:-1], f)
        rc = self._silu_mul(both.data_ptr(), h.data_ptr(), h.numel() // f, f, torch.get_num_threads())
        if rc != 0:
            raise RuntimeError(f"the SiLU-and-multiply kernel refused its arguments (code {rc})")
        return self.linear(mlp.down_proj, h)

    def _fused_call(self, module: Any, names: tuple[str, ...], x: torch.Tensor) -> torch.Tensor | None:
        _, weight, bias = self._fused_weight(module, names)
        if weight is None or x.dtype != torch.float32:
            return None
        return self._call(x, weight, bias, "none")

    @staticmethod
    def _call(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act: str) -> torch.Tensor:
        """x (fp32) @ a packed weight, in the weight's dtype, the result in fp32."""
        if weight.dtype == torch.float32:
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, act, [], "")
        return torch.ops.mkldnn._linear_pointwise(x.to(weight.dtype), weight, bias, act, [], "").float()

    def _fused_weight(self, module: Any, names: tuple[str, ...]) -> tuple[Any, Any, Any]:
        hit = self._fused.get((id(module), names))
        if hit is None or hit[0] is not module:  # the entry holds the module: its id is not reused while it lives
            hit = self._fuse(module, names, self.dtype)
            self._fused[(id(module), names)] = hit
        return hit

    @staticmethod
    def _fuse(module: Any, names: tuple[str, ...], dtype: torch.dtype) -> tuple[Any, torch.Tensor | None, torch.Tensor | None]:
        """`module`'s layers `names`, stacked and packed: only plain fp32 layers with the same input size and
        biases alike (and, for gate/up, the same output size); else (module, None, None)."""
        layers = [getattr(module, name, None) for name in names]
        if not all(_plain(m) for m in layers) or len({m.bias is None for m in layers}) != 1:
            return module, None, None
        same_out = len({m.out_features for m in layers}) == 1
        if len({m.in_features for m in layers}) != 1 or (names == GATE_UP and not same_out):
            return module, None, None
        weight = torch.cat([m.weight.detach() for m in layers]).to(dtype)
        bias = None if layers[0].bias is None else torch.cat([m.bias.detach() for m in layers]).to(dtype)
        return module, torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS), bias


def check_silu_mul(fn: Any) -> str | None:
    """None if the SiLU-and-multiply kernel is torch's silu(gate) * up to float rounding (rows of a width that is
    not a multiple of 8, values from -100 to 100, infinities) and writes nothing past its output, else how far off."""
    gen = torch.Generator().manual_seed(0)
    for rows, f in ((5, 37), (3, 1536)):
        x = torch.randn(rows, 2 * f, generator=gen) * 4
        x[0, :4] = torch.tensor([-100.0, 100.0, float("inf"), -90.0])
        want = torch.nn.functional.silu(x[:, :f]) * x[:, f:]
        out = torch.full((rows * f + 8,), 7.0)
        rc = fn(x.data_ptr(), out.data_ptr(), rows, f, 2)
        got = out[: rows * f].view(rows, f)
        close = torch.isclose(got, want, rtol=1e-5, atol=1e-6) | (got.isnan() & want.isnan())
        if rc != 0 or not bool(close.all()) or not bool((out[rows * f :] == 7.0).all()):
            err = float((got - want).abs().nan_to_num(float("inf")).max())
            return f"disagrees with torch's silu(gate) * up by {err:.2e} at width {f} (code {rc})"
    return None


def _plain(m: Any) -> bool:
    """An fp32 `nn.Linear` whose call is exactly F.linear: not a subclass, no hooks, no patched forward."""
    return (type(m) is torch.nn.Linear and m.weight.dtype == torch.float32 and not m._forward_hooks
            and not m._forward_pre_hooks and "forward" not in m.__dict__)


def _gated_silu(m: Any) -> bool:
    """A Llama-family MLP: down(silu(gate(x)) * up(x))."""
    parts = all(hasattr(m, name) for name in ("gate_proj", "up_proj", "down_proj"))
    return parts and _is_silu(getattr(m, "act_fn", None))


def _is_silu(fn: Any) -> bool:
    """transformers' "silu" activation (its own class or torch's)."""
    return isinstance(fn, torch.nn.SiLU) or type(fn).__name__ == "SiLUActivation"
