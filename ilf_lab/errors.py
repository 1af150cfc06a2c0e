"""Errors the user can fix. The entry points print them as one line and exit non-zero (no traceback)."""


class IlfError(Exception):
    """Base: a message that names the problem (key, file, line)."""


class ConfigError(IlfError, ValueError):
    """A config value is out of range or not an allowed choice."""


class DataError(IlfError):
    """A missing or malformed data file."""
