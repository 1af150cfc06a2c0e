"""How the report writes text: number formats, markdown cells and CSV files.

Text from a results.json (model names, experiment names, overrides) reaches markdown and CSV: markdown cells are
escaped (`|`, `<`, `>`, line breaks), CSV cells that a spreadsheet would run as a formula get a leading `'`.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MISSING = "—"

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def fmt(mean: float | None, std: float | None, n: int) -> str:
    """`mean ± std` in % with one decimal; the mean alone for one run; MISSING for none."""
    if mean is None:
        return MISSING
    return f"{mean:.1f}" if std is None else f"{mean:.1f} ± {std:.1f}"


def paper_fmt(v: float | None) -> str:
    return MISSING if v is None else f"{v:.0f}"


def delta_fmt(delta: tuple[float, float, float] | None) -> str:
    if delta is None:
        return MISSING
    mean, lo, hi = delta
    return f"{mean:+.1f} [{lo:+.1f}, {hi:+.1f}]"


def mean_std_columns(col: str, stat: tuple[float | None, float | None, int]) -> dict[str, float | None]:
    """A (mean, std, count) as the CSV columns `{col}_mean`, `{col}_std`: rounded, None where missing."""
    mean, std, _ = stat
    return {f"{col}_{name}": None if v is None else round(v, 4) for name, v in (("mean", mean), ("std", std))}


def md_text(value: Any) -> str:
    """`value` as inline markdown that stays in its table cell and holds no HTML."""
    text = " ".join(str(value).splitlines())
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def md_row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(md_text(c) for c in cells) + " |"


def csv_cell(value: Any) -> Any:
    """A CSV value; text that a spreadsheet would read as a formula is prefixed with `'` (numbers are kept)."""
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def records_csv(recs: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """The records as CSV text: a header of `columns`, empty cells where a value is missing."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns))
    w.writeheader()
    for rec in recs:
        w.writerow({k: csv_cell(rec.get(k)) for k in columns})
    return buf.getvalue()


def write_file(path: str | os.PathLike, content: str | bytes) -> Path:
    """Write `content` (CSV text as is: its line ends are the csv module's) into `path`, creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        with open(path, "w", newline="") as f:
            f.write(content)
    return path
