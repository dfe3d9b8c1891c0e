"""What every serving command does with an error it cannot handle (no torch import: the client stays light)."""

from __future__ import annotations

import sys


def cli_error(exc: BaseException, debug: bool) -> int:
    """Print the one-line ``error: ...`` users see and return exit status 1; with --debug, re-raise
    so that the traceback shows."""
    if debug:
        raise exc
    print(f"error: {exc}", file=sys.stderr)
    return 1
