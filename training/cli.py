"""What every ``python -m ...`` command does with its model arguments (torch-free)."""

from __future__ import annotations

import sys

from training.registry import UnknownModelError, resolve_names


def model_names(args: list[str] | tuple[str, ...]) -> list[str] | None:
    """Registered names for a command's arguments (``all`` or none: every model). An unknown name prints one
    line naming the known models and gives None: the command then returns exit status 2."""
    try:
        return resolve_names(args)
    except UnknownModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return None
