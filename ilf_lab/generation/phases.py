"""Wall time per phase of a sampling call (prefill, the decode step's parts, token choice, stop checks), for the
sampling benchmark's profile. Off by default: a disabled timer hands out one shared no-op context."""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator

_OFF = contextlib.nullcontext()


class Phases:
    """Accumulates seconds per named phase. On CPU torch ops run synchronously, so wall time around them is the
    op's time; on CUDA the timer synchronises at each boundary (profiling only)."""

    def __init__(self, enabled: bool = True, cuda: bool = False) -> None:
        self.enabled = enabled
        self.cuda = cuda
        self.seconds: dict[str, float] = defaultdict(float)

    def __call__(self, name: str) -> contextlib.AbstractContextManager:
        return self._time(name) if self.enabled else _OFF

    @contextlib.contextmanager
    def _time(self, name: str) -> Iterator[None]:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                import torch

                torch.cuda.synchronize()
            self.seconds[name] += time.perf_counter() - t0

    def table(self, total: float) -> list[tuple[str, float, float]]:
        """(phase, seconds, share of `total`) per phase, largest first, plus the untimed rest (Python between)."""
        rows = sorted(self.seconds.items(), key=lambda kv: -kv[1])
        rest = total - sum(self.seconds.values())
        out = [(k, v, v / total) for k, v in rows]
        out.append(("rest (scheduler, Python between phases)", rest, rest / total))
        return out


OFF = Phases(enabled=False)
