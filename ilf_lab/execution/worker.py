"""Sandbox worker server: runs untrusted programs, one forked process per job.

This file is executed as a *script* by a clean interpreter
(``python -S -s -P worker.py CONFIG`` with a minimal environment), never imported into a process that holds
torch or a model, so it must only use the standard library.  Forking this small
interpreter costs ~0.4 ms, against ~22 ms for forking the torch-holding caller.

Protocol (one JSON object per line): the parent writes jobs ``{"id", "program", "setup", "tests",
"timeout", "memory_mb"}`` (and, while a job runs, possibly ``{"stop": id}``); the worker answers
``{"id", "records": [...]}`` as the program's process reports values, then one ``{"id", "final": 1,
"status", ...}``.  The first line the worker writes is a hello record naming the isolation layers it got.

The worker never decides a verdict and never sees an expected value: ``tests`` are the parent's
rewritten tests (``verdict.py``), in which an assert's comparison and literal operands were replaced by
a call ``_ilf_emit_(k, lambda: <operand>, ...)``.  ``H`` evaluates those operands and writes their
values, in a code-free encoding, on its result channel (fd 3, a pipe; the program's stdout and stderr
go to a capture file).  The worker forwards the channel's lines to the parent verbatim; the parent
decodes them and decides.  Whatever the program writes there can only ever be *values*.

Process tree per job::

    worker (root or user-namespace root; own mount/net/ipc namespaces, pivot_root'ed into a tree with
      │     only the Python installation and /usr; child subreaper; dies with the harness)
      └─ H  one fork per job: pid 1 of a fresh PID namespace, new session, rlimits, no_new_privs,
            unprivileged uid (root) or no capabilities (user namespace), fresh temp cwd;
            exec()s program, setup and the rewritten tests

When ``H`` exits (normally, or SIGKILLed by the worker on timeout or on the parent's stop) the kernel
kills every process left in its PID namespace, so fork bombs, daemons and double-forked orphans cannot
outlive the job.  (One fork per job, not an extra "init" process: that would double the ~0.5 ms
fork+exit cost; the price is pid-1 signal semantics, i.e. the program cannot SIGKILL itself from inside.)
"""

from __future__ import annotations

import builtins
import ctypes
import errno
import fcntl
import io
import json
import math
import os
import platform
import resource
import select
import shutil
import signal
import sys
import time
from collections import OrderedDict, deque
from decimal import Decimal
from fractions import Fraction

CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_MOVE, MS_REC, MS_PRIVATE = 32, 4096, 8192, 16384, 1 << 18
MNT_DETACH = 2
PR_SET_PDEATHSIG = 1
PR_SET_SECUREBITS = 28
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
# noroot + no ambient raise, all locked: a user-namespace root that exec()s gains no capabilities
SECUREBITS_LOCKED_NOROOT = 0x01 | 0x02 | 0x40 | 0x80
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}.get(
    platform.machine()
)
# clone(flags, 0, 0, 0, 0) = fork() into a new PID namespace (s390x swaps the first two arguments: not used)
SYS_CLONE = {"x86_64": 56, "aarch64": 220, "riscv64": 220, "ppc64le": 120}.get(platform.machine())

STDOUT_CAP = 64 * 1024
CHANNEL_CAP = 16 * 1024 * 1024  # bytes of values one job may report
FSIZE_LIMIT = 8 * 1024 * 1024
NPROC_LIMIT = 64
NOFILE_LIMIT = 256
TMPFS_SIZE = "256m"
RESULT_FD = 3  # the result channel's fd number inside H
EXIT_RESULT_CHANNEL = 121  # H could not write to its channel
EMIT = "_ilf_emit_"  # = verdict.EMIT
FORWARD_DELAY = 0.02  # s before the worker starts forwarding a job's channel lines as they come
ENCODE_DEPTH = 100

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


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


def _clone_newpid() -> int:
    """fork() whose child is pid 1 of a new PID namespace, for a user-namespace worker (which may not
    setns() back to its original PID namespace, so cannot use the unshare-fork-setns sequence).

    A raw clone skips CPython's after-fork bookkeeping, which only matters for threads: the worker has none.
    """
    if SYS_CLONE is None:
        raise OSError(errno.ENOSYS, "no clone syscall number for this architecture")
    pid = _libc.syscall(ctypes.c_long(SYS_CLONE), ctypes.c_ulong(CLONE_NEWPID | signal.SIGCHLD), 0, 0, 0, 0)
    if pid < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"clone: {os.strerror(err)}")
    return pid


def _prctl(option: int, arg: int) -> int:
    return _libc.prctl(
        ctypes.c_int(option), ctypes.c_ulong(arg), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)
    )


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def _drop_capabilities() -> None:
    """For a user-namespace root: lock out root semantics, then clear every capability set."""
    _check(_prctl(PR_SET_SECUREBITS, SECUREBITS_LOCKED_NOROOT), "securebits")
    hdr = _CapHeader(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    data = (_CapData * 2)()
    _check(_libc.capset(ctypes.byref(hdr), ctypes.byref(data)), "capset")


# --------------------------------------------------------------------------- setup


class Isolation:
    """Which containment layers this worker obtained (reported to the parent).

    ``layers`` lists what is on; ``fallbacks`` one short line per layer that is off and why.
    """

    def __init__(self, slot: int, uid: int | None) -> None:
        self.layers: list[str] = []
        self.fallbacks: list[str] = []
        self.pidns_fd: int | None = None
        self.proc_fd: int | None = None
        self.netns = False
        self.userns = False
        self.uid: int | None = None
        self.cgroups: list[tuple[int, str]] = []  # (parent directory fd, our cgroup's name)
        real_root = os.geteuid() == 0
        # (no PR_SET_PDEATHSIG here: it fires when the *thread* that spawned us exits, and the
        # pool may restart workers from short-lived threads; we exit on stdin EOF instead)
        _prctl(PR_SET_CHILD_SUBREAPER, 1)  # orphans re-parent to us, not to init
        have_caps = real_root
        if not real_root:
            # unprivileged: a user namespace gives us CAP_SYS_ADMIN over new namespaces
            try:
                uid_, gid = os.geteuid(), os.getegid()
                _unshare(CLONE_NEWUSER)
                with open("/proc/self/setgroups", "w") as f:
                    f.write("deny")
                with open("/proc/self/uid_map", "w") as f:
                    f.write(f"0 {uid_} 1")
                with open("/proc/self/gid_map", "w") as f:
                    f.write(f"0 {gid} 1")
                have_caps = True
                self.userns = True
                self.layers.append("userns")
            except OSError as e:
                self.fallbacks.append(
                    f"user namespace ({e.strerror}): no pid/net/ipc/mount namespaces, the host is visible"
                )
        if have_caps:
            try:
                _unshare(CLONE_NEWNET)
                self.netns = True
                self.layers.append("netns")
            except OSError as e:
                self.fallbacks.append(f"net namespace ({e.strerror}): socket calls monkeypatched only")
            try:
                _unshare(CLONE_NEWIPC)
                self.layers.append("ipcns")
            except OSError as e:
                self.fallbacks.append(f"ipc namespace ({e.strerror})")
        if real_root:
            self._join_cgroups(f"ilf-sandbox-{os.getpid()}")
        else:
            self.fallbacks.append("cgroups (not root): no cpu share or pids cap beyond rlimits")
        self.pidns_clone = False  # new PID namespaces by clone() (user namespace) instead of unshare+setns
        if real_root:
            try:
                fd = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
                _unshare(CLONE_NEWPID)  # probe: only pid_for_children changes
                _check(_libc.setns(fd, CLONE_NEWPID), "setns")
                self.pidns_fd = fd
                self.layers.append("pidns")
            except OSError as e:
                self.fallbacks.append(f"pid namespace ({e.strerror}): process-group kill + /proc sweep")
        elif have_caps:
            try:
                pid = _clone_newpid()
                if pid == 0:
                    os._exit(0 if os.getpid() == 1 else 1)
                if os.waitpid(pid, 0)[1] != 0:
                    raise OSError(errno.EINVAL, "clone did not give a new PID namespace")
                self.pidns_clone = True
                self.layers.append("pidns")
            except OSError as e:
                self.fallbacks.append(f"pid namespace ({e.strerror}): process-group kill + /proc sweep")
        if self.pidns_fd is None and not self.pidns_clone:
            # the fallback sweep needs the host's /proc, which the private root hides
            self.proc_fd = os.open("/proc", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        if have_caps:
            try:
                self._private_root()
            except OSError as e:
                self.fallbacks.append(f"private root ({e.strerror}): the host's files and /proc are visible")
        if real_root:
            self.uid = uid
            if uid is not None:
                self.layers.append(f"uid {uid}")
            else:
                self.fallbacks.append("uid separation (no sandbox uid given)")
        elif self.userns:
            self.layers.append("no capabilities")
            self.fallbacks.append(
                "uid separation (not root): programs run as the caller's uid, inside its user namespace"
            )
        else:
            self.fallbacks.append("uid separation (not root): programs run as the caller's uid")
        self.layers += ["setsid", "rlimits", "no_new_privs", "subreaper"]

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
        except OSError as e:
            self.fallbacks.append(f"cgroups ({e.strerror})")
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
                self.cgroups.append((os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), name))
                self.layers.append(f"cgroup {ctrl}")
            except OSError as e:
                self.fallbacks.append(f"{ctrl} cgroup ({e.strerror})")
                try:
                    os.rmdir(d)
                except OSError:
                    pass

    def leave_cgroups(self) -> None:
        for pfd, name in self.cgroups:
            try:
                fd = os.open("cgroup.procs", os.O_WRONLY, dir_fd=pfd)
                try:
                    os.write(fd, str(os.getpid()).encode())
                finally:
                    os.close(fd)
                os.rmdir(name, dir_fd=pfd)
            except OSError:
                pass

    def _private_root(self) -> None:
        """A private mount namespace whose root holds only what a Python program needs.

        A fresh tmpfs becomes ``/``: ``/usr`` and ``/lib*`` (with the ``/bin`` style links) and the
        interpreter's installation (``sys.base_prefix``) bound read-only, nosuid; ``/etc/ld.so.cache``
        and ``/etc/localtime``; ``/dev`` with null/zero/full/random/urandom only; an empty ``/proc``;
        private tmpfs ``/tmp`` and ``/dev/shm``.  After pivot_root the old root is detached, so the
        repository, the virtualenv, the data directory, other processes' /proc entries, /sys, /run and
        home directories do not exist for the program.  (A fresh procfs per job would cost ~1 ms of
        mount-namespace setup and teardown per program; nothing in MBPP needs /proc.)
        """
        _unshare(CLONE_NEWNS)
        _mount("none", "/", None, MS_REC | MS_PRIVATE, None)
        old_umask = os.umask(0o022)
        try:
            self._build_root()
        finally:
            os.umask(old_umask)
            os.chdir("/")

    def _build_root(self) -> None:
        new = "/tmp"  # any directory will do as the mount point of the new root
        _mount("tmpfs", new, "tmpfs", MS_NOSUID | MS_NODEV, "size=4m,mode=0755")
        bound: list[str] = []

        def bind_ro(src: str, dst: str) -> None:
            _mount(src, dst, None, MS_BIND | MS_REC, None)
            try:
                _mount("none", dst, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, None)
            except OSError:  # some user-namespace setups lock other flags: read-only alone
                _mount("none", dst, None, MS_BIND | MS_REMOUNT | MS_RDONLY, None)

        for d in ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
            if os.path.islink(d):
                os.symlink(os.readlink(d), new + d)
            elif os.path.isdir(d):
                os.mkdir(new + d)
                bind_ro(d, new + d)
                bound.append(os.path.realpath(d))
        prefix = os.path.realpath(sys.base_prefix)
        if not any(prefix == b or prefix.startswith(b + "/") for b in bound):
            os.makedirs(new + prefix, mode=0o755)
            bind_ro(prefix, new + prefix)
        os.mkdir(new + "/etc")
        if os.path.isfile("/etc/ld.so.cache"):
            open(new + "/etc/ld.so.cache", "w").close()
            bind_ro("/etc/ld.so.cache", new + "/etc/ld.so.cache")
        if os.path.islink("/etc/localtime"):
            os.symlink(os.readlink("/etc/localtime"), new + "/etc/localtime")
        os.mkdir(new + "/dev")
        for name in ("null", "zero", "full", "random", "urandom"):
            if os.path.exists(f"/dev/{name}"):
                open(f"{new}/dev/{name}", "w").close()
                _mount(f"/dev/{name}", f"{new}/dev/{name}", None, MS_BIND, None)
        for d in ("/dev/shm", "/tmp", "/proc", "/.old"):
            os.mkdir(new + d)
        os.chdir(new)
        if SYS_PIVOT_ROOT is not None:
            _check(_libc.syscall(ctypes.c_long(SYS_PIVOT_ROOT), b".", b"./.old"), "pivot_root")
            os.chdir("/")
            _check(_libc.umount2(b"/.old", MNT_DETACH), "umount old root")
            os.rmdir("/.old")
            how = "pivot_root"
        else:  # unknown syscall number: move the tree over / and chroot (H has no capabilities)
            _mount(new, "/", None, MS_MOVE, None)
            os.chroot(".")
            os.chdir("/")
            how = "chroot"
        for d, size in (("/tmp", TMPFS_SIZE), ("/dev/shm", "64m")):
            _mount("tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, f"size={size},mode=1777")
        _mount("none", "/", None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, None)
        self.layers += ["mountns", f"{how}: host hidden (stdlib, /usr only)", "/proc hidden"]


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


def _reason(e: BaseException) -> str:
    if isinstance(e, MemoryError):
        return "exceeded memory limit"
    name = type(e).__name__
    try:
        msg = str(e)
    except BaseException:
        msg = ""
    msg = " ".join(msg.split())[:300]  # one line
    return f"{name}: {msg}" if msg else name


def encode(v, depth: int = 0):
    """A probe value in the channel's code-free encoding (decoded by ``verdict.decode_value``).

    Runs in H, i.e. under the program's control: it is a convenience for honest programs, not a
    security boundary (the parent accepts whatever arrives only as a value).
    """
    t = type(v)
    if v is None or t is bool or t is str or t is float:
        return v
    if t is int:
        return v if -(2**53) < v < 2**53 else ["I", format(v, "x")]
    if depth > ENCODE_DEPTH:
        raise ValueError("nested too deeply")
    d = depth + 1
    if t is list:
        return ["l", *[encode(x, d) for x in v]]
    if t is tuple:
        return ["t", *[encode(x, d) for x in v]]
    if t is dict:
        return ["d", *[[encode(k, d), encode(x, d)] for k, x in v.items()]]
    if t is set:
        return ["s", *[encode(x, d) for x in v]]
    if t is frozenset:
        return ["f", *[encode(x, d) for x in v]]
    if t is bytes:
        return ["b", v.hex()]
    if t is bytearray:
        return ["ba", v.hex()]
    if t is complex:
        return ["j", v.real, v.imag]
    if isinstance(v, int):  # IntEnum, ...: compared as the int it is
        return encode(int.__int__(v), depth)
    if isinstance(v, float):
        return float.__float__(v)
    if isinstance(v, str):
        return str.__str__(v)
    if isinstance(v, tuple):  # namedtuple
        return ["t", *[encode(x, d) for x in tuple.__iter__(v)]]
    if isinstance(v, list):
        return ["l", *[encode(x, d) for x in list.__iter__(v)]]
    if isinstance(v, OrderedDict):
        return ["od", *[[encode(k, d), encode(x, d)] for k, x in dict.items(v)]]
    if isinstance(v, dict):  # Counter, defaultdict: equal to the dict they hold
        return ["d", *[[encode(k, d), encode(x, d)] for k, x in dict.items(v)]]
    if isinstance(v, (set, frozenset)):
        return ["s" if isinstance(v, set) else "f", *[encode(x, d) for x in v]]
    if isinstance(v, deque):
        return ["q", *[encode(x, d) for x in v]]
    if isinstance(v, Decimal):
        return ["D", str(v)]
    if isinstance(v, Fraction):
        return ["F", format(v.numerator, "x"), format(v.denominator, "x")]
    if t is range:
        return ["r", v.start, v.stop, v.step]
    raise TypeError("not a data value")


def _opaque(v) -> list:
    try:
        truth = bool(v)
    except BaseException:
        truth = None
    try:
        name = type(v).__qualname__
    except BaseException:
        name = "object"
    return ["o", str(name)[:100], truth]


_DONE = b'["done"]\n'


def _send(obj) -> None:
    data = obj if type(obj) is bytes else (json.dumps(obj, separators=(",", ":")) + "\n").encode()
    try:
        while data:
            data = data[os.write(RESULT_FD, data) :]
    except OSError:
        os._exit(EXIT_RESULT_CHANNEL)


def _make_emit(t: int, streams: tuple):
    def emit(k, *probes):
        vals = []
        for p in probes:
            try:
                v = p()
            except BaseException as e:  # decided by the parent only if the assert needs this value
                vals.append(["x", _reason(e)])
                continue
            try:
                vals.append(encode(v))
            except (TypeError, ValueError, RecursionError, MemoryError):
                vals.append(_opaque(v))
        for stream in streams:  # the parent may stop the program at this report: keep what it printed
            try:
                stream.flush()
            except BaseException:
                pass
        _send([t, k, vals])

    return emit


def _program_main(job: dict, iso: Isolation, jobdir: str, capture_fd: int, res_w: int) -> None:
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
    elif iso.userns:
        _drop_capabilities()
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # after setuid (which clears it): die with the worker
    os.chdir(jobdir)
    # environment, sys.std* and the socket patch were prepared by the worker before fork:
    # every page H writes costs a copy-on-write fault, so H does as little as possible
    out, err = sys.stdout, sys.stderr

    g: dict = {"__name__": "__main__", "__builtins__": builtins}
    end: list | bytes = _DONE
    try:
        # program first: MBPP's test_setup_code (tasks 367, 927) builds trees from the program's class
        for src, name in ((job["program"], "<program>"), (job.get("setup") or "", "<setup>")):
            exec(compile(src, name, "exec"), g)
        for t, src in enumerate(job["tests"]):
            code = compile(src, f"<test {t}>", "exec")
            g[EMIT] = _make_emit(t, (out, err))
            exec(code, g)
    except BaseException as e:  # SystemExit/KeyboardInterrupt included: they are failures too
        end = ["error", _reason(e)]
    for stream in (out, err):
        try:
            stream.flush()
        except BaseException:
            pass
    _send(end)
    os._exit(0)  # no atexit, no waiting for non-daemon threads


def _descendants(root: int, proc_fd: int) -> list[int]:
    """PIDs below ``root`` from a /proc scan (fallback cleanup when there is no pid ns)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir(proc_fd):
        if not name.isdigit():
            continue
        try:
            fd = os.open(f"{name}/stat", os.O_RDONLY, dir_fd=proc_fd)
            try:
                stat = os.read(fd, 4096)
            finally:
                os.close(fd)
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


def _rmtree(path: str) -> None:
    def onerror(func, p, exc):  # a program may chmod its files 000; we may not be real root
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=onerror)


class _Lines:
    """Line reader on a raw fd (the parent's pipe), usable with select()."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = b""
        self.eof = False
        self.held: list[bytes] = []  # lines read while a job ran that were not for it

    def fill(self) -> None:
        data = os.read(self.fd, 1 << 20)
        if not data:
            self.eof = True
        self.buf += data

    def pop(self) -> bytes | None:
        if b"\n" not in self.buf:
            return None
        line, _, self.buf = self.buf.partition(b"\n")
        return line

    def next(self) -> bytes | None:
        if self.held:
            return self.held.pop(0)
        while True:
            line = self.pop()
            if line is not None or self.eof:
                return line
            self.fill()


class _Stop(Exception):
    pass


class Worker:
    def __init__(self, slot: int, uid: int | None) -> None:
        self.iso = Isolation(slot, uid)
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

    def run(self, job: dict, lines: _Lines, out) -> dict:
        self.n += 1
        jobdir = os.path.join(self.base, f"job{self.n}")
        os.mkdir(jobdir, 0o700)
        if self.iso.uid is not None:
            os.chown(jobdir, self.iso.uid, self.iso.uid)
        capture = os.open(self.capture_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
        res_r, res_w = os.pipe()
        timeout = float(job["timeout"])
        os.environ["HOME"] = os.environ["TMPDIR"] = jobdir
        _CappedFd.budget[0] = STDOUT_CAP
        t0 = time.perf_counter()
        if self.iso.pidns_fd is not None:
            _unshare(CLONE_NEWPID)  # only our *next* child (H) lands in the new namespace
        try:
            pid = _clone_newpid() if self.iso.pidns_clone else os.fork()
            if pid == 0:
                try:
                    _program_main(job, self.iso, jobdir, capture, res_w)
                finally:
                    os._exit(EXIT_RESULT_CHANNEL)
        finally:
            if self.iso.pidns_fd is not None:
                _check(_libc.setns(self.iso.pidns_fd, CLONE_NEWPID), "setns")
        os.close(res_w)
        chan = _Channel(res_r)
        state, hstatus = self._supervise(pid, timeout, job.get("id"), chan, lines, out)
        seconds = time.perf_counter() - t0
        if self.iso.pidns_fd is None and not self.iso.pidns_clone:
            self._sweep()
        if state != "overflow":
            chan.read(final=True)
        os.close(res_r)
        os.lseek(capture, 0, os.SEEK_SET)
        stdout = os.read(capture, STDOUT_CAP).decode(errors="replace")
        os.close(capture)
        _rmtree(jobdir)

        final: dict = {
            "id": job.get("id"),
            "final": 1,
            "records": chan.take(),
            "stdout": stdout,
            "seconds": seconds,
        }
        if state is not None:
            final["status"] = state
        elif os.WIFSIGNALED(hstatus):
            sig = os.WTERMSIG(hstatus)
            if sig == signal.SIGXCPU:
                final["status"] = "timeout"
            else:
                try:
                    name = signal.Signals(sig).name
                except ValueError:
                    name = str(sig)
                final.update(status="signal", signal=name)
        else:
            final.update(status="exit", code=os.WEXITSTATUS(hstatus))
        if lines.eof:
            raise _Stop
        return final

    def _supervise(self, pid: int, timeout: float, job_id, chan: _Channel, lines: _Lines, out):
        """Wait for H, forwarding its channel lines; SIGKILL it on timeout, overflow or the parent's stop.

        -> (None | "timeout" | "stopped" | "overflow", wait status)
        """
        deadline = time.monotonic() + timeout
        try:
            pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            pidfd = None
        state = None
        # The channel is only watched once the job has run FORWARD_DELAY: most jobs end before, and
        # their lines then travel in the final message (no extra wake-ups); a slow job's lines are
        # forwarded as they come, so the parent can stop it at its first failed assert.
        watch_at = time.monotonic() + FORWARD_DELAY
        while True:
            wpid, status = os.waitpid(pid, os.WNOHANG)
            if wpid == pid:
                break
            now = time.monotonic()
            left = deadline - now
            if left <= 0:
                state = "timeout"
            else:
                watch = chan.open and now >= watch_at
                fds = [lines.fd] + ([chan.fd] if watch else []) + ([pidfd] if pidfd is not None else [])
                wait = left if pidfd is not None else min(left, 0.002)
                if not watch and chan.open:
                    wait = min(wait, watch_at - now)
                ready = select.select(fds, [], [], max(wait, 0))[0]
                if watch and chan.fd in ready:
                    chan.read()
                    if chan.overflow:
                        state = "overflow"
                    elif chan.lines:
                        out.write((json.dumps({"id": job_id, "records": chan.take()}) + "\n").encode())
                        out.flush()
                if lines.fd in ready:
                    lines.fill()
                    while (line := lines.pop()) is not None:
                        try:
                            msg = json.loads(line)
                        except ValueError:
                            msg = None
                        if isinstance(msg, dict) and "stop" in msg:
                            if msg["stop"] == job_id:
                                state = "stopped"
                        else:
                            lines.held.append(line)
                    if lines.eof:  # the harness is gone
                        state = "stopped"
            if state is not None:
                for kill in (os.killpg, os.kill):
                    try:
                        kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
                status = os.waitpid(pid, 0)[1]
                break
        if pidfd is not None:
            os.close(pidfd)
        return state, status

    def _sweep(self) -> None:
        """Without a PID namespace: kill everything that is still below us (we are subreaper)."""
        for _ in range(100):
            procs = _descendants(os.getpid(), self.iso.proc_fd)  # type: ignore[arg-type]
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


class _Channel:
    """The read end of H's result pipe: complete lines, capped at CHANNEL_CAP bytes per job."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        os.set_blocking(fd, False)
        self.buf = b""
        self.total = 0
        self.open = True
        self.overflow = False
        self.lines: list[str] = []

    def read(self, final: bool = False) -> None:
        while self.open and not self.overflow:
            try:
                b = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                break
            if not b:
                self.open = False
                break
            self.total += len(b)
            if self.total > CHANNEL_CAP:
                self.overflow = True
                self.buf = b""
                break
            self.buf += b
            if b"\n" in b:
                *done, self.buf = self.buf.split(b"\n")
                self.lines += [x.decode(errors="replace") for x in done]
        if final and self.buf:  # a last line without its newline: the parent judges it as it is
            self.lines.append(self.buf.decode(errors="replace"))
            self.buf = b""

    def take(self) -> list[str]:
        out, self.lines = self.lines, []
        return out


def _no_network() -> None:
    """Fallback when no net namespace is available: make socket creation fail."""
    import socket

    def refuse(*a, **k):
        raise OSError(errno.EACCES, "network disabled in sandbox")

    socket.socket.connect = refuse  # type: ignore[method-assign]
    socket.socket.connect_ex = refuse  # type: ignore[method-assign]
    socket.socket.bind = refuse  # type: ignore[method-assign]
    socket.create_connection = refuse  # type: ignore[assignment]


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
    # compile() initialises CPython's AST types on first use (~1 ms): do it once here, not in every job
    compile("pass", "<warm-up>", "exec")
    json.dumps([0, 0, [1, 1.5, "a", None, True, ["l"]]], separators=(",", ":"))
    cfg = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the harness decides when we stop
    out = sys.stdout.buffer
    lines = _Lines(sys.stdin.fileno())
    try:
        uid = cfg.get("uid")
        worker = Worker(int(cfg.get("slot", 0)), None if uid is None else int(uid))
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
        while (line := lines.next()) is not None:
            job = json.loads(line)
            if "stop" in job:  # for a job that already ended
                continue
            try:
                res = worker.run(job, lines, out)
            except _Stop:
                break
            except Exception as e:  # a bug here must not lose the job: report it
                res = {"id": job.get("id"), "final": 1, "status": "error", "error": repr(e), "records": []}
            out.write((json.dumps(res) + "\n").encode())
            out.flush()
    finally:
        _rmtree(worker.base)
        worker.iso.leave_cgroups()


if __name__ == "__main__":
    main()
