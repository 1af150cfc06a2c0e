"""Errors the user can fix. The entry points print them as one line and exit non-zero (no traceback).

`run_cli` is that boundary for the argparse CLIs (execution, annotate): every `IlfError` (argparse's own usage
errors included, via `ArgumentParser`) becomes `error: <message>` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NoReturn

EXIT_USER_ERROR = 2


class IlfError(Exception):
    """Base: a message that names the problem (key, file, line)."""


class ConfigError(IlfError, ValueError):
    """A config value is out of range or not an allowed choice."""


class DataError(IlfError):
    """A missing or malformed data file."""


class UsageError(IlfError):
    """A command-line argument is missing or invalid."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are `UsageError`s, so they print like every other user error."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


def run_cli(main: Callable[[], int | None]) -> int:
    """Run a CLI body; an IlfError is one line `error: <message>` on stderr and exit status 2."""
    try:
        return main() or 0
    except IlfError as e:
        print("error: " + " ".join(str(e).splitlines()), file=sys.stderr)
        return EXIT_USER_ERROR


@contextmanager
def reraise_as(
    error: type[IlfError], what: str, catch: tuple[type[BaseException], ...] = (OSError,)
) -> Iterator[None]:
    """Turn an I/O failure while doing `what` (e.g. "cannot write out.jsonl") into `error` naming it."""
    try:
        yield
    except catch as e:
        reason = getattr(e, "strerror", None)
        if reason and getattr(e, "filename", None):
            reason += f" ({e.filename})"  # type: ignore[attr-defined]
        raise error(f"{what}: {reason or e}") from None
