"""CPU memory for the engine: the KV caches' zero pages mapped on first touch and given back when a slot is freed
(so the batch sizing can count only what rows touch), and the C heap told to keep the pages it has."""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import mmap
import platform
import sys

import torch


def _x86_or_arm() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "aarch64", "arm64")


def _madvise() -> object | None:
    if sys.platform != "linux":
        return None
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


_MADVISE = _madvise()
_MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", 4)  # private anonymous pages: freed, read as zero again
_MADV_NOHUGEPAGE = getattr(mmap, "MADV_NOHUGEPAGE", 15)


# Linux's MAP_NORESERVE (in Python's mmap module from 3.13): no swap reserved up front, so a large mostly-untouched
# store (the shared prompt KV: every prompt slot as long as the longest prompt) is not refused by the overcommit
# heuristic; the engine's batch sizing bounds what is touched, and `release_cpu` returns what freed slots held
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000 if sys.platform == "linux" and _x86_or_arm() else 0)


def zeroed_cpu(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zero tensor in private anonymous mmap memory: the kernel guarantees zero pages and maps them on first
    touch. Private, not shared (shmem, until session 18): a shmem page's first-touch fault cost more, and a decode
    step's cache writes are where those faults land (refine: the q/k/v phase 5.9-7.0 s -> 5.0-5.5 s, session 18).
    Never transparent huge pages (where THP is `always`, private memory would get them): a 2 MiB page would make a
    whole prompt-store block resident at its first write, past what the batch sizing counts (hf.py)."""
    count, size = math.prod(shape), math.prod(shape) * dtype.itemsize
    try:
        buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE)
    except (AttributeError, OSError):  # no such flags here, or strict overcommit: a plain mapping
        buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if size and hasattr(buf, "madvise"):
        try:
            buf.madvise(_MADV_NOHUGEPAGE)
        except OSError:  # a kernel without THP: nothing to opt out of
            pass
    return torch.frombuffer(buf, dtype=dtype, count=count).view(shape)  # the tensor keeps `buf` alive


def zeroed(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero tensor: on CPU from `zeroed_cpu` (pages touched only as they are written), elsewhere torch.zeros."""
    return zeroed_cpu(shape, dtype) if device.type == "cpu" else torch.zeros(shape, dtype=dtype, device=device)


def release_cpu(t: torch.Tensor) -> None:
    """Give the whole pages inside contiguous `t` (a view into `zeroed_cpu` memory) back to the kernel; they read
    as zero again. Best effort: where madvise is missing or refuses, the pages stay (and keep finite values)."""
    if _MADVISE is None or not t.is_contiguous():
        return
    page = mmap.PAGESIZE
    start = -(-t.data_ptr() // page) * page
    end = (t.data_ptr() + t.numel() * t.element_size()) // page * page
    if end > start:
        _MADVISE(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED)


# glibc's mallopt parameters (malloc.h) and this engine's values
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
# the mmap threshold first: it is the one glibc may refuse (32-bit), and trim or top pad set alone would freeze the
# threshold at its 128 KiB start (worse than the default), so a refusal applies nothing
HEAP_SETTINGS = (
    (_M_MMAP_THRESHOLD, 32 << 20),  # allocations up to 32 MiB (the default's ceiling) from the heap, not a new mapping
    (_M_TRIM_THRESHOLD, 256 << 20),  # up to 256 MiB of freed heap kept mapped, not returned to the kernel
    (_M_TOP_PAD, 64 << 20),  # and the heap grown 64 MiB at a time
)


def keep_heap_pages() -> bool:
    """Make glibc keep the heap pages it has for the engine's repeated large temporaries (prefill's per-layer
    activations, ~25 MB at 2,048 tokens; the decode step's logits up to ~170 rows). By default its thresholds
    adapt: an allocation past the current one gets a fresh mapping, and freed memory past twice it goes back to the
    kernel, so such buffers kept coming back as fresh pages, each a fault that zeroes it (~1.4 us, ~8 us where the
    hypervisor backs it anew). Refine benchmark call: 0.9 M -> 0.66 M page faults, 31-32 s -> 29.6-30.4 s (session 19).
    Process-wide and idempotent, and it stays for the process's life (up to 256 MiB of freed heap plus the top pad
    stay resident); a no-op (False) off glibc."""
    if _MALLOPT is None:
        return False
    return all(_MALLOPT(option, value) == 1 for option, value in HEAP_SETTINGS)


def _mallopt() -> object | None:
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return fn


_MALLOPT = _mallopt()
