"""What every serving command does with an error it cannot handle (no torch import: the client stays light)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def cli_error(exc: BaseException, debug: bool) -> int:
    """Print the one-line ``error: ...`` users see and return exit status 1; with --debug, re-raise
    so that the traceback shows."""
    if debug:
        raise exc
    print(f"error: {exc}", file=sys.stderr)
    return 1


def bench_parser(prog: str, doc: str | None, duration_help: str, rounds: int,
                 rounds_help: str) -> argparse.ArgumentParser:
    """The served benchmarks' arguments: models (``all`` by default), ``--duration``, ``--rounds`` and ``--repo``; the
    command adds its own, then ``export.cli_loop.parse`` adds ``--debug`` and resolves the model names."""
    p = argparse.ArgumentParser(prog=prog, description=(doc or "").split("\n\n")[0])
    p.add_argument("models", nargs="*", default=["all"], help="model names, or 'all' (default)")
    p.add_argument("--duration", type=float, default=4.0, help=duration_help)
    p.add_argument("--rounds", type=int, default=rounds, help=rounds_help)
    p.add_argument("--repo", type=Path, default=None, help="the exported model repository (default: model_repository/)")
    return p

