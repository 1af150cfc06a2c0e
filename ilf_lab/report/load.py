"""Finding and reading the results.json files a report is made of (each one a `Results`, checked on reading)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from ilf_lab.errors import IlfError
from ilf_lab.results import Results


class ReportError(IlfError):
    """A problem with the inputs; the CLI prints it as one line and exits 2."""


def collect(dirs: Iterable[str | os.PathLike]) -> list[Results]:
    """Every results.json under `dirs` (recursively; a results.json path is taken as is), read and checked.

    Each `Results` has its file in `path`. Raises `ResultsError` naming the file and the field for a malformed
    one, and `ReportError` for a missing dir and when nothing is found at all.
    """
    dirs = [Path(d) for d in dirs]
    paths: list[Path] = []
    for d in dirs:
        if d.is_file():
            paths.append(d)
        elif d.is_dir():
            paths.extend(sorted(d.rglob("results.json")))
        else:
            raise ReportError(f"{d}: no such file or directory")
    seen: set[Path] = set()
    results = []
    for p in paths:
        rp = p.resolve()
        if rp in seen:
            continue
        seen.add(rp)
        results.append(Results.load(p))
    if not results:
        raise ReportError(f"no results.json found under {', '.join(str(d) for d in dirs)}")
    return results


def collect_or_published(dirs: Iterable[str | os.PathLike], published: str | os.PathLike) -> tuple[list[Results], str]:
    """The results under `dirs`, or, when there are none (a fresh clone), the published runs committed under
    `published` (results/); with a sentence saying which the caller shows."""
    dirs = [Path(d) for d in dirs]
    local = [d for d in dirs if d.exists()]
    try:
        if local:
            found = collect(local)
            return found, f"{len(found)} local runs under {', '.join(map(str, local))}"
    except ReportError:
        pass
    found = collect([published])
    return found, (f"no local runs under {', '.join(map(str, dirs))}: showing the {len(found)} published runs "
                   f"committed under {published}")
