"""The one exception type users see for bad input.

The CLI prints ``str(error)`` on one line and exits with status 2; the library raises it
from any check on user-supplied values (model, data, pattern, paths).
"""


class UsageError(ValueError):
    """Bad input: the message names the bad value and what would be valid."""


class CheckpointError(UsageError):
    """A checkpoint file is missing, truncated, inconsistent or of an unknown format version."""


def check_positive_int(flag: str, value: object, *, optional: bool = False) -> None:
    """Raise UsageError ``--flag must be a positive integer, got X`` unless ``value`` is an int >= 1
    (or None, with ``optional``). ``flag`` is the option's name with dashes, e.g. ``nsamples``."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"--{flag} must be a positive integer, got {value!r}")
