"""Decode attention over the shared-prompt cache on CPU through a small C++ kernel (`sampling.attention`).

Why: torch's batched matmuls run a decode step's attention as hundreds of tiny GEMMs (3 query heads against one
row's columns) at a fraction of the host's FLOP rate, with a pass over memory per softmax step; the kernel
(`csrc/decode_attention.cpp`) does a (prompt, kv head) item's whole online softmax in registers and L1. Rows are
computed independently in a fixed order, so a row's output does not depend on the batch; sums are ordered
differently from the matmuls', so logits agree with them to float rounding (tests/test_attention.py).

The kernel is compiled on first use with the host's C++ compiler (`-march=native`) into a per-user directory,
named by a hash of everything the binary depends on (source, flags, compiler, CPU), written atomically, and
checked against a torch reference each time a process loads it; where it cannot be built or fails the check,
the default falls back to the matmuls with one warning, and an explicit `attention=kernel` is an error naming why.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ilf_lab.generation.slots import head_dim

log = logging.getLogger(__name__)

ATTENTIONS = ("matmul", "kernel")
SOURCE = Path(__file__).with_name("csrc") / "decode_attention.cpp"
# -fopenmp: the .so needs libgomp.so.1 by soname, which resolves to the copy torch has already loaded (one pool);
# --as-needed: no libstdc++ dependency (the kernel uses none of it), so no runtime version mismatch either
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17", "-fno-exceptions",
         "-Wl,--as-needed")
HEAD_DIMS = (8, 16, 32, 64, 128)  # the kernel's compiled head sizes
BUILD_TIMEOUT_S = 180


class KernelUnavailable(RuntimeError):
    """The kernel cannot run here: no compiler, a failed build, an unsupported platform, a failed check."""


def kernel_dir() -> Path:
    """Where builds are kept: $ILF_LAB_KERNEL_DIR, else the user's cache directory."""
    if d := os.environ.get("ILF_LAB_KERNEL_DIR"):
        return Path(d)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ilf_lab" / "kernels"


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


def _cpu_identity() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError as e:  # -march=native: a build must never be served to another CPU
        raise KernelUnavailable(f"cannot identify this CPU for a -march=native build: {e}") from e
    return "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags", "Features"))}))


def build_key(cxx: str) -> str:
    """A hash of what the binary depends on: source, flags, the compiler's version, the CPU and its features."""
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelUnavailable(f"the C++ compiler {cxx!r} did not run: {e}") from e
    blob = "\n".join([SOURCE.read_text(), " ".join(FLAGS), version, _cpu_identity(), platform.machine()])
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _build(cxx: str, path: Path) -> None:
    """Compile into a temporary file beside `path`, then rename: a reader never sees a half-written library."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        p = subprocess.run([cxx, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True,
                           timeout=BUILD_TIMEOUT_S)
        if p.returncode != 0:
            raise KernelUnavailable(f"{cxx} failed to build {SOURCE.name}: {p.stderr.strip()[-1500:]}")
        os.replace(tmp, path)
    except subprocess.TimeoutExpired as e:
        raise KernelUnavailable(f"{cxx} did not build {SOURCE.name} within {BUILD_TIMEOUT_S} s") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_kernel() -> Any:
    """The kernel's C function, built on first use and checked against torch before it is served."""
    fn, err = _loaded()
    if err is not None:
        raise KernelUnavailable(err)
    return fn


def kernel_error() -> str | None:
    """Why the kernel cannot run here, or None when it can."""
    return _loaded()[1]


@functools.cache
def _loaded() -> tuple[Any, str | None]:
    """(function, None) or (None, why): a failure is remembered too, so it is not retried per engine."""
    try:
        return _load(), None
    except KernelUnavailable as e:
        return None, str(e)
    except (OSError, RuntimeError, ValueError, subprocess.SubprocessError) as e:  # a read-only cache dir, ...
        return None, f"the attention kernel could not be prepared ({type(e).__name__}: {e})"


def _load() -> Any:
    if sys.platform != "linux" or platform.machine().lower() not in ("x86_64", "amd64", "aarch64", "arm64"):
        raise KernelUnavailable(f"the kernel is built for Linux on x86-64 or arm64, not {sys.platform} "
                                f"{platform.machine()}")
    cxx = _compiler()
    if cxx is None:
        raise KernelUnavailable("no C++ compiler found (set CXX, or install g++)")
    path = kernel_dir() / f"decode_attention-{build_key(cxx)}.so"
    built = not path.exists()
    if built:
        _build(cxx, path)
    try:
        fn = _open(path)
    except KernelUnavailable:
        if built:
            raise
        path.unlink(missing_ok=True)  # a damaged file at the build's name: build it afresh, once
        _build(cxx, path)
        fn = _open(path)
    err = max(_self_check(fn, hd) for hd in HEAD_DIMS)
    if not err <= 1e-4:  # NaN fails too
        path.unlink(missing_ok=True)  # not served to this process, nor left for the next
        raise KernelUnavailable(f"{path} disagrees with torch's attention by {err:.2e}: not used")
    return fn


def _open(path: Path) -> Any:
    # a file replaced on disk is not reloaded by dlopen while an older copy with the same name is loaded: each
    # build has its own name (the key), and a rebuilt damaged file never loaded in this process
    try:
        fn = ctypes.CDLL(str(path)).ilf_decode_attention
    except (OSError, AttributeError) as e:
        raise KernelUnavailable(f"{path} did not load: {e}") from e
    fn.argtypes = [ctypes.c_void_p] * 12 + [ctypes.c_int64] * 5 + [ctypes.c_float, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn


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
    why = kernel_error() if applies else (
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
    """The kernel bound to one cache's prompt store and own-column cache (their layouts checked once)."""

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
    """Plain torch attention for one layer, per row: its prompt's columns then its own (the kernel's contract)."""
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
    att = DecodeAttention(pkv, kv, kvh * g, fn=fn)
    got = att(0, q, att.plan(row_prompt, prompt_len, own), 0.25)
    want = reference(q, pkv[0, 0], pkv[0, 1], kv[0, 0], kv[0, 1], row_prompt, prompt_len, own, 0.25)
    return float((got.double() - want).abs().max())
