"""What the per-model gate commands (``python -m export.fp16``, ``python -m export.int8``) share: their
arguments, the check that a model's graphs were exported, and the loop that measures one model after another.

The loop's contract: an unknown model is exit 2 (before anything runs); a model that cannot be measured
(no graph, no checkpoint, any error) is one ``error: model '<name>': <first line>`` on stderr and the loop
goes on; a measured model prints ``<name>: <its gate's status>``; the report is written from whatever was
measured; the exit is 1 when any model errored or missed its gate, else 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from training.cli import model_names
from training.registry import ModelSpec


class MissingGraphError(FileNotFoundError):
    pass


def exported_graphs(spec: ModelSpec) -> dict[str, Path]:
    """Graph name -> the exported fp32 graph of ``spec``; ``MissingGraphError`` when one is not there."""
    from export.fp16.gate import fp32_graph_paths

    graphs = fp32_graph_paths(spec)
    missing = [str(p) for p in graphs.values() if not p.is_file()]
    if missing:
        raise MissingGraphError(f"no exported graph at {', '.join(missing)} (run `make export`)")
    return graphs


def model_parser(prog: str, doc: str | None, images_help: str) -> argparse.ArgumentParser:
    """The models (``all`` by default) and ``-n/--images``; the command adds its own flags, then ``parse``."""
    p = argparse.ArgumentParser(prog=prog, description=(doc or "").split("\n\n")[0])
    p.add_argument("models", nargs="*", default=["all"], help="model names, or 'all' (default)")
    p.add_argument("-n", "--images", type=int, default=1000, help=images_help)
    return p


def parse(p: argparse.ArgumentParser, argv: list[str] | None) -> tuple[argparse.Namespace, list[str] | None]:
    """Adds ``--debug`` (last), parses, and resolves the model names (None: unknown model, already said)."""
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    return args, model_names(args.models)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def run_models(names: list[str], evaluate: Callable[[str], dict[str, Any]],
               write: Callable[[dict[str, dict[str, Any]]], Path], *, debug: bool = False,
               show: Callable[[str, dict[str, Any]], None] | None = None) -> int:
    """``evaluate`` each model (a dict with ``gate``: ``status``, ``passed``), ``show`` any further lines of
    its result, ``write`` the report of those measured (returns the path it prints); the exit status."""
    results: dict[str, dict[str, Any]] = {}
    failed: list[str] = []
    for name in names:
        try:
            r = evaluate(name)
        except Exception as exc:
            if debug:
                raise
            print(f"error: model {name!r}: {first_line(exc)}", file=sys.stderr)
            failed.append(name)
            continue
        results[name] = r
        print(f"{name}: {r['gate']['status']}")
        if show is not None:
            show(name, r)
        if not r["gate"]["passed"]:
            failed.append(name)
    if results:
        print(f"wrote {write(results)}")
    return 1 if failed else 0


def merge_results(path: Path, results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Merge this run's models into the report's json at ``path`` and return every model's entry: a model not
    run now keeps its earlier entry, and a run model keeps earlier keys this run did not redo (a probe, a
    bench), so models can be measured one command at a time."""
    old = json.loads(path.read_text()) if path.is_file() else {}
    for name, r in results.items():
        old[name] = old.get(name, {}) | r
    merged = dict(sorted(old.items()))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(merged, indent=2, default=float) + "\n")
    return merged
