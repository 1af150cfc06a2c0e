"""CLI: ``python -m ilf_lab.execution --input IN.jsonl --output OUT.jsonl``.

Every input line is validated before anything runs, so a malformed file costs nothing
and leaves no partial output; the output is written atomically (temp file + rename).
User errors (a malformed line, a missing file, a bad argument) are one line `error: ...` and exit 2.
"""

from __future__ import annotations

import json
import math
import os
import sys

from ilf_lab.errors import ArgumentParser, DataError, UsageError, reraise_as, run_cli
from ilf_lab.io import atomic_write_text


class InputError(DataError):
    """A missing, unreadable or malformed input file; the message names the line."""


def _load(path: str) -> list[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise InputError(f"input file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read {path}: {e}") from None
    rows = []
    name = os.path.basename(path)
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{name} line {no}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: invalid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise InputError(f"{where}: expected a JSON object")
        for key in ("task_id", "program", "tests"):
            if key not in obj:
                raise InputError(f"{where}: missing key '{key}'")
        if not isinstance(obj["program"], str):
            raise InputError(f"{where}: 'program' must be a string")
        if not isinstance(obj["tests"], list) or not all(isinstance(t, str) for t in obj["tests"]):
            raise InputError(f"{where}: 'tests' must be a list of strings")
        if "setup" in obj and obj["setup"] is not None and not isinstance(obj["setup"], str):
            raise InputError(f"{where}: 'setup' must be a string")
        rows.append(obj)
    return rows


def main(argv: list[str] | None = None) -> int:
    return run_cli(lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    p = ArgumentParser(prog="python -m ilf_lab.execution", description=__doc__.splitlines()[0])
    p.add_argument("--input", required=True, help="JSONL: task_id, program, tests[, setup]")
    p.add_argument("--output", required=True, help="JSONL: the input objects plus passed and result")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per program (default 10)")
    p.add_argument("--workers", type=int, default=None, help="parallel sandboxes (default: CPU count)")
    p.add_argument("--comparison", choices=("exact", "approx"), default="exact")
    p.add_argument(
        "--memory-mb", type=int, default=4096, help="address-space limit per program (default 4096)"
    )
    p.add_argument("--progress", action="store_true", help="tqdm progress bar on stderr")
    args = p.parse_args(argv)
    _check_args(args)
    rows = _load(args.input)

    from ilf_lab.execution.sandbox import run_programs, worker_count

    workers, note = worker_count(args.workers, len(rows))
    if note:
        print(f"note: {note}", file=sys.stderr)
    verdicts = run_programs(
        rows,
        timeout=args.timeout,
        workers=workers,
        comparison=args.comparison,
        memory_mb=args.memory_mb,
        progress=args.progress,
    )
    out = [{**row, "passed": v.passed, "result": v.result} for row, v in zip(rows, verdicts, strict=True)]
    with reraise_as(DataError, f"cannot write {args.output}"):
        atomic_write_text(args.output, "".join(json.dumps(row) + "\n" for row in out))
    n_pass = sum(v.passed for v in verdicts)
    partial = sum(v.passed and v.trust != "sealed" for v in verdicts)
    tail = (
        f" ({partial} of them rest on test code that ran inside the program's process: see docs/sandbox.md)"
        if partial
        else ""
    )
    print(f"{n_pass}/{len(verdicts)} passed{tail}", file=sys.stderr)
    return 0


def _check_args(args) -> None:
    """Out-of-range numbers are usage errors, caught before the input is read or anything runs."""
    from ilf_lab.execution.sandbox import MIN_MEMORY_MB

    if not math.isfinite(args.timeout) or args.timeout <= 0:
        raise UsageError(f"--timeout must be > 0 and finite (seconds), got {args.timeout:g}")
    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    if args.memory_mb < MIN_MEMORY_MB:
        raise UsageError(f"--memory-mb must be >= {MIN_MEMORY_MB}, got {args.memory_mb}")


if __name__ == "__main__":
    sys.exit(main())
