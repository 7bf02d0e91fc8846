"""The one exception type users see for bad input.

The CLI prints ``str(error)`` on one line and exits with status 2; the library raises it
from any check on user-supplied values (model, data, pattern, paths).
"""


class UsageError(ValueError):
    """Bad input: the message names the bad value and what would be valid."""
