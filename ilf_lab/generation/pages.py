"""CPU memory for the engine: the KV caches' zero pages mapped on first touch and given back when a slot is freed
(so the batch sizing can count only what rows touch), those mappings kept for the next sampling call in the
process, and the C heap told to keep the pages it has."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import math
import mmap
import os
import platform
import sys
import threading
from collections.abc import Iterator

import numpy as np
import torch


def _x86_or_arm() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "aarch64", "arm64")


def _linux_libc(name: str, *argtypes: object) -> object | None:
    """libc's `name` (returning int) on Linux, else None."""
    if sys.platform != "linux":
        return None
    try:
        fn = getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = list(argtypes), ctypes.c_int
    return fn


_MADVISE = _linux_libc("madvise", ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_MINCORE = _linux_libc("mincore", ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
_MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", 4)  # private anonymous pages: freed, read as zero again
_MADV_NOHUGEPAGE = getattr(mmap, "MADV_NOHUGEPAGE", 15)


# Linux's MAP_NORESERVE (in Python's mmap module from 3.13): no swap reserved up front, so a large mostly-untouched
# store (the shared prompt KV: every prompt slot as long as the longest prompt) is not refused by the overcommit
# heuristic; the engine's batch sizing bounds what is touched, and `release_cpu` returns what freed slots held
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000 if sys.platform == "linux" and _x86_or_arm() else 0)


def zeroed_cpu(shape: tuple[int, ...], dtype: torch.dtype, reuse: bool = False) -> torch.Tensor:
    """A zero tensor in private anonymous mmap memory: the kernel guarantees zero pages and maps them on first
    touch. Private, not shared (shmem, until session 18): a shmem page's first-touch fault cost more, and a decode
    step's cache writes are where those faults land (refine: the q/k/v phase 5.9-7.0 s -> 5.0-5.5 s, session 18).
    Never transparent huge pages (where THP is `always`, private memory would get them): a 2 MiB page would make a
    whole prompt-store block resident at its first write, past what the batch sizing counts (hf.py).
    `reuse`: from a mapping an earlier tensor left (`KEPT`), its resident pages zeroed, where one is free."""
    count, size = math.prod(shape), math.prod(shape) * dtype.itemsize
    reuse = reuse and size > 0 and KEPT.possible()
    view = KEPT.take(size) if reuse else None
    if view is None:
        buf = _map(size)
        # torch.frombuffer keeps only a reference to what it is given and releases its buffer at once; a memoryview
        # holds an export of `buf` for its own life, that is the tensor's: how KEPT tells the mapping is in use
        view = memoryview(buf)
        if reuse:
            KEPT.hold(buf)
    return torch.frombuffer(view, dtype=dtype, count=count).view(shape)  # the tensor keeps `view` alive


def _map(size: int) -> mmap.mmap:
    try:
        buf = mmap.mmap(-1, max(size, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE)
    except (AttributeError, OSError):  # no such flags here, or strict overcommit: a plain mapping
        buf = mmap.mmap(-1, max(size, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(buf, "madvise"):
        try:
            buf.madvise(_MADV_NOHUGEPAGE)
        except OSError:  # a kernel without THP: nothing to opt out of
            pass
    return buf


class KeptMappings:
    """The KV caches' mappings, kept after their tensors die for the next sampling call in this process to reuse.

    Why: a page the process has not touched before costs a fault that zeroes it, and on a VM whose host takes
    freed guest memory back (free page reporting: this project's hosts) one the host must back anew: 8-26 us a
    page, against ~0.3 us to zero a resident one. A refine call writes ~0.5 M fresh pages (its prompts' KV, every
    generated token's KV, the logits), 5-13 s of system time on such a host. A later call (the benchmark's
    repeats, the evaluate stage after the refine stage, a sweep's next job, the feedback server) reuses them.

    A mapping is free once no tensor uses it: Python's mmap refuses to resize while a buffer is exported, and each
    tensor holds a memoryview of it (zeroed_cpu). Reused, its resident pages are zeroed (mincore: the others read
    as zero, which holds only without swap, so with swap nothing is reused) and those past the request given back.
    A reused mapping's pages help only where the new cache's layout lands on them (the same shape does; another
    reuses part), so the batch sizing does not count kept pages as free. They stay resident until the next call
    takes them or `drop` unmaps them, through a training stage in between too (the evaluate stage after the refine
    stage reuses them). Pages only read (the zero page, which the matmul attention maps for columns nobody wrote)
    count as resident and become real ones when zeroed. Free mappings past `limit` are forgotten, the least
    recently used first, when a new one is held."""

    def __init__(self, limit: int = 8) -> None:
        self.limit = limit
        self._held: list[mmap.mmap] = []  # most recently used last
        self._lock = threading.Lock()

    def hold(self, buf: mmap.mmap) -> None:
        with self._lock:
            self._held.append(buf)
            free = [b for b in self._held if _free(b)]  # in use: their tensors keep them mapped
            for b in free[: len(free) - self.limit]:  # the least recently used first
                self._held.remove(b)

    def possible(self) -> bool:
        """Whether mappings can be reused here: Linux (mincore, mremap) without swap (a swapped-out page is not
        resident and not zero)."""
        return _MINCORE is not None and not meminfo_bytes("SwapTotal")

    def take(self, size: int) -> memoryview | None:
        """A view of a free mapping of at least `size` bytes (the smallest; else the largest, grown), zeroed; else
        None. The view is taken under the lock: from then on the mapping reads as in use."""
        if not self.possible():
            return None
        with self._lock:
            free = [b for b in self._held if _free(b)]
            if not free:
                return None
            fits = [b for b in free if len(b) >= size]
            buf = min(fits, key=len) if fits else max(free, key=len)
            self._held.remove(buf)
            try:
                if len(buf) < size:
                    buf.resize(size)  # mremap: the resident pages move with it, the new tail is zero
                _zero_resident(buf, size)
            except (OSError, ValueError, BufferError, SystemError):
                return None  # forgotten: unmapped once unreferenced
            self._held.append(buf)
            return memoryview(buf)

    def resident_bytes(self) -> int:
        """Bytes resident in the free mappings (pages only read included)."""
        with self._lock:
            free = [b for b in self._held if _free(b)]
        return sum(int(_resident(b, len(b)).sum()) for b in free) * mmap.PAGESIZE if _MINCORE else 0

    def drop(self) -> None:
        """Forget every free mapping (unmapped once unreferenced): their pages go back to the kernel."""
        with self._lock:
            self._held = [b for b in self._held if not _free(b)]


def meminfo_bytes(field: str) -> int | None:
    """A /proc/meminfo field ("MemAvailable", "SwapTotal") in bytes; None where it cannot be read (not Linux)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _free(buf: mmap.mmap) -> bool:
    """No tensor uses `buf`: resizing to its own size is refused while a buffer is exported."""
    if buf.closed:
        return False
    try:
        buf.resize(len(buf))
    except (BufferError, OSError, ValueError, SystemError):  # exported, or cannot resize here at all
        return False
    return True


def _address(buf: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))  # a transient export, released with the temporary


def _resident(buf: mmap.mmap, size: int) -> np.ndarray:
    """One byte per page of buf's first `size` bytes, 1 where the page is resident."""
    vec = np.zeros(-(-size // mmap.PAGESIZE), dtype=np.uint8)
    if size and _MINCORE(ctypes.c_void_p(_address(buf)), ctypes.c_size_t(size), vec.ctypes.data) != 0:
        raise OSError(ctypes.get_errno(), "mincore failed")
    return vec & 1


def _zero_resident(buf: mmap.mmap, size: int) -> None:
    """Zero buf's resident pages below `size` and give back those from `size` on (others read as zero)."""
    page, addr = mmap.PAGESIZE, _address(buf)
    edges = np.flatnonzero(np.diff(_resident(buf, len(buf)), prepend=0, append=0))
    for start, end in zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True):
        lo, hi = start * page, min(end * page, len(buf))
        if lo < size:
            ctypes.memset(addr + lo, 0, min(hi, size) - lo)
        if hi > size and _MADVISE is not None:
            cut = max(lo, -(-size // page) * page)
            if hi > cut:
                _MADVISE(ctypes.c_void_p(addr + cut), ctypes.c_size_t(hi - cut), _MADV_DONTNEED)


def zeroed(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, reuse: bool = False) -> torch.Tensor:
    """A zero tensor: on CPU from `zeroed_cpu` (pages touched only as they are written), elsewhere torch.zeros."""
    if device.type == "cpu":
        return zeroed_cpu(shape, dtype, reuse)
    return torch.zeros(shape, dtype=dtype, device=device)


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


HEAP_KEEP = 1 << 30  # bytes of freed heap glibc keeps mapped (keep_heap_pages)
_HEAP_KEPT = False  # keep_heap_pages applied its settings in this process

# glibc's mallopt parameters (malloc.h) and this engine's values
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
# the mmap threshold first: it is the one glibc may refuse (32-bit), and trim or top pad set alone would freeze the
# threshold at its 128 KiB start (worse than the default), so a refusal applies nothing
HEAP_SETTINGS = (
    (_M_MMAP_THRESHOLD, 32 << 20),  # allocations up to 32 MiB (the default's ceiling) from the heap, not a new mapping
    # up to 1 GiB of freed heap kept mapped, not returned to the kernel: the packed weights the engine makes each call
    # (packed.py; SmolLM2-135M's take ~430 MB of heap) come back as the same pages. Packing in a warm process: 0.17-0.85
    # s and 80-117 k faults a call at 256 MiB, 0.08-0.09 s and 28 k (the LM head's own mapping) at 512 MiB or more
    (_M_TRIM_THRESHOLD, HEAP_KEEP),
    (_M_TOP_PAD, 64 << 20),  # and the heap grown 64 MiB at a time
)


def keep_heap_pages() -> bool:
    """Make glibc keep the heap pages it has for the engine's repeated large temporaries (prefill's per-layer
    activations, ~25 MB at 2,048 tokens; the decode step's logits up to ~170 rows; each call's packed weights). By
    default its thresholds adapt: an allocation past the current one gets a fresh mapping, and freed memory past
    twice it goes back to the kernel, so such buffers kept coming back as fresh pages, each a fault that zeroes it
    (~1.4 us, ~8 us where the hypervisor backs it anew). Refine benchmark call: 0.9 M -> 0.66 M page faults,
    31-32 s -> 29.6-30.4 s (session 19). Process-wide and idempotent, and it stays for the process's life (up to
    1 GiB of freed heap plus the top pad stay resident, reused by any later allocation); a no-op (False) off glibc."""
    global _HEAP_KEPT
    if _MALLOPT is None:
        return False
    _HEAP_KEPT = all(_MALLOPT(option, value) == 1 for option, value in HEAP_SETTINGS)
    return _HEAP_KEPT


_M_MMAP_MAX, _DEFAULT_MMAP_MAX = -4, 65536  # glibc's default count of mmap-served blocks (malloc.h, malloc.c)


@contextlib.contextmanager
def heap_only(size: int) -> Iterator[None]:
    """Inside, glibc serves even blocks past its 32 MiB mmap ceiling from the heap (M_MMAP_MAX 0; threads' arenas
    still fall back to mmap), for `size` bytes of long-lived blocks the caller is about to make: an engine call's
    packed weights (packed.py). The packed LM head, 113 MB for SmolLM2, otherwise took a fresh mapping each call,
    28 k page faults (0.30 s of a 0.36 s packing in a warm process, against 0.07 s from the heap, session 21); freed,
    it stays in the heap for the next call. Only where keep_heap_pages applied, `size` fits in what the heap keeps
    (HEAP_KEEP: past it, blocks freed below later ones could stay resident for the process's life) and the
    environment sets no mmap maximum of its own (restored to glibc's default after); else a no-op."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    on = (_HEAP_KEPT and size <= HEAP_KEEP and "MALLOC_MMAP_MAX_" not in os.environ and "mmap_max" not in tunables
          and _MALLOPT is not None and _MALLOPT(_M_MMAP_MAX, 0) == 1)
    try:
        yield
    finally:
        if on:
            _MALLOPT(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)


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

KEPT = KeptMappings()  # the process's kept cache mappings (zeroed_cpu's `reuse`)
