"""Run untrusted model-written programs against assert-style tests, in a pre-started pool.

The caller typically holds torch and a model, so programs are never forked from it
(that costs ~22 ms each and copies the model's address space into hostile code).
Instead ``workers`` small clean interpreters (``worker.py``) are started once and
reused; each forks one contained process per program.  See ``worker.py`` for the
isolation layers.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

WORKER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "worker.py")
COMPARISONS = ("exact", "approx")
# slack on top of a job's own timeout before the pool declares its worker hung
_WORKER_GRACE_S = 15.0
_START_TIMEOUT_S = 30.0


@dataclass
class Verdict:
    """Outcome of one program: ``result`` is "passed", "timed out" or "failed: <reason>"."""

    passed: bool
    result: str
    stdout: str = ""
    seconds: float = 0.0


class WorkerDied(RuntimeError):
    pass


class _Worker:
    """One worker server process plus a line reader on its stdout."""

    def __init__(self, slot: int, uid_base: int, hash_seed: int = 0) -> None:
        self.slot = slot
        cfg = json.dumps({"slot": slot, "uid_base": uid_base})
        # -S -s: no site/user site-packages (stdlib only, like a clean `python -I`); not -I/-E
        # because we want PYTHONHASHSEED honoured: a fixed seed makes set/dict-of-str
        # iteration order, and so verdicts, reproducible.  The env is ours and minimal.
        flags = ["-S", "-s"] + (["-P"] if sys.version_info >= (3, 11) else [])
        self.proc = subprocess.Popen(
            [sys.executable, *flags, WORKER_SCRIPT, cfg],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": str(hash_seed)},
            cwd="/",
            close_fds=True,
            start_new_session=True,  # a Ctrl-C in the terminal is the harness's business, not the jobs'
        )
        self._buf = b""
        self.hello = json.loads(self.readline(_START_TIMEOUT_S))
        if not self.hello.get("ready"):
            self.kill()
            raise RuntimeError(f"sandbox worker failed to start: {self.hello.get('error')}")

    def readline(self, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()  # type: ignore[union-attr]
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WorkerDied("worker stalled")
            if not select.select([fd], [], [], left)[0]:
                continue
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                raise WorkerDied("worker exited")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    def run(self, job: dict, timeout: float) -> dict:
        try:
            self.proc.stdin.write((json.dumps(job) + "\n").encode())  # type: ignore[union-attr]
            self.proc.stdin.flush()  # type: ignore[union-attr]
        except (BrokenPipeError, OSError) as e:
            raise WorkerDied(f"worker pipe broken: {e}") from e
        return json.loads(self.readline(timeout + _WORKER_GRACE_S))

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, 9)
        except OSError:
            pass
        self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()  # type: ignore[union-attr]
            except OSError:
                pass

    def close(self) -> None:
        try:
            self.proc.stdin.close()  # type: ignore[union-attr]
            self.proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self.kill()


class SandboxPool:
    """``n`` pre-started worker servers; thread-safe ``run`` dispatching jobs in input order."""

    def __init__(self, n: int, uid_base: int | None = None, hash_seed: int = 0) -> None:
        if n < 1:
            raise ValueError("need at least one worker")
        self.uid_base = int(os.environ.get("ILF_SANDBOX_UID_BASE", "62000")) if uid_base is None else uid_base
        self.hash_seed = hash_seed
        self.workers = [_Worker(i, self.uid_base, hash_seed) for i in range(n)]
        self.restarts = 0
        self._lock = threading.Lock()

    @property
    def isolation(self) -> dict:
        """Layers the workers obtained and what fell back (from the first worker's hello)."""
        h = self.workers[0].hello
        return {"layers": h["layers"], "fallbacks": h["fallbacks"]}

    def _run_one(self, slot: int, job: dict, timeout: float) -> Verdict:
        w = self.workers[slot]
        try:
            r = w.run(job, timeout)
        except (WorkerDied, ValueError) as e:
            w.kill()
            _kill_uid(self.uid_base + slot)  # the dead worker's in-flight program, if any
            with self._lock:
                self.restarts += 1
            self.workers[slot] = _Worker(slot, self.uid_base, self.hash_seed)
            return Verdict(False, f"failed: sandbox worker died ({e}); restarted", "", 0.0)
        return Verdict(
            bool(r["passed"]), str(r["result"]), str(r.get("stdout", "")), float(r.get("seconds", 0.0))
        )

    def run(
        self,
        items: Sequence[Mapping],
        *,
        timeout: float = 10.0,
        comparison: str = "exact",
        memory_mb: int = 4096,
        progress: bool = False,
    ) -> list[Verdict]:
        jobs = [_make_job(i, it, timeout, comparison, memory_mb) for i, it in enumerate(items)]
        results: list[Verdict | None] = [None] * len(jobs)
        nxt = iter(range(len(jobs)))
        lock = threading.Lock()
        bar = _progress_bar(len(jobs)) if progress else None
        errors: list[BaseException] = []

        def loop(slot: int) -> None:
            try:
                while True:
                    with lock:
                        i = next(nxt, None)
                    if i is None:
                        return
                    results[i] = self._run_one(slot, jobs[i], timeout)
                    if bar is not None:
                        with lock:
                            bar.update(1)
            except BaseException as e:  # surfaced in the caller's thread below
                errors.append(e)

        n = min(len(self.workers), max(1, len(jobs)))
        threads = [threading.Thread(target=loop, args=(s,), daemon=True) for s in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if bar is not None:
            bar.close()
        if errors:
            raise errors[0]
        return results  # type: ignore[return-value]

    def close(self) -> None:
        for w in self.workers:
            w.close()

    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _kill_uid(uid: int) -> None:
    """SIGKILL every process running as the sandbox ``uid`` (only when we are root)."""
    if os.geteuid() != 0:
        return
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status") as f:
                real_uid = next(int(line.split()[1]) for line in f if line.startswith("Uid:"))
            if real_uid == uid:
                os.kill(int(name), 9)
        except (OSError, StopIteration, ValueError):
            pass


def _make_job(i: int, it: Mapping, timeout: float, comparison: str, memory_mb: int) -> dict:
    if comparison not in COMPARISONS:
        raise ValueError(f"comparison must be one of {COMPARISONS}, got {comparison!r}")
    program, tests, setup = it.get("program"), it.get("tests"), it.get("setup") or ""
    if not isinstance(program, str):
        raise ValueError(f"item {i}: 'program' must be a string")
    if not isinstance(tests, (list, tuple)) or not all(isinstance(t, str) for t in tests):
        raise ValueError(f"item {i}: 'tests' must be a list of strings")
    if not isinstance(setup, str):
        raise ValueError(f"item {i}: 'setup' must be a string")
    return {
        "id": i,
        "program": program,
        "tests": list(tests),
        "setup": setup,
        "timeout": float(timeout),
        "comparison": comparison,
        "memory_mb": int(memory_mb),
    }


def _progress_bar(total: int):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress is cosmetic
        return None
    return tqdm(total=total, desc="executing", unit="prog")


_POOL: SandboxPool | None = None
_POOL_LOCK = threading.Lock()


def get_pool(workers: int | None = None) -> SandboxPool:
    """The process-wide pool, started on first use and reused (restarted if ``workers`` changes)."""
    global _POOL
    n = workers or os.cpu_count() or 1
    with _POOL_LOCK:
        if _POOL is not None and len(_POOL.workers) != n:
            _POOL.close()
            _POOL = None
        if _POOL is None:
            _POOL = SandboxPool(n)
        return _POOL


def shutdown_pool() -> None:
    """Stop the process-wide pool (also done at interpreter exit)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is not None:
            _POOL.close()
            _POOL = None


atexit.register(shutdown_pool)


def run_programs(
    items: Sequence[Mapping],
    *,
    timeout: float = 10.0,
    workers: int | None = None,
    comparison: str = "exact",
    memory_mb: int = 4096,
    progress: bool = False,
) -> list[Verdict]:
    """Execute each item's program + setup + asserts in the sandbox; verdicts in input order.

    ``items`` are mappings with ``task_id``, ``program``, ``tests`` (assert strings) and an
    optional ``setup``.  ``comparison="approx"`` compares ``assert a == b`` numerically
    (rel 1e-6, abs 1e-12, like ``pytest.approx``); the default ``"exact"`` runs MBPP's
    asserts as written, which is the benchmark's definition of correct.
    """
    if not items:
        return []
    return get_pool(workers).run(
        items, timeout=timeout, comparison=comparison, memory_mb=memory_mb, progress=progress
    )
