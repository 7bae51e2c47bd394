"""User-facing errors.

Anything a user can fix (a wrong flag, a missing file, an unreachable hub) is raised as
``ImpruneError`` with a one-line message that names the problem and the fix. The CLI turns it into
that line on stderr and exit code 2; library callers can catch it like any exception.
"""

from __future__ import annotations


class ImpruneError(Exception):
    """A problem the user can fix; ``str(err)`` is one line that says how."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))  # always one line
