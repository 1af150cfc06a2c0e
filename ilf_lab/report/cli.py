"""`python -m ilf_lab.report DIR... [--out DIR]` (architecture contract 4).

Reads and checks every input before it writes anything: a malformed results.json is one `error: ...` line on
stderr, exit 2, and no file written.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from ilf_lab.errors import reraise_as, run_cli
from ilf_lab.report.compare import COMPARE_CSV_COLUMNS, comparison_records, comparisons, comparisons_markdown
from ilf_lab.report.figures import plot, plot_feedback_scaling, plot_refinements, png
from ilf_lab.report.load import ReportError, collect
from ilf_lab.report.output import records_csv, write_file
from ilf_lab.report.refinements import (
    REFINE_CSV_COLUMNS,
    refinement_records,
    refinement_rows,
    refinements_markdown,
)
from ilf_lab.report.selection import best_overrides
from ilf_lab.report.series import feedback_scaling
from ilf_lab.report.table4 import CSV_COLUMNS, Row, table, to_markdown, to_records


def build(dirs: Sequence[str | os.PathLike]) -> tuple[str, list[Row], dict[str, str | bytes]]:
    """The report in memory: its markdown, its Table 4 rows, and {file name: content} of the files beside it
    (table.csv/.png; comparisons.csv: the paired Δs and their power; refinements.csv/.png for Tables 2-3;
    feedback_scaling.png for Figure 4)."""
    results = collect(dirs)
    rows = table(results)
    ref_rows = refinement_rows(results)
    md: list[str] = []
    files: dict[str, str | bytes] = {}
    if rows:
        files |= {"table.csv": records_csv(to_records(rows), CSV_COLUMNS), "table.png": png(plot(rows))}
        md.append(to_markdown(rows))
        if comps := comparisons(rows):
            files["comparisons.csv"] = records_csv(comparison_records(comps), COMPARE_CSV_COLUMNS)
            md.append(comparisons_markdown(comps))
    if ref_rows:
        files["refinements.csv"] = records_csv(refinement_records(ref_rows), REFINE_CSV_COLUMNS)
        files["refinements.png"] = png(plot_refinements(ref_rows))
        md.append(refinements_markdown(ref_rows))
    if feedback_scaling(results):
        files["feedback_scaling.png"] = png(plot_feedback_scaling(results))
    return "\n".join(md), rows, files


def report(dirs: Sequence[str | os.PathLike], out: str | os.PathLike | None = None) -> tuple[str, list[Row]]:
    """Collect, tabulate, write table.csv + table.png (and refinements.csv/.png for Tables 2-3) into `out`
    (default: the first dir); return the markdown. Only analysis runs (stop_after) give no Table 4 files."""
    md, rows, _ = _report(dirs, out)
    return md, rows


def _report(
    dirs: Sequence[str | os.PathLike], out: str | os.PathLike | None
) -> tuple[str, list[Row], list[Path]]:
    md, rows, files = build(dirs)  # every input is read and checked before anything is written
    out_dir = Path(out) if out is not None else Path(dirs[0])
    if out_dir.is_file():
        out_dir = out_dir.parent
    with reraise_as(ReportError, f"cannot write the report into {out_dir}"):
        written = [write_file(out_dir / name, content) for name, content in files.items()]
    return md, rows, written


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m ilf_lab.report",
        description="Print the paper's Table 4 from every results.json under DIR...; write table.csv/table.png.",
        epilog="examples: python -m ilf_lab.report multirun/paper_table/2026-12-01_10-00-00\n"
        "          python -m ilf_lab.report results/demo_protocol --out /tmp/report",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("dirs", nargs="+", metavar="DIR", help="result folders (searched recursively)")
    ap.add_argument("--out", default=None, help="where table.csv and table.png go (default: the first DIR)")
    ap.add_argument(
        "--best-overrides",
        action="store_true",
        help="print only the policy.* overrides of the best MBPPRefine point (eval.split=refine) of an hparams sweep",
    )
    args = ap.parse_args(argv)
    return run_cli(lambda: _main(args))  # an IlfError (ReportError, ResultsError): `error: ...`, exit 2


def _main(args: argparse.Namespace) -> int:
    if args.best_overrides:
        best, result = best_overrides(collect(args.dirs))
        if result is None:
            raise ReportError("no result evaluated with eval.split=refine (run sweeps/hparams.sh)")
        print(f"best: pass@1={result.metric('pass@1')} on MBPPRefine ({result.path})", file=sys.stderr)
        print(" ".join(best))
        return 0
    md, _, written = _report(args.dirs, args.out)
    sys.stdout.write(md)
    print(f"wrote {', '.join(map(str, written))}", file=sys.stderr)
    return 0
