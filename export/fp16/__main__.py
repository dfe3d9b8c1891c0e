"""``python -m export.fp16 <model|all> [--probe] [--sweep]``: convert each trained, exported model's graphs to
FP16, measure them against the fp32 torch model, and write reports/fp16.{md,json}.

An unknown model, or one with no exported graph or checkpoint, is a one-line ``error:`` and a non-zero exit.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from export.fp16.gate import fp16_gate, fp32_graph_paths
from export.fp16.probe import keep_list_sweep, probe_model
from export.fp16.report import write_report
from training.cli import model_names
from training.feeds import sample_feeds
from training.registry import get_spec


class MissingGraphError(FileNotFoundError):
    pass


def evaluate_model(name: str, n: int = 1000, probe: bool = False, sweep: bool = False) -> dict[str, Any]:
    """The gate's measurement of one trained, exported model (not raising under the bar), plus the optional
    drift probe and keep-list sweep."""
    from training import load_trained

    spec = get_spec(name)
    graphs = fp32_graph_paths(spec)
    missing = [str(p) for p in graphs.values() if not p.is_file()]
    if missing:
        raise MissingGraphError(f"no exported graph at {', '.join(missing)} (run `make export`)")
    model = load_trained(name)
    gate = fp16_gate(spec, model, graphs, n, raise_on_fail=False)
    result: dict[str, Any] = {"keep_fp32_ops": gate["keep_fp32_ops"], "fp16_graphs": gate["fp16_graphs"], "gate": gate}
    if probe or sweep:
        feeds = sample_feeds(spec, n, spec.train.canvas)
        if probe:
            result["probe"] = probe_model(spec, graphs, feeds)
        if sweep:
            result["sweep"] = keep_list_sweep(spec, model, graphs, feeds)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.fp16", description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="*", default=["all"], help="model names, or 'all' (default)")
    p.add_argument("-n", "--images", type=int, default=1000, help="test images per model (default 1000)")
    p.add_argument("--probe", action="store_true", help="find the nodes where fp16 overflows or drifts")
    p.add_argument("--sweep", action="store_true", help="measure candidate keep-lists")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    names = model_names(args.models)
    if names is None:
        return 2
    results, failed = {}, []
    for name in names:
        try:
            r = evaluate_model(name, args.images, args.probe, args.sweep)
        except Exception as exc:
            if args.debug:
                raise
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            print(f"error: model {name!r}: {message}", file=sys.stderr)
            failed.append(name)
            continue
        results[name] = r
        print(f"{name}: {r['gate']['status']}")
        if not r["gate"]["passed"]:
            failed.append(name)
    if results:
        md, _ = write_report(results)
        print(f"wrote {md}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
