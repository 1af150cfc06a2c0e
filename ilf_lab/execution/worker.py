"""Sandbox worker server: runs untrusted programs, one forked process per job.

This file is executed as a *script* by a clean interpreter
(``python -S -s -P worker.py CONFIG`` with a minimal environment), never imported into a process that holds
torch or a model, so it must only use the standard library.  Forking this small
interpreter costs ~0.4 ms, against ~22 ms for forking the torch-holding caller.

Protocol: the parent writes one JSON job per line on stdin; the worker answers one
JSON result per line on stdout.  The first line the worker writes is a hello record
naming the isolation layers it got.

Process tree per job::

    worker (root; own mount/net/ipc namespaces; child subreaper; dies with the harness)
      └─ H  one fork per job: pid 1 of a fresh PID namespace, new session, rlimits,
            unprivileged uid, fresh temp cwd; exec()s program, setup and asserts

When ``H`` exits (normally, or SIGKILLed by the worker on timeout) the kernel kills
every process left in its PID namespace, so fork bombs, daemons and double-forked
orphans cannot outlive the job.  (One fork per job, not an extra "init" process:
that would double the ~0.5 ms fork+exit cost; the price is pid-1 signal semantics,
i.e. the program cannot SIGKILL itself from inside.)  The verdict comes only from a result record that
``H`` writes (tagged with a per-job nonce) after the last assert ran; exit status and
stdout are never trusted.
"""

from __future__ import annotations

import ast
import builtins
import ctypes
import errno
import fcntl
import io
import json
import math
import os
import resource
import select
import shutil
import signal
import sys
import time

CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36

STDOUT_CAP = 64 * 1024
FSIZE_LIMIT = 8 * 1024 * 1024
NPROC_LIMIT = 64
NOFILE_LIMIT = 256
TMPFS_SIZE = "256m"
RESULT_FD = 3  # the result channel's fd number inside H
EXIT_RESULT_CHANNEL = 121  # H could not write its record

_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _unshare(flags: int) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare")


def _mount(src: str, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    _check(
        _libc.mount(
            src.encode(),
            target.encode(),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            data.encode() if data else None,
        ),
        f"mount {target}",
    )


def _prctl(option: int, arg: int) -> None:
    _libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg), 0, 0, 0)


# --------------------------------------------------------------------------- setup


class Isolation:
    """Which containment layers this worker obtained (reported to the parent)."""

    def __init__(self, slot: int, uid_base: int) -> None:
        self.layers: list[str] = []
        self.fallbacks: list[str] = []
        self.pidns_fd: int | None = None
        self.netns = False
        self.uid: int | None = None
        real_root = os.geteuid() == 0
        # (no PR_SET_PDEATHSIG here: it fires when the *thread* that spawned us exits, and the
        # pool may restart workers from short-lived threads; we exit on stdin EOF instead)
        _prctl(PR_SET_CHILD_SUBREAPER, 1)  # orphans re-parent to us, not to init
        have_caps = real_root
        if not real_root:
            # unprivileged: a user namespace gives us CAP_SYS_ADMIN over new namespaces
            try:
                uid, gid = os.geteuid(), os.getegid()
                _unshare(CLONE_NEWUSER)
                with open("/proc/self/setgroups", "w") as f:
                    f.write("deny")
                with open("/proc/self/uid_map", "w") as f:
                    f.write(f"0 {uid} 1")
                with open("/proc/self/gid_map", "w") as f:
                    f.write(f"0 {gid} 1")
                have_caps = True
                self.layers.append("userns")
            except OSError as e:
                self.fallbacks.append(f"no user namespace ({e.strerror}): no pid/net/mount isolation")
        if have_caps:
            try:
                _unshare(CLONE_NEWNET)
                self.netns = True
                self.layers.append("netns")
            except OSError as e:
                self.fallbacks.append(f"no net namespace ({e.strerror}): socket monkeypatched")
            try:
                _unshare(CLONE_NEWIPC)
                self.layers.append("ipcns")
            except OSError:
                pass
            try:
                _unshare(CLONE_NEWNS)
                _mount("none", "/", None, MS_REC | MS_PRIVATE, None)
                for d in ("/tmp", "/var/tmp", "/dev/shm", "/run/lock"):
                    if os.path.isdir(d):
                        _mount(
                            "tmpfs",
                            d,
                            "tmpfs",
                            MS_NOSUID | MS_NODEV | MS_NOEXEC,
                            f"size={TMPFS_SIZE},mode=1777",
                        )
                self.layers.append("mountns+tmpfs")
                if real_root:
                    self._expose_stdlib()
            except OSError as e:
                self.fallbacks.append(f"no private tmpfs ({e.strerror})")
            try:
                fd = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
                _unshare(CLONE_NEWPID)  # probe: only pid_for_children changes
                _check(_libc.setns(fd, CLONE_NEWPID), "setns")
                self.pidns_fd = fd
                self.layers.append("pidns")
            except OSError as e:
                self.fallbacks.append(f"no pid namespace ({e.strerror}): process-group kill + /proc sweep")
        self.cgroups: list[str] = []
        if real_root:
            self._join_cgroups(f"ilf-sandbox-{os.getpid()}")
        if real_root:
            if "mountns+tmpfs" not in self.layers:
                self.fallbacks.append("stdlib may be unreadable for the sandbox uid (no mount namespace)")
            self.uid = uid_base + slot
            self.layers.append(f"uid {self.uid}")
        else:
            self.fallbacks.append("not root: program keeps the caller's uid")
        self.layers += ["setsid", "rlimits", "subreaper"]

    def _join_cgroups(self, name: str) -> None:
        """Own cgroup (v1 cpu + pids) for this worker and, by inheritance, its jobs.

        One CPU of quota means a fork bomb in one worker cannot starve the programs of the
        other workers into false timeouts; pids.max bounds it independently of the uid.
        """
        try:
            with open("/proc/self/cgroup") as f:
                paths = {}
                for line in f:
                    _, ctrls, path = line.rstrip("\n").split(":", 2)
                    for c in ctrls.split(","):
                        paths[c] = path
        except OSError:
            return
        wanted = {
            "cpu": {"cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": "100000"},
            "pids": {"pids.max": str(4 * NPROC_LIMIT)},
        }
        for ctrl, settings in wanted.items():
            parent = f"/sys/fs/cgroup/{ctrl}{paths.get(ctrl, '/')}".rstrip("/")
            d = os.path.join(parent, name)
            try:
                for stale in os.listdir(parent):  # left by workers that were SIGKILLed
                    if stale.startswith("ilf-sandbox-") and not os.path.exists(f"/proc/{stale[12:]}"):
                        try:
                            os.rmdir(os.path.join(parent, stale))
                        except OSError:
                            pass
                os.mkdir(d)
                for key, val in settings.items():
                    with open(os.path.join(d, key), "w") as f:
                        f.write(val)
                with open(os.path.join(d, "cgroup.procs"), "w") as f:
                    f.write(str(os.getpid()))
                self.cgroups.append(d)
                self.layers.append(f"cgroup {ctrl}")
            except OSError as e:
                self.fallbacks.append(f"no {ctrl} cgroup ({e.strerror})")
                try:
                    os.rmdir(d)
                except OSError:
                    pass

    def leave_cgroups(self) -> None:
        for d in self.cgroups:
            try:
                with open(os.path.join(os.path.dirname(d), "cgroup.procs"), "w") as f:
                    f.write(str(os.getpid()))
                os.rmdir(d)
            except OSError:
                pass

    def _expose_stdlib(self) -> None:
        """Make the interpreter's stdlib readable for the unprivileged sandbox uid.

        E.g. pyenv under ``/root`` (mode 0700): in our private mount namespace we cover the
        first non-world-searchable ancestor with an empty tmpfs (hiding its other contents)
        and bind-mount the Python installation back at the same path, read-only.
        """
        target = os.path.realpath(sys.base_prefix)
        blocker = None
        path = "/"
        for part in target.strip("/").split("/"):
            path = os.path.join(path, part)
            if not os.stat(path).st_mode & 0o001:
                blocker = path
                break
        if blocker is None:
            return
        stage = "/tmp/.ilf-python-stage"
        os.makedirs(stage, exist_ok=True)
        _mount(target, stage, None, MS_BIND | MS_REC, None)
        _mount("tmpfs", blocker, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
        os.makedirs(target, mode=0o755, exist_ok=True)
        p = target
        while p != blocker:  # makedirs honours umask; make the chain searchable
            os.chmod(p, 0o755)
            p = os.path.dirname(p)
        _mount(stage, target, None, MS_BIND | MS_REC, None)
        _mount("none", target, None, MS_BIND | MS_REMOUNT | MS_RDONLY, None)
        _check(_libc.umount2(stage.encode(), 2), "umount")  # MNT_DETACH
        os.rmdir(stage)
        self.layers.append(f"stdlib re-exposed under tmpfs-covered {blocker}")


# --------------------------------------------------------------------------- child side


class _CappedFd(io.RawIOBase):
    """Raw writer on an fd that silently drops everything past a shared byte cap."""

    budget = [STDOUT_CAP]

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:  # type: ignore[override]
        n = len(b)
        left = self.budget[0]
        if left > 0:
            chunk = bytes(b[:left])
            self.budget[0] -= len(chunk)
            try:
                while chunk:
                    chunk = chunk[os.write(self._fd, chunk) :]
            except OSError:
                self.budget[0] = 0
        return n


def _approx_eq(actual, expected) -> bool:
    """pytest.approx-like equality: numbers within rel 1e-6 / abs 1e-12, recursing into containers."""
    num = (int, float, complex)
    if isinstance(actual, num) and isinstance(expected, num) and not isinstance(actual, bool):
        if isinstance(actual, int) and isinstance(expected, int):
            return actual == expected
        if isinstance(actual, complex) or isinstance(expected, complex):
            return abs(actual - expected) <= max(1e-6 * abs(expected), 1e-12)
        if math.isinf(actual) or math.isinf(expected):
            return actual == expected
        return abs(actual - expected) <= max(1e-6 * abs(expected), 1e-12)
    if isinstance(actual, (list, tuple)) and isinstance(expected, (list, tuple)):
        return (
            type(actual) is type(expected)
            and len(actual) == len(expected)
            and all(_approx_eq(a, e) for a, e in zip(actual, expected, strict=True))
        )
    if isinstance(actual, dict) and isinstance(expected, dict):
        return actual.keys() == expected.keys() and all(_approx_eq(actual[k], expected[k]) for k in expected)
    return bool(actual == expected)


class _ApproxAsserts(ast.NodeTransformer):
    def visit_Assert(self, node: ast.Assert) -> ast.AST:
        t = node.test
        if isinstance(t, ast.Compare) and len(t.ops) == 1 and isinstance(t.ops[0], ast.Eq):
            call = ast.Call(ast.Name("__approx_eq", ast.Load()), [t.left, t.comparators[0]], [])
            node.test = ast.copy_location(call, t)
        return node


def _compile_test(src: str, name: str, approx: bool):
    if not approx:
        return compile(src, name, "exec")
    tree = _ApproxAsserts().visit(ast.parse(src, name))
    return compile(ast.fix_missing_locations(tree), name, "exec")


def _reason(e: BaseException) -> str:
    if isinstance(e, MemoryError):
        return "exceeded memory limit"
    name = type(e).__name__
    try:
        msg = str(e)
    except BaseException:
        msg = ""
    msg = " ".join(msg.split())[:300]  # one line: the record format relies on it
    return f"{name}: {msg}" if msg else name


def _no_network() -> None:
    """Fallback when no net namespace is available: make socket creation fail."""
    import socket

    def refuse(*a, **k):
        raise OSError(errno.EACCES, "network disabled in sandbox")

    socket.socket.connect = refuse  # type: ignore[method-assign]
    socket.socket.connect_ex = refuse  # type: ignore[method-assign]
    socket.socket.bind = refuse  # type: ignore[method-assign]
    socket.create_connection = refuse  # type: ignore[assignment]


def _program_main(job: dict, iso: Isolation, jobdir: str, nonce: str, capture_fd: int, res_w: int) -> None:
    """Runs in H (pid 1 of a fresh PID namespace when available): contain, run, report, _exit."""
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(capture_fd, 1)
    os.dup2(capture_fd, 2)
    os.dup2(fcntl.fcntl(res_w, fcntl.F_DUPFD, 10), RESULT_FD)
    os.closerange(RESULT_FD + 1, 1 << 16)  # job pipe to the harness, namespace fds, ...
    timeout = float(job["timeout"])
    cpu = int(math.ceil(timeout)) + 1
    mem = int(job["memory_mb"]) * 1024 * 1024
    for lim, val in (
        (resource.RLIMIT_CPU, (cpu, cpu + 1)),
        (resource.RLIMIT_AS, (mem, mem)),
        (resource.RLIMIT_FSIZE, (FSIZE_LIMIT, FSIZE_LIMIT)),
        (resource.RLIMIT_NPROC, (NPROC_LIMIT, NPROC_LIMIT)),
        (resource.RLIMIT_NOFILE, (NOFILE_LIMIT, NOFILE_LIMIT)),
        (resource.RLIMIT_CORE, (0, 0)),
    ):
        try:
            resource.setrlimit(lim, val)
        except (ValueError, OSError):
            pass
    if iso.uid is not None:
        os.setgroups([])
        os.setgid(iso.uid)
        os.setuid(iso.uid)
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # after setuid (which clears it): die with the worker
    os.chdir(jobdir)
    # environment, sys.std* and the socket patch were prepared by the worker before fork:
    # every page H writes costs a copy-on-write fault, so H does as little as possible
    out, err = sys.stdout, sys.stderr

    approx = job.get("comparison") == "approx"
    g: dict = {"__name__": "__main__", "__builtins__": builtins}
    if approx:
        g["__approx_eq"] = _approx_eq
    ok, reason = True, ""
    try:
        # program first: MBPP's test_setup_code (tasks 367, 927) builds trees from the program's class
        parts = [(job["program"], "<program>"), (job.get("setup") or "", "<setup>")]
        codes = [compile(src, name, "exec") for src, name in parts]
        codes += [_compile_test(t, f"<test {i}>", approx) for i, t in enumerate(job["tests"])]
        for code in codes:
            exec(code, g)
    except BaseException as e:  # SystemExit/KeyboardInterrupt included: they are failures too
        ok, reason = False, _reason(e)
    for stream in (out, err):
        try:
            stream.flush()
        except BaseException:
            pass
    try:
        data = f"\n{nonce} {os.getpid()} {int(ok)} {reason}\n".encode(errors="backslashreplace")
        while data:
            data = data[os.write(RESULT_FD, data) :]
    except BaseException:
        os._exit(EXIT_RESULT_CHANNEL)
    os._exit(0)  # no atexit, no waiting for non-daemon threads


def _descendants(root: int) -> list[int]:
    """PIDs below ``root`` from a /proc scan (fallback cleanup when there is no pid ns)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rfind(b")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(name))
    out, todo = [], [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _read_nonblocking(fd: int, cap: int) -> bytes:
    os.set_blocking(fd, False)
    chunks, total = [], 0
    while total < cap:
        try:
            b = os.read(fd, min(65536, cap - total))
        except BlockingIOError:
            break
        if not b:
            break
        chunks.append(b)
        total += len(b)
    return b"".join(chunks)


def _rmtree(path: str) -> None:
    def onerror(func, p, exc):  # a program may chmod its files 000; we may not be real root
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=onerror)


class Worker:
    def __init__(self, slot: int, uid_base: int) -> None:
        self.iso = Isolation(slot, uid_base)
        self.base = f"/tmp/ilf-sandbox-{os.getpid()}"
        os.makedirs(self.base, mode=0o711, exist_ok=True)
        os.chmod(self.base, 0o711)
        self.capture_path = os.path.join(self.base, "capture")
        self.n = 0
        # what every job's H inherits through fork (set up once here, not per job)
        os.environ.clear()
        os.environ.update({"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/", "TMPDIR": "/"})
        if not self.iso.netns:
            _no_network()
        self.stdio = (
            io.TextIOWrapper(io.BufferedWriter(_CappedFd(1)), encoding="utf-8", errors="backslashreplace"),
            io.TextIOWrapper(io.BufferedWriter(_CappedFd(2)), encoding="utf-8", errors="backslashreplace"),
            open(os.devnull),  # lives as long as the worker
        )

    def run(self, job: dict) -> dict:
        self.n += 1
        jobdir = os.path.join(self.base, f"job{self.n}")
        os.mkdir(jobdir, 0o700)
        if self.iso.uid is not None:
            os.chown(jobdir, self.iso.uid, self.iso.uid)
        capture = os.open(self.capture_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
        res_r, res_w = os.pipe()
        nonce = os.urandom(16).hex()
        timeout = float(job["timeout"])
        os.environ["HOME"] = os.environ["TMPDIR"] = jobdir
        _CappedFd.budget[0] = STDOUT_CAP
        t0 = time.perf_counter()
        if self.iso.pidns_fd is not None:
            _unshare(CLONE_NEWPID)  # only our *next* child (H) lands in the new namespace
        try:
            pid = os.fork()
            if pid == 0:
                try:
                    _program_main(job, self.iso, jobdir, nonce, capture, res_w)
                finally:
                    os._exit(EXIT_RESULT_CHANNEL)
        finally:
            if self.iso.pidns_fd is not None:
                _check(_libc.setns(self.iso.pidns_fd, CLONE_NEWPID), "setns")
        os.close(res_w)
        timed_out, hstatus = self._wait(pid, timeout)
        seconds = time.perf_counter() - t0
        if self.iso.pidns_fd is None:
            self._sweep()
        records = _read_nonblocking(res_r, 1 << 20).decode(errors="replace").splitlines()
        os.close(res_r)
        os.lseek(capture, 0, os.SEEK_SET)
        stdout = os.read(capture, STDOUT_CAP).decode(errors="replace")
        os.close(capture)
        _rmtree(jobdir)

        hpid = 1 if self.iso.pidns_fd is not None else pid
        record = None
        for line in records:
            f = line.split(" ", 3)
            if len(f) == 4 and f[0] == nonce and f[1] == str(hpid) and f[2] in ("0", "1"):
                record = {"ok": f[2] == "1", "reason": f[3]}
        if timed_out:
            result = "timed out"
        elif record is not None:
            result = "passed" if record["ok"] is True else f"failed: {record['reason']}"
        elif os.WIFSIGNALED(hstatus):
            sig = os.WTERMSIG(hstatus)
            if sig == signal.SIGXCPU:
                result = "timed out"
            else:
                try:
                    name = signal.Signals(sig).name
                except ValueError:
                    name = str(sig)
                result = f"failed: killed by signal {name}"
        else:
            code = os.WEXITSTATUS(hstatus)
            if code == EXIT_RESULT_CHANNEL:
                result = "failed: result channel closed or corrupted by the program"
            else:
                result = f"failed: exited with status {code} before the tests completed"
        return {"passed": result == "passed", "result": result, "stdout": stdout, "seconds": seconds}

    def _wait(self, pid: int, timeout: float) -> tuple[bool, int]:
        """Wait for H; on timeout SIGKILL it (which tears down its PID namespace). -> (timed out, status)"""
        deadline = time.monotonic() + timeout
        try:
            pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            pidfd = None
        in_time = True
        while True:
            wpid, status = os.waitpid(pid, os.WNOHANG)
            if wpid == pid:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                in_time = False
                for kill in (os.killpg, os.kill):
                    try:
                        kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
                status = os.waitpid(pid, 0)[1]
                break
            if pidfd is not None:
                select.select([pidfd], [], [], left)
            else:
                time.sleep(min(left, 0.002))
        if pidfd is not None:
            os.close(pidfd)
        return not in_time, status

    def _sweep(self) -> None:
        """Without a PID namespace: kill everything that is still below us (we are subreaper)."""
        for _ in range(100):
            procs = _descendants(os.getpid())
            if not procs:
                return
            for p in procs:
                try:
                    os.kill(p, signal.SIGKILL)
                except OSError:
                    pass
            while True:
                try:
                    if os.waitpid(-1, os.WNOHANG)[0] == 0:
                        break
                except ChildProcessError:
                    break
            time.sleep(0.001)


# imported once here so each job gets them for free through fork (MBPP's usual imports)
PRELOAD = (
    "re math cmath collections heapq itertools functools operator bisect copy string array "
    "datetime fractions decimal typing textwrap unicodedata struct"
).split()  # not random/threading/statistics: their at-fork hooks cost ~0.1-0.3 ms per job


def main() -> None:
    if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
        del sys.path[0]  # Python < 3.11 has no -P: keep our own directory off the import path
    for mod in PRELOAD:
        try:
            __import__(mod)
        except ImportError:
            pass
    cfg = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the harness decides when we stop
    out, inp = sys.stdout.buffer, sys.stdin.buffer
    try:
        worker = Worker(int(cfg.get("slot", 0)), int(cfg.get("uid_base", 62000)))
    except Exception as e:
        out.write((json.dumps({"ready": False, "error": repr(e)}) + "\n").encode())
        out.flush()
        raise SystemExit(1) from e
    # from here on the worker talks through ``out`` only; sys.std* become the jobs' streams
    sys.stdout, sys.stderr, sys.stdin = worker.stdio
    sys.argv = ["program"]
    sys.setrecursionlimit(1000)
    hello = {"ready": True, "layers": worker.iso.layers, "fallbacks": worker.iso.fallbacks}
    out.write((json.dumps(hello) + "\n").encode())
    out.flush()
    try:
        for line in inp:
            job = json.loads(line)
            try:
                res = worker.run(job)
            except Exception as e:  # a bug here must not lose the job: report it
                res = {
                    "passed": False,
                    "result": f"failed: sandbox error: {e!r}",
                    "stdout": "",
                    "seconds": 0.0,
                }
            res["id"] = job.get("id")
            out.write((json.dumps(res) + "\n").encode())
            out.flush()
    finally:
        _rmtree(worker.base)
        worker.iso.leave_cgroups()


if __name__ == "__main__":
    main()
