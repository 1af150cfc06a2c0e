"""Logs a person can read: progress that works in a terminal and in a log file, and no third-party noise.

In a terminal, long loops show a tqdm bar. In a log file (stderr not a TTY: Hydra's job log, `nohup`, SLURM),
a bar's carriage returns are unreadable and Lightning shows nothing at all for minutes, so the same loops log one
line at most every `ILF_LAB_PROGRESS_SECONDS` (default 30) plus a last line. `quiet_third_party` silences what a
user cannot act on: Lightning's advertising tip and accelerator banner, dependencies' deprecation warnings, the
weight-loading bars of transformers and datasets.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from typing import Any

log = logging.getLogger("ilf_lab.progress")


def is_tty() -> bool:
    return sys.stderr.isatty()


def _interval() -> float:
    try:
        return max(1.0, float(os.environ.get("ILF_LAB_PROGRESS_SECONDS", "30")))
    except ValueError:
        return 30.0


class LogProgress:
    """tqdm's `update` / `set_postfix_str` / `close`, as rate-limited log lines."""

    def __init__(self, total: int, desc: str, unit: str) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.n, self.postfix, self.t0 = 0, "", time.perf_counter()
        self.last = self.t0

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self.last >= _interval() and not (self.total and self.n >= self.total):  # close() says done
            self.last = now
            self._line(now)

    def set_postfix_str(self, s: str, refresh: bool = False) -> None:
        self.postfix = s

    def close(self) -> None:
        self._line(time.perf_counter(), done=True)

    def _line(self, now: float, done: bool = False) -> None:
        elapsed = max(now - self.t0, 1e-9)
        rate = self.n / elapsed
        left = (self.total - self.n) / rate if rate > 0 and self.total else 0.0
        pct = f" ({100 * self.n / self.total:.0f} %)" if self.total else ""
        tail = f"done in {elapsed:.0f} s" if done else f"about {left / 60:.1f} min left"
        extra = f", {self.postfix}" if self.postfix else ""
        speed = f"{rate:.1f} {self.unit}/s" if rate >= 0.1 else f"{rate * 60:.1f} {self.unit}/min"
        log.info("%s: %d/%d %s%s, %s%s, %s", self.desc, self.n, self.total, self.unit, pct, speed, extra, tail)


def progress_bar(total: int, desc: str, unit: str) -> Any:
    """A tqdm bar in a terminal, rate-limited log lines otherwise."""
    if is_tty():
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)
    return LogProgress(total, desc, unit)


def quiet_third_party() -> None:
    """Silence messages a user of ilf_lab cannot act on (ours and real errors still show)."""
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero",
                 "lightning_fabric.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for category in (DeprecationWarning, FutureWarning, PendingDeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=r"^(?!ilf_lab)")
    warnings.filterwarnings("ignore", message=r".*is deprecated.*", module=r"^(?!ilf_lab)")
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")  # a 2-core machine's dataloader
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:
        pass
