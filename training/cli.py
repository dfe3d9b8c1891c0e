"""What every ``python -m ...`` command does with its model arguments (torch-free)."""

from __future__ import annotations

import sys

from training.registry import UnknownModelError, resolve_names


def model_names(args: list[str] | tuple[str, ...]) -> list[str]:
    """Registered names for a command's arguments (``all`` or none: every model); an unknown name prints one
    line naming the known models and exits with status 2."""
    try:
        return resolve_names(args)
    except UnknownModelError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
