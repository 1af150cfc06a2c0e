"""Run untrusted model-written programs against assert-style tests, in a pre-started pool.

The caller typically holds torch and a model, so programs are never forked from it
(that costs ~22 ms each and copies the model's address space into hostile code).
Instead ``workers`` small clean interpreters (``worker.py``) are started once and
reused; each forks one contained process per program.  See ``worker.py`` for the
isolation layers and ``verdict.py`` for the verdict protocol: the tests are planned here, the
program's process only reports operand values, and the pass/fail decision is made here, in the
harness process, which the program cannot reach.  docs/sandbox.md states the guarantees.
One module over ~400 lines: the pool, its uid claims and the dispatch loop share one worker lifecycle.

Pools do not share sandbox uids: each claims its uids with a lock file per uid (held for the pool's
life), so the "kill every process of this uid" cleanup after a worker death can only hit the pool's own
programs.
"""

from __future__ import annotations

import atexit
import fcntl
import json
import logging
import math
import numbers
import os
import select
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ilf_lab.execution.verdict import SEALED, ItemPlan, Judge, assess_trust, plan_item

log = logging.getLogger(__name__)

WORKER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "worker.py")
COMPARISONS = ("exact", "approx")
MIN_MEMORY_MB = 64  # below this the interpreter itself cannot run
EXIT_RESULT_CHANNEL = 121  # = worker.EXIT_RESULT_CHANNEL
CHANNEL_CAP_MB = 16  # = worker.CHANNEL_CAP
# slack on top of a job's own timeout before the pool declares its worker hung
_WORKER_GRACE_S = 15.0
_START_TIMEOUT_S = 30.0
_UID_SPAN = 4096  # how far above the base the pool looks for free sandbox uids


@dataclass
class Verdict:
    """Outcome of one program: ``result`` is "passed", "timed out" or "failed: <reason>".

    ``trust`` is "sealed" when every assert of the item was decided outside the program's process
    against expected values it never saw, "partial" when some part of the tests ran inside it
    (see docs/sandbox.md).
    """

    passed: bool
    result: str
    stdout: str = ""
    seconds: float = 0.0
    trust: str = SEALED


class WorkerDied(RuntimeError):
    pass


class _Worker:
    """One worker server process plus a line reader on its stdout."""

    def __init__(self, slot: int, uid: int | None, hash_seed: int = 0) -> None:
        self.slot = slot
        cfg = json.dumps({"slot": slot, "uid": uid})
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

    def _send(self, obj: dict) -> None:
        try:
            self.proc.stdin.write((json.dumps(obj) + "\n").encode())  # type: ignore[union-attr]
            self.proc.stdin.flush()  # type: ignore[union-attr]
        except (BrokenPipeError, OSError) as e:
            raise WorkerDied(f"worker pipe broken: {e}") from e

    def run(self, job: dict, timeout: float, judge: Judge, meanwhile=None) -> dict:
        """Send one job; feed the channel lines to ``judge`` as they come; stop the program as soon as the
        judge has failed it.  ``meanwhile()`` runs while the program does.  -> the worker's final report."""
        self._send(job)
        if meanwhile is not None:
            meanwhile()
        deadline = time.monotonic() + timeout + _WORKER_GRACE_S
        stopped = False
        while True:
            msg = json.loads(self.readline(deadline - time.monotonic()))
            if msg.get("id") != job["id"]:
                raise WorkerDied(f"protocol error: answer for job {msg.get('id')!r}, expected {job['id']!r}")
            for line in msg.get("records", ()):
                judge.feed(line)
            if msg.get("final"):
                return msg
            if judge.failure is not None and not stopped:
                self._send({"stop": job["id"]})
                stopped = True

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


def _decide(judge: Judge, final: dict) -> str:
    """The verdict string from what the judge saw and how the program's process ended."""
    status = final.get("status")
    if judge.failure is not None:
        return judge.failure  # the first failing assert or error, as Python would have stopped there
    if status == "timeout":
        return "timed out"
    if status == "overflow":
        return f"failed: result channel overflow (more than {CHANNEL_CAP_MB} MiB of values)"
    if status == "error":
        return f"failed: sandbox error: {final.get('error')}"
    if judge.complete:
        return "passed"
    if status == "exit" and final.get("code") == EXIT_RESULT_CHANNEL:
        return "failed: result channel closed or corrupted by the program"
    if status == "signal":
        return f"failed: killed by signal {final.get('signal')}"
    if judge.done:
        return judge.missing()
    if status == "exit":
        return f"failed: exited with status {final.get('code')} before the tests completed"
    return f"failed: program stopped ({status})"


def isolation_summary(iso: Mapping) -> str:
    """One line naming the isolation layers that are off (or saying that all are on)."""
    if not iso.get("fallbacks"):
        return "sandbox isolation: all layers on (" + ", ".join(iso.get("layers", [])) + ")"
    return (
        "sandbox isolation OFF: " + "; ".join(iso["fallbacks"]) + " | on: " + ", ".join(iso.get("layers", []))
    )


def _lock_dir() -> str | None:
    """A root-owned directory for the uid lock files (None when none can be had)."""
    for d in ("/run/ilf-sandbox", os.path.join(tempfile.gettempdir(), "ilf-sandbox-uids")):
        try:
            os.makedirs(d, mode=0o755, exist_ok=True)
            st = os.lstat(d)
            if st.st_uid == 0 and not st.st_mode & 0o022 and os.path.isdir(d) and not os.path.islink(d):
                return d
        except OSError:
            continue
    return None


def _claim_uids(n: int, start: int) -> tuple[int, list[int]]:
    """Lock ``n`` consecutive free sandbox uids at or above ``start``: -> (first uid, lock fds).

    A uid is this pool's while it holds ``uid-<N>.lock`` (flock, released by the kernel when the
    process dies), so two harnesses on one machine never run programs under the same uid and a
    "kill every process of this uid" after a worker death cannot hit another pool's programs.
    """
    d = _lock_dir()
    if d is None:
        raise RuntimeError("no root-owned directory for sandbox uid locks (/run/ilf-sandbox)")
    base = start
    while base + n <= start + _UID_SPAN:
        fds: list[int] = []
        for uid in range(base, base + n):
            fd = os.open(os.path.join(d, f"uid-{uid}.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                break
            fds.append(fd)
        if len(fds) == n:
            for uid in range(base, base + n):
                _kill_uid(uid)  # left over from a harness that died holding it
            return base, fds
        for fd in fds:
            os.close(fd)
        base += len(fds) + 1
    raise RuntimeError(f"no {n} free sandbox uids in [{start}, {start + _UID_SPAN})")


class SandboxPool:
    """``n`` pre-started worker servers; thread-safe ``run`` dispatching jobs in input order."""

    def __init__(self, n: int, uid_base: int | None = None, hash_seed: int = 0) -> None:
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise ValueError(f"workers must be an integer >= 1, got {n!r}")
        n = int(n)
        start = int(os.environ.get("ILF_SANDBOX_UID_BASE", "62000")) if uid_base is None else uid_base
        self._uid_locks: list[int] = []
        self.uids: list[int] | None = None
        if os.geteuid() == 0:
            start, self._uid_locks = _claim_uids(n, start)
            self.uids = list(range(start, start + n))
        self.uid_base = start
        self.hash_seed = hash_seed
        self.workers: list[_Worker] = []
        try:
            for i in range(n):
                self.workers.append(_Worker(i, self._uid(i), hash_seed))
        except BaseException:
            self.close()
            raise
        self.restarts = 0
        self._lock = threading.Lock()
        if self.isolation["fallbacks"]:
            log.warning(isolation_summary(self.isolation))
        else:
            log.info(isolation_summary(self.isolation))

    def _uid(self, slot: int) -> int | None:
        return None if self.uids is None else self.uids[slot]

    @property
    def isolation(self) -> dict:
        """Layers the workers obtained and what fell back (from the first worker's hello)."""
        h = self.workers[0].hello
        return {"layers": h["layers"], "fallbacks": h["fallbacks"]}

    def _run_one(
        self, slot: int, job: dict, plan: ItemPlan, approx: bool, timeout: float, meanwhile=None
    ) -> Verdict:
        w = self.workers[slot]
        judge = Judge(plan, approx)
        program, setup = job["program"], job["setup"]

        def while_it_runs() -> None:
            assess_trust(plan, program, setup)
            if meanwhile is not None:
                meanwhile()

        try:
            final = w.run(job, timeout, judge, while_it_runs)
        except (WorkerDied, ValueError) as e:
            w.kill()
            uid = self._uid(slot)
            if uid is not None:
                _kill_uid(uid)  # the dead worker's in-flight program, if any (the uid is ours alone)
            with self._lock:
                self.restarts += 1
            self.workers[slot] = _Worker(slot, uid, self.hash_seed)
            trust = assess_trust(plan, program, setup)
            return Verdict(False, f"failed: sandbox worker died ({e}); restarted", "", 0.0, trust)
        result = _decide(judge, final)
        return Verdict(
            result == "passed",
            result,
            str(final.get("stdout", "")),
            float(final.get("seconds", 0.0)),
            plan.trust,
        )

    def run(
        self,
        items: Sequence[Mapping],
        *,
        timeout: float = 10.0,
        comparison: str = "exact",
        memory_mb: int = 4096,
        progress: bool = False,
        workers: int | None = None,
    ) -> list[Verdict]:
        """Verdicts in input order; ``workers`` caps how many of the pool's workers this call uses."""
        check_limits(timeout=timeout, memory_mb=memory_mb, comparison=comparison, workers=workers)
        jobs = [_make_job(i, it, timeout, memory_mb) for i, it in enumerate(items)]
        approx = comparison == "approx"
        results: list[Verdict | None] = [None] * len(jobs)
        plans: list[ItemPlan | None] = [None] * len(jobs)
        cursor = [0]  # the next job to hand out
        lock = threading.Lock()
        bar = _progress_bar(len(jobs)) if progress else None
        errors: list[BaseException] = []

        def plan_of(i: int) -> ItemPlan:
            plan = plans[i]
            if plan is None:  # (two threads may both plan a job: same result, no harm)
                job = jobs[i]
                plan = plans[i] = plan_item(job["program"], job["setup"], job["tests"], trust=False)
            return plan

        def plan_ahead() -> None:  # while a program runs: its thread would only be waiting
            for j in range(cursor[0], min(cursor[0] + 2, len(jobs))):
                plan_of(j)

        def loop(slot: int) -> None:
            try:
                while True:
                    with lock:
                        i = cursor[0]
                        if i >= len(jobs):
                            return
                        cursor[0] += 1
                    plan = plan_of(i)
                    job = {**jobs[i], "tests": plan.sources}  # the sandbox never sees the expected values
                    results[i] = self._run_one(slot, job, plan, approx, timeout, plan_ahead)
                    if bar is not None:
                        with lock:
                            bar.update(1)
            except BaseException as e:  # surfaced in the caller's thread below
                errors.append(e)

        n = min(len(self.workers), workers or len(self.workers), max(1, len(jobs)))
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
        for fd in self._uid_locks:
            try:
                os.close(fd)
            except OSError:
                pass
        self._uid_locks = []

    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _kill_uid(uid: int) -> None:
    """SIGKILL every process running as the sandbox ``uid`` (only when we are root, who holds its lock)."""
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


def check_limits(
    *, timeout: float, memory_mb: int, comparison: str = "exact", workers: int | None = None
) -> None:
    """One clear ValueError per out-of-range execution setting (the CLI turns them into `error:` lines)."""
    if comparison not in COMPARISONS:
        raise ValueError(f"comparison must be one of {COMPARISONS}, got {comparison!r}")
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, numbers.Real)
        or not math.isfinite(timeout)
        or timeout <= 0
    ):
        raise ValueError(f"timeout must be > 0 and finite (seconds), got {timeout!r}")
    if (
        isinstance(memory_mb, bool)
        or not isinstance(memory_mb, numbers.Integral)
        or memory_mb < MIN_MEMORY_MB
    ):
        raise ValueError(f"memory_mb must be an integer >= {MIN_MEMORY_MB}, got {memory_mb!r}")
    if workers is not None and (
        isinstance(workers, bool) or not isinstance(workers, numbers.Integral) or workers < 1
    ):
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")


def _make_job(i: int, it: Mapping, timeout: float, memory_mb: int) -> dict:
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
        "memory_mb": int(memory_mb),
    }


def _progress_bar(total: int):
    """A bar in a terminal, rate-limited log lines in a log file (a tqdm bar there is one long line of \r)."""
    from ilf_lab.logs import progress_bar

    return progress_bar(total, "executing", "prog")


_POOL: SandboxPool | None = None
_POOL_LOCK = threading.Lock()


def get_pool(workers: int | None = None) -> SandboxPool:
    """The process-wide pool, started on first use and reused while it has at least ``workers`` workers
    (restarted with ``workers`` when it has fewer, so small batches do not thrash it)."""
    global _POOL
    n = workers or os.cpu_count() or 1
    with _POOL_LOCK:
        if _POOL is not None and len(_POOL.workers) < n:
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


def worker_count(workers: int | None, n_items: int) -> tuple[int, str | None]:
    """Workers to start for ``n_items`` programs, and a one-line note when fewer than asked."""
    asked = workers or os.cpu_count() or 1
    n = max(1, min(asked, n_items))
    if workers is not None and workers > n:
        s = "s" if n_items != 1 else ""
        return n, f"{workers} workers requested for {n_items} program{s}: starting {n}"
    return n, None


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
    optional ``setup``.  ``comparison="approx"`` compares ``==`` numerically
    (rel 1e-6, abs 1e-12, like ``pytest.approx``); the default ``"exact"`` runs MBPP's
    asserts as written, which is the benchmark's definition of correct.  No more workers than
    items are used (a one-line log message says so when ``workers`` asked for more).
    """
    check_limits(timeout=timeout, memory_mb=memory_mb, comparison=comparison, workers=workers)
    if not items:
        return []
    n, note = worker_count(workers, len(items))
    if note:
        log.warning(note)
    return get_pool(n).run(
        items, timeout=timeout, comparison=comparison, memory_mb=memory_mb, progress=progress, workers=n
    )
