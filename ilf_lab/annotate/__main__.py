"""`python -m ilf_lab.annotate {export,serve,import}`: the human-feedback loop around a run's x0 samples.

User errors (missing file, malformed line) print one line naming file and line and exit 2; outputs are
written only after everything is read and checked, and atomically, so nothing is left half-written.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from pathlib import Path
from typing import Any

from ilf_lab.annotate.records import AnnotateError, csv_text, jsonl_text, write_output
from ilf_lab.errors import ArgumentParser, run_cli


def _tasks(data_dir: str | None, required: bool = True) -> dict[int, Any] | None:
    from omegaconf import OmegaConf

    from ilf_lab.data import load_mbpp

    d = data_dir or os.environ.get("ILF_LAB_DATA_DIR")
    if not d:
        if not required:
            return None
        raise AnnotateError(
            "no MBPP data: pass --data-dir (a dir with mbpp/mbpp.jsonl) or set ILF_LAB_DATA_DIR"
        )
    return load_mbpp(OmegaConf.create({"dir": d}))


def cmd_export(args: argparse.Namespace) -> None:
    """Items: one failing program per task from a run (or an x0 file), verdicts re-run in the sandbox."""
    from ilf_lab.annotate.export import build_items, find_x0_file, items_csv
    from ilf_lab.data import read_jsonl

    if bool(args.run) == bool(args.x0):
        raise AnnotateError("give exactly one of --run DIR or --x0 FILE")
    x0_path = find_x0_file(args.run) if args.run else Path(args.x0)
    if not x0_path.is_file():
        raise AnnotateError(f"missing x0 file: {x0_path}")
    splits = None
    if args.run and (Path(args.run) / "x0.jsonl").is_file():
        splits = {
            int(r["task_id"]): r.get("split") for r in read_jsonl(Path(args.run) / "x0.jsonl", ["task_id"])
        }
    tasks = _tasks(args.data_dir)
    items = build_items(x0_path, tasks, pick=args.pick, seed=args.seed, timeout=args.timeout, splits=splits)
    if not items:
        raise AnnotateError(f"{x0_path}: no failing programs to annotate")
    write_output(args.out, jsonl_text(items))
    if args.csv:
        write_output(args.csv, items_csv(items))
    print(f"{len(items)} items from {x0_path} -> {args.out}" + (f" and {args.csv}" if args.csv else ""))


def cmd_serve(args: argparse.Namespace) -> None:
    """The local web app; Ctrl-C stops it (every save is already on disk)."""
    from ilf_lab.annotate.server import make_server

    server = make_server(
        args.items,
        args.out,
        args.host,
        args.port,
        args.annotator or _default_annotator(),
        args.timeout,
        args.verbose,
    )
    summary = server.store.summary()
    print(f"annotating {summary['n']} items ({summary['done']} done) -> {args.out}")
    print(f"open {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("\nstopped; saved annotations are in", args.out)
    finally:
        server.server_close()


def _default_annotator() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no user name in this environment: the page asks
        return ""


def cmd_import(args: argparse.Namespace) -> None:
    """Validate and convert to the released schema (JSONL; --csv also writes the same records as CSV)."""
    from ilf_lab.annotate.convert import load_annotations, released_only
    from ilf_lab.annotate.records import RELEASED_KEYS

    tasks = _tasks(args.data_dir, required=False)
    records = released_only(load_annotations(args.inp, tasks=tasks, verify=args.verify, timeout=args.timeout))
    out = Path(args.out)
    text = csv_text(records, RELEASED_KEYS) if out.suffix.lower() == ".csv" else jsonl_text(records)
    extra = csv_text(records, RELEASED_KEYS) if args.csv else None
    write_output(out, text)
    if extra is not None:
        write_output(args.csv, extra)
    kept = sum(r["passed"] and r["refinement_edit_distance"] < 0.5 for r in records)
    print(
        f"{len(records)} annotations -> {out}; {kept} pass the paper's filters "
        "(refinement passes, edit distance < 0.5)"
    )


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m ilf_lab.annotate", description=__doc__.splitlines()[0],
        epilog="example: python -m ilf_lab.annotate export --run outputs/<run> --out items.jsonl\n"
        "         python -m ilf_lab.annotate serve --items items.jsonl --out annotations.jsonl --annotator me\n"
        "         python -m ilf_lab.annotate import --in annotations.jsonl --out mine.jsonl",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="cmd", required=True)

    e = sub.add_parser("export", help="items to annotate from a run's failing x0 samples")
    e.add_argument("--run", help="a run's output dir (with results.json / x0_samples.jsonl)")
    e.add_argument("--x0", help="an x0_samples.jsonl (or x0.jsonl) file")
    e.add_argument("--data-dir", help="dir with mbpp/mbpp.jsonl (default: $ILF_LAB_DATA_DIR)")
    e.add_argument("--out", required=True, help="items JSONL to write")
    e.add_argument("--csv", help="also write the items as a CSV sheet")
    e.add_argument("--pick", choices=("shortest", "random"), default="shortest")
    e.add_argument("--seed", type=int, default=0, help="for --pick random")
    e.add_argument("--timeout", type=float, default=10.0, help="sandbox seconds per program")
    e.set_defaults(fn=cmd_export)

    s = sub.add_parser("serve", help="the local annotation web app")
    s.add_argument("--items", required=True)
    s.add_argument("--out", required=True, help="annotations JSONL (released schema); resumed if it exists")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8765)
    s.add_argument("--annotator", default="", help="worker_id on each record (default: your user name)")
    s.add_argument("--timeout", type=float, default=10.0)
    s.add_argument("--verbose", action="store_true", help="log every request")
    s.set_defaults(fn=cmd_serve)

    i = sub.add_parser("import", help="annotations JSONL/CSV -> the released ILF schema (validated)")
    i.add_argument("--in", dest="inp", required=True, help="annotations .jsonl or .csv")
    i.add_argument("--out", required=True, help=".jsonl (or .csv) to write")
    i.add_argument("--csv", help="also write the records as CSV")
    i.add_argument(
        "--data-dir", help="MBPP tests for rows whose pass/fail is unknown (default: $ILF_LAB_DATA_DIR)"
    )
    i.add_argument("--verify", action="store_true", help="re-run every refinement's tests")
    i.add_argument("--timeout", type=float, default=10.0)
    i.set_defaults(fn=cmd_import)
    return p


def main(argv: list[str] | None = None) -> int:
    """Exit 0, or 2 with one line `error: <message>` for a user error (an `IlfError`, bad arguments included)."""

    def body() -> None:
        args = build_parser().parse_args(argv)
        args.fn(args)

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
