"""The engine's CPU memory (generation/pages.py): zero pages mapped on touch and given back, the C heap keeping
its pages, and the cache mappings kept for the next sampling call."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch

_HEAP_PROBE = """
import ctypes, resource, sys
ctypes.CDLL("libc.so.6").prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE: one fault per base page, whatever THP is set to
if sys.argv[1] == "keep":
    from ilf_lab.generation.pages import keep_heap_pages
    assert keep_heap_pages()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes, libc.memset.argtypes = [ctypes.c_void_p], [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
faults = []
for _ in range(3):  # three 24 MB buffers written and freed, as a prefill layer's temporaries are
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    ps = [libc.malloc(24 << 20) for _ in range(3)]
    for p in ps:
        libc.memset(p, 1, 24 << 20)
    for p in ps:
        libc.free(p)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(*faults)
"""


_BIG_PROBE = """
import ctypes, resource, sys
ctypes.CDLL("libc.so.6").prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE
from ilf_lab.generation.pages import heap_only, keep_heap_pages
assert keep_heap_pages()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes, libc.memset.argtypes = [ctypes.c_void_p], [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
faults = []
if sys.argv[1] == "restore":  # heap_only left, and one too large for it: glibc's mmap as before
    with heap_only(100 << 20):
        pass
    sizes = [(2 << 30, True), (0, False)]  # (heap_only's size, inside it)
else:
    sizes = [(100 << 20, sys.argv[1] == "heap")] * 3
for size, inside in sizes:  # a 100 MB block (past glibc's 32 MiB mmap ceiling, as the packed LM head is), written, freed
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    if inside:
        with heap_only(size):
            p = libc.malloc(100 << 20)
    else:
        p = libc.malloc(100 << 20)
    libc.memset(p, 1, 100 << 20)
    libc.free(p)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(*faults)
"""


def _probe_faults(script: str, mode: str) -> list[int]:
    """The page faults a probe script prints, run in a fresh process with glibc's own defaults (no MALLOC_* or
    tunables from the environment)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "PYTHONMALLOC")}
    p = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    return [int(x) for x in p.stdout.split()]


@pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_blocks_past_the_mmap_ceiling_reuse_heap_pages_inside_heap_only():
    """heap_only (around an engine call's weight packing): a block past glibc's mmap ceiling comes from the heap and,
    freed, its pages serve the next one; outside, each is a fresh mapping faulted in anew."""
    pages = (100 << 20) // os.sysconf("SC_PAGE_SIZE")
    fresh, heap = _probe_faults(_BIG_PROBE, "mmap"), _probe_faults(_BIG_PROBE, "heap")
    assert min(fresh) > pages // 2  # a new mapping each time
    assert heap[0] > pages // 2 and max(heap[1:]) < pages // 20  # faulted once, then the heap's pages
    restored = _probe_faults(_BIG_PROBE, "restore")  # too large for heap_only, and after it: a fresh mapping each time again
    assert min(restored) > pages // 2


@pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_the_heap_keeps_its_pages_for_repeated_large_buffers():
    """keep_heap_pages (set by a CPU engine): large buffers freed and allocated again reuse the heap's pages, where
    glibc's default gives them back and faults them in anew each time (fresh processes, glibc's own defaults: no
    MALLOC_* or tunables from the environment)."""
    pages = 3 * (24 << 20) // os.sysconf("SC_PAGE_SIZE")
    default, kept = _probe_faults(_HEAP_PROBE, "default"), _probe_faults(_HEAP_PROBE, "keep")
    assert min(default[1:]) > pages // 2  # given back, faulted in again
    assert kept[0] > pages // 2 and max(kept[1:]) < pages // 20  # faulted once, then reused


def test_zeroed_cpu_pages_are_mapped_on_touch_and_given_back():
    """The CPU cache's memory (pages.py): zero, private (a fork's child writes do not reach it), pages resident
    only once written, and released pages read as zero and leave the process's resident set."""
    import os
    import sys

    from ilf_lab.generation.pages import release_cpu, zeroed_cpu

    if sys.platform != "linux":
        pytest.skip("resident pages read from /proc")

    def resident_mb() -> float:
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    t = zeroed_cpu((64, 1 << 18), torch.float32)  # 64 MiB
    assert t.abs().sum() == 0
    before = resident_mb()
    t.fill_(1.0)
    assert resident_mb() - before > 48
    filled = resident_mb()
    release_cpu(t[:32])
    assert filled - resident_mb() > 24  # read before any temporary below
    assert t[:32].abs().sum() == 0 and t[32:].sum() == 32 * (1 << 18)
    pid = os.fork()
    if pid == 0:  # the child's write stays the child's (ctypes: torch's thread pool does not survive a fork)
        code = 1
        try:
            import ctypes

            ctypes.memset(t[40].data_ptr(), 0x7F, 4096)
            code = 0 if ctypes.c_uint8.from_address(t[40].data_ptr()).value == 0x7F else 2
        finally:
            os._exit(code)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0  # the child wrote
    assert t[40].max() == 1.0
    # never transparent huge pages (pages.py): one float written a MiB apart maps 4 KiB pages, not 2 MiB ones
    sparse = zeroed_cpu((64, 1 << 18), torch.float32)
    before = resident_mb()
    for i in range(64):
        sparse[i, 0] = 1.0
    assert resident_mb() - before < 16


@pytest.mark.skipif(sys.platform != "linux", reason="mincore and mremap")
def test_kept_mappings_are_reused_only_when_free_and_always_zero():
    """pages.KEPT: a cache mapping is reused once no tensor (or view) of it lives, its resident pages zeroed; a
    smaller request gives the pages past it back, a larger one grows the largest free mapping; the default
    zeroed_cpu never takes a kept mapping."""
    from ilf_lab.generation.pages import KEPT, zeroed_cpu

    if not KEPT.possible():
        pytest.skip("no reuse here (swap, or no mincore)")
    KEPT.drop()
    page_floats = os.sysconf("SC_PAGE_SIZE") // 4
    t = zeroed_cpu((256, 1024), torch.float32, reuse=True)  # 1 MiB
    t[::3] = float("nan")
    t[-1, -1] = float("inf")
    first, view = t.data_ptr(), t[5]
    del t
    busy = zeroed_cpu((256, 1024), torch.float32, reuse=True)
    assert busy.data_ptr() != first and busy.count_nonzero() == 0  # a view keeps the mapping in use
    del view, busy
    assert KEPT.resident_bytes() >= (1 << 20) // 3  # the NaN pages, still mapped
    plain = zeroed_cpu((256, 1024), torch.float32)
    assert plain.data_ptr() not in (first,) and plain.count_nonzero() == 0
    again = zeroed_cpu((256, 1024), torch.float32, reuse=True)
    assert again.data_ptr() == first and again.count_nonzero() == 0  # NaN and inf pages zeroed, not given back
    del again
    KEPT.drop()
    one = zeroed_cpu((256, 1024), torch.float32, reuse=True)
    one.fill_(7.0)
    ptr = one.data_ptr()
    del one
    small = zeroed_cpu((64, 1024), torch.float32, reuse=True)  # a quarter of the one free mapping
    assert small.data_ptr() == ptr and small.count_nonzero() == 0
    del small
    assert KEPT.resident_bytes() <= (1 << 18) + 4 * page_floats * 4  # the pages past the request given back
    big = zeroed_cpu((2048, 1024), torch.float32, reuse=True)  # 8 MiB: the largest free one, grown
    assert big.count_nonzero() == 0 and len(KEPT._held) == 1 and len(KEPT._held[0]) == 8 << 20  # grown, not new
    big.fill_(1.0)
    assert big.sum() == big.numel()
    del big
    KEPT.drop()
    assert KEPT.resident_bytes() == 0
