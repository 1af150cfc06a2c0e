"""The CPU decode-attention kernel (`csrc/decode_attention.cpp`), compiled on first use and once per host.

Attention over the KV cache is most of a refine batch's decode time, and it is memory-bound: the kernel reads
each row's own cache columns once (batched matmuls read every row to the batch's longest and, as torch runs them,
slower than the memory allows). Built with -march=native, so the build is keyed by the host's CPU as well as the
source and flags: a build from another host is never loaded.
"""

from __future__ import annotations

import functools
import hashlib
import platform
from pathlib import Path
from typing import Any

import torch

SOURCE = Path(__file__).with_name("csrc") / "decode_attention.cpp"
CFLAGS = ("-O3", "-march=native", "-fopenmp-simd")
IMPLEMENTATIONS = ("kernel", "matmul")  # sampling.attention: this kernel | torch's batched matmuls


class KernelUnavailable(RuntimeError):
    """The kernel could not be built or loaded here (no compiler, a failed build)."""


def _cpu_identity() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(lines)))


def build_name() -> str:
    """The extension's name: a hash of everything the binary depends on (source, flags, CPU, torch)."""
    blob = "\n".join([SOURCE.read_text(), " ".join(CFLAGS), _cpu_identity(), torch.__version__])
    return "ilf_decode_attention_" + hashlib.sha256(blob.encode()).hexdigest()[:16]


@functools.cache
def kernel() -> Any:
    """The loaded extension module (its `decode_attention(q, k, v, lens, scale)`); built on first use."""
    from torch.utils.cpp_extension import load

    try:
        return load(name=build_name(), sources=[str(SOURCE)], extra_cflags=list(CFLAGS), verbose=False)
    except Exception as e:  # a compiler error, a missing compiler, a broken build dir: one clear failure
        raise KernelUnavailable(
            f"the C++ decode-attention kernel did not build ({type(e).__name__}: {str(e)[-2000:]}); "
            "sample with sampling.attention=matmul instead"
        ) from e


def check_implementation(name: str) -> str:
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"attention must be one of {IMPLEMENTATIONS}, got {name!r}")
    return name
