"""Decode attention over the shared-prompt cache on CPU through a small C++ kernel (`sampling.attention`), and
prefill's causal attention through another (`prefill_attention`).

Why: torch's batched matmuls run a decode step's attention as hundreds of tiny GEMMs (3 query heads against one
row's columns) at a fraction of the host's FLOP rate, with a pass over memory per softmax step; the kernel
(`csrc/decode_attention.cpp`) does a (prompt, kv head) item's whole online softmax in registers and L1. Rows are
computed independently in a fixed order, so a row's output does not depend on the batch; sums are ordered
differently from the matmuls', so logits agree with them to float rounding (tests/test_attention.py).

The kernel is compiled on first use with the other CPU kernels (kernels.py: keyed by sources, flags, compiler and
CPU, checked against `reference` at every compiled head size each time a process loads it); where it cannot be
built or fails a check, the default falls back to the matmuls with one warning, and an explicit
`attention=kernel` is an error naming why. The prefill kernel (`csrc/prefill_attention.cpp`) computes only the causal
half that torch's masked `scaled_dot_product_attention` computes in full; prefill falls back to torch's where it
does not build.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from ilf_lab.generation.kernels import KernelUnavailable, kernel, kernel_error

__all__ = ["KernelUnavailable", "kernel_error"]  # re-exported: the kernel's availability, as callers ask it here

log = logging.getLogger(__name__)

ATTENTIONS = ("matmul", "kernel")
HEAD_DIMS = (8, 16, 32, 64, 128)  # the kernel's compiled head sizes
KEY_BLOCK = 64  # the kernel's block of keys (attend.h BLOCK)


def padded(positions: int) -> int:
    """Positions rounded up to whole key blocks: the prompt store's length for the kernel."""
    return -(-positions // KEY_BLOCK) * KEY_BLOCK


def keys_blocked(k: torch.Tensor) -> torch.Tensor:
    """K [..., positions, head_dim] (positions a multiple of KEY_BLOCK) in the kernel's prompt-store layout, same
    shape: each block of 64 positions transposed to [head_dim][64], so that a block's scores are vector FMAs over
    the head dimension with the keys in the lanes (no horizontal sums; attend.h `attend_blocked`)."""
    *lead, t, hd = k.shape
    if t % KEY_BLOCK:
        raise ValueError(f"keys are blocked in whole blocks of {KEY_BLOCK} positions, got {t}")
    return k.reshape(*lead, t // KEY_BLOCK, KEY_BLOCK, hd).transpose(-1, -2).reshape(*lead, t, hd)


def kernel_store(pkv: torch.Tensor) -> torch.Tensor:
    """A prompt store [layer, k|v, slot, kv_head, position, head_dim] with keys as rows, as the kernel reads it:
    positions padded to whole blocks (zeros), keys blocked (a copy; for tests and benchmarks)."""
    t = pkv.shape[4]
    out = torch.zeros(*pkv.shape[:4], padded(t), pkv.shape[5], dtype=pkv.dtype)
    out[..., :t, :] = pkv
    out[:, 0] = keys_blocked(out[:, 0]).clone()  # one block at head_dim 64: a view of out, not a copy
    return out


def head_dim(cfg: Any) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def load_kernel() -> Any:
    """The kernel's C function, built on first use and checked against torch before it is served (kernels.py)."""
    return kernel("ilf_decode_attention")


def check_kernel(fn: Any) -> str | None:
    """None if the kernel agrees with `reference` at every compiled head size, else how far it is off."""
    err = max(_self_check(fn, hd) for hd in HEAD_DIMS)
    return None if err <= 1e-4 else f"disagrees with torch's attention by {err:.2e}"  # NaN fails too


def resolve_attention(choice: str | None, model: Any, backend: str, prompt_kv: str) -> str:
    """`choice`, or the default: the kernel where it applies (fp32 cache on CPU, slots backend with the shared
    prompt KV, a compiled head size) and builds here, else the matmuls. An explicit kernel that cannot run is
    an error naming why."""
    if choice not in (None, *ATTENTIONS):
        raise ValueError(f"attention must be matmul, kernel or None (the default), got {choice!r}")
    if choice == "matmul":
        return choice
    hd = head_dim(model.config)
    cpu = next(model.parameters()).device.type == "cpu"
    applies = backend == "slots" and prompt_kv == "shared" and cpu and hd in HEAD_DIMS
    why = kernel_error("ilf_decode_attention") if applies else (
        f"the attention kernel runs the slots backend's shared prompt KV on CPU with head_dim in {HEAD_DIMS} "
        f"(here: backend {backend}, prompt_kv {prompt_kv}, {'CPU' if cpu else 'GPU'}, head_dim {hd})")
    if why is None:
        return "kernel"
    if choice == "kernel":
        raise ValueError(why)
    if applies:  # it would have run, but cannot build here
        log.warning("attention over the cache runs as batched matmuls: %s", why)
    return "matmul"


@dataclass(frozen=True)
class Plan:
    """One decode step's row map, as the kernel reads it (int64, contiguous; checked once per step)."""

    owner: int  # id() of the DecodeAttention that checked it against its caches
    order: torch.Tensor  # the rows grouped by prompt slot
    starts: torch.Tensor  # prompt p's rows: order[starts[p]:starts[p + 1]]
    plen: torch.Tensor  # each prompt slot's length
    own: torch.Tensor  # the own columns each row reads, this step's included


class DecodeAttention:
    """The kernel bound to one cache's prompt store and own-column cache (their layouts checked once). The store's
    keys are blocked (`keys_blocked`, positions a multiple of KEY_BLOCK); its values and the own cache are rows.
    The check cannot tell blocked keys from rows in a store of whole blocks: its writer (SharedPromptCache,
    `kernel_store`) blocks them."""

    def __init__(self, pkv: torch.Tensor, kv: torch.Tensor, heads: int, fn: Any = None) -> None:
        self.fn = fn or load_kernel()
        for name, t in (("prompt store", pkv), ("cache", kv)):
            if t.dtype != torch.float32 or t.device.type != "cpu" or t.dim() != 6:
                raise ValueError(f"the attention kernel needs a 6-d fp32 CPU {name}, got {t.dtype} {tuple(t.shape)}")
            if t.stride(5) != 1 or t.stride(4) != t.shape[5]:
                raise ValueError(f"the attention kernel needs the {name}'s positions contiguous")
        if pkv.shape[3] != kv.shape[3] or pkv.shape[5] != kv.shape[5] or pkv.shape[:2] != kv.shape[:2]:
            raise ValueError(f"prompt store {tuple(pkv.shape)} and cache {tuple(kv.shape)} differ in layers, kv heads "
                             "or head_dim")
        if pkv.shape[4] % KEY_BLOCK:
            raise ValueError(f"the attention kernel reads its prompt store's keys in blocks of {KEY_BLOCK} positions "
                             f"(keys_blocked), got {pkv.shape[4]} positions")
        if kv.shape[5] not in HEAD_DIMS or heads % kv.shape[3]:
            raise ValueError(f"the attention kernel takes head_dim in {HEAD_DIMS} and heads a multiple of kv heads "
                             f"(head_dim {kv.shape[5]}, {heads} heads, {kv.shape[3]} kv heads)")
        self.pkv, self.kv, self.heads = pkv, kv, heads
        self.kv_heads, self.head_dim = kv.shape[3], kv.shape[5]
        self.group = heads // self.kv_heads
        # strides (slot, kv head) in floats: the same for every layer and for K and V
        self._ps = torch.tensor([pkv.stride(2), pkv.stride(3)], dtype=torch.int64)
        self._os = torch.tensor([kv.stride(2), kv.stride(3)], dtype=torch.int64)

    def plan(self, row_prompt: list[int], prompt_len: list[int], own: list[int]) -> Plan:
        """The step's row map, checked against the caches' sizes (the kernel trusts it)."""
        a, m = len(own), len(prompt_len)
        if len(row_prompt) != a or a > self.kv.shape[2] or m > self.pkv.shape[2]:
            raise ValueError(f"{a} rows over {m} prompts do not fit the caches")
        if any(not 0 <= p < m for p in row_prompt) or any(not 0 < n <= self.kv.shape[4] for n in own):
            raise ValueError("a row's prompt slot or own length is out of range")
        if any(not 0 < n <= self.pkv.shape[4] for n in prompt_len):
            raise ValueError("a prompt length is out of range")
        prompt = torch.tensor(row_prompt, dtype=torch.int64)
        order = torch.argsort(prompt, stable=True)
        counts = torch.bincount(prompt, minlength=m)
        starts = torch.zeros(m + 1, dtype=torch.int64)
        torch.cumsum(counts, 0, out=starts[1:])
        plen, own_t = torch.tensor(prompt_len, dtype=torch.int64), torch.tensor(own, dtype=torch.int64)
        return Plan(id(self), order, starts, plen, own_t)

    def __call__(self, i: int, q: torch.Tensor, plan: Plan, scaling: float) -> torch.Tensor:
        """Layer i's attention for the step's queries q [a, heads, 1, head_dim]: [a * kv_heads, group, head_dim]."""
        if plan.owner != id(self):
            raise ValueError("a plan is made by the DecodeAttention that runs it (plan() checks it against the caches)")
        a = plan.own.shape[0]
        if q.device.type != "cpu" or q.shape != (a, self.heads, 1, self.head_dim):
            raise ValueError(f"queries {tuple(q.shape)} on {q.device} do not match the step's {a} rows on CPU")
        q = q.to(torch.float32).contiguous()  # bf16 weights: the cache and attention stay fp32 on CPU (slots.py)
        out = torch.empty(a * self.kv_heads, self.group, self.head_dim)
        pk, pv, kc, vc = self.pkv[i, 0], self.pkv[i, 1], self.kv[i, 0], self.kv[i, 1]
        rc = self.fn(
            q.data_ptr(), out.data_ptr(), pk.data_ptr(), pv.data_ptr(), self._ps.data_ptr(), kc.data_ptr(),
            vc.data_ptr(), self._os.data_ptr(), plan.order.data_ptr(), plan.starts.data_ptr(), plan.plen.data_ptr(),
            plan.own.data_ptr(), a, plan.plen.shape[0], self.kv_heads, self.group, self.head_dim, scaling,
            torch.get_num_threads(),
        )
        if rc != 0:
            raise RuntimeError(f"the attention kernel refused its arguments (code {rc})")
        return out


def reference(q, pk, pv, ok, ov, row_prompt, prompt_len, own, scale) -> torch.Tensor:
    """Plain torch attention for one layer, per row: its prompt's columns then its own (the kernel's contract;
    here every key is a row)."""
    a, heads, hd = q.shape[0], q.shape[1], q.shape[-1]
    kvh = pk.shape[1]
    out = torch.empty(a * kvh, heads // kvh, hd, dtype=torch.float64)
    for r in range(a):
        p = row_prompt[r]
        k = torch.cat([pk[p, :, : prompt_len[p]], ok[r, :, : own[r]]], 1).double()  # [kvh, t, hd]
        v = torch.cat([pv[p, :, : prompt_len[p]], ov[r, :, : own[r]]], 1).double()
        qr = q[r, :, 0].double().view(kvh, heads // kvh, hd)
        w = torch.softmax(qr @ k.transpose(1, 2) * scale, -1)
        out[r * kvh : (r + 1) * kvh] = w @ v
    return out


def _self_check(fn: Any, hd: int) -> float:
    """Largest difference from `reference` on fixed random inputs at head size `hd`: several rows per prompt,
    prompts and own columns longer than a key block, uneven lengths, grouped heads."""
    gen = torch.Generator().manual_seed(hd)
    layers, slots, kvh, g = 1, 5, 2, 3
    pkv = torch.randn(layers, 2, 3, kvh, 150, hd, generator=gen)
    kv = torch.randn(layers, 2, slots, kvh, 70, hd, generator=gen)
    q = torch.randn(slots, kvh * g, 1, hd, generator=gen)
    row_prompt, prompt_len, own = [1, 0, 1, 2, 1], [70, 130, 3], [1, 70, 7, 2, 66]
    att = DecodeAttention(kernel_store(pkv), kv, kvh * g, fn=fn)
    got = att(0, q, att.plan(row_prompt, prompt_len, own), 0.25)
    want = reference(q, pkv[0, 0], pkv[0, 1], kv[0, 0], kv[0, 1], row_prompt, prompt_len, own, 0.25)
    return float((got.double() - want).abs().max())


def prefill_attention(fn: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: torch.Tensor,
                      scaling: float) -> torch.Tensor:
    """Causal attention of prefill's queries q [b, heads, t, hd] (a transposed view of [b, t, heads, hd]) over
    k, v [b, kv_heads, c + t, hd] (a held prefix of c positions first): position i of prompt p sees keys [0, c + i];
    positions from lens[p] on are padding (zero out). Out: [b, t, heads * hd], o_proj's input."""
    b, heads, t, hd = q.shape
    kvh = k.shape[1] if k.dim() == 4 else 0
    qt = q.transpose(1, 2)
    shaped = (kvh > 0 and hd in HEAD_DIMS and k.shape == v.shape and k.shape[0] == b and k.shape[2] >= t
              and k.shape[3] == hd and heads % kvh == 0 and lens.shape == (b,) and lens.dtype == torch.int64 and lens.is_contiguous())
    if not shaped or not all(x.dtype == torch.float32 and x.device.type == "cpu" and x.is_contiguous()
                             for x in (qt, k, v)) or lens.device.type != "cpu":
        raise ValueError(f"the prefill attention kernel takes contiguous fp32 CPU q [b, t, heads, hd], k, v [b, kv "
                         f"heads, c + t, hd] (hd in {HEAD_DIMS}) and int64 lens [b]; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, lens {tuple(lens.shape)}")
    out = torch.empty(b, t, heads, hd, dtype=torch.float32)
    rc = fn(qt.data_ptr(), out.data_ptr(), k.data_ptr(), v.data_ptr(), lens.data_ptr(), b, t, k.shape[2] - t, kvh,
            heads // kvh, hd, scaling, torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"the prefill attention kernel refused its arguments (code {rc})")
    return out.view(b, t, heads * hd)


def prefill_reference(q, k, v, lens, scaling) -> torch.Tensor:
    """The kernel's contract in plain torch (float64), per prompt: masked softmax over the keys each position sees."""
    b, heads, t, hd = q.shape
    c, g = k.shape[2] - t, heads // k.shape[1]
    out = torch.zeros(b, t, heads, hd, dtype=torch.float64)
    for p in range(b):
        n = int(lens[p])
        kp, vp = (x[p, :, : c + n].double().repeat_interleave(g, 0) for x in (k, v))  # [heads, c + n, hd]
        s = q[p, :, :n].double() @ kp.transpose(1, 2) * scaling
        s.masked_fill_(torch.arange(c + n) > c + torch.arange(n).unsqueeze(1), float("-inf"))
        out[p, :n] = (torch.softmax(s, -1) @ vp).transpose(0, 1)
    return out.view(b, t, heads * hd)


def check_prefill(fn: Any) -> str | None:
    """None if the prefill kernel agrees with `prefill_reference` at every compiled head size (with and without a
    prefix longer than a key block, padded prompts, positions past a block of 8, grouped heads), else how far it is
    off."""
    err = 0.0
    for hd in HEAD_DIMS:
        gen = torch.Generator().manual_seed(hd)
        for c in (0, 61):  # 61: the keys before a block span two key blocks (64)
            b, kvh, g, t = 3, 2, 3, 21
            q = torch.randn(b, t, kvh * g, hd, generator=gen).transpose(1, 2)
            k, v = (torch.randn(b, kvh, c + t, hd, generator=gen) for _ in range(2))
            lens = torch.tensor([21, 9, 1])
            got = prefill_attention(fn, q, k, v, lens, 0.3)
            err = max(err, float((got.double() - prefill_reference(q, k, v, lens, 0.3)).abs().max()))
    return None if err <= 1e-4 else f"disagrees with torch's attention by {err:.2e}"  # NaN fails too
