"""Sandbox + pass@k tests: a corpus of hostile programs must be contained with the right verdict."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
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
