"""``python -m export.fp16 <model|all> [--probe] [--sweep]``: convert each trained, exported model's graphs to
FP16, measure them against the fp32 torch model, and write reports/fp16.{md,json}. Results merge into
reports/fp16.json model by model (a model's earlier probe or sweep is kept when this run did not redo it).

An unknown model, or one with no exported graph or checkpoint, is a one-line ``error:`` and a non-zero exit.
"""

from __future__ import annotations

from typing import Any

from export.cli_loop import MissingGraphError, exported_graphs, merge_results, model_parser, parse, run_models
from export.fp16.gate import fp16_gate
from export.fp16.probe import keep_list_sweep, probe_model
from export.fp16.report import write_report
from training import paths
from training.feeds import sample_feeds
from training.registry import get_spec

__all__ = ["MissingGraphError", "evaluate_model", "main"]


def evaluate_model(name: str, n: int = 1000, probe: bool = False, sweep: bool = False) -> dict[str, Any]:
    """The gate's measurement of one trained, exported model (not raising under the bar), plus the optional
    drift probe and keep-list sweep."""
    from training import load_trained

    spec = get_spec(name)
    graphs = exported_graphs(spec)
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
    p = model_parser("python -m export.fp16", __doc__, "test images per model (default 1000)")
    p.add_argument("--probe", action="store_true", help="find the nodes where fp16 overflows or drifts")
    p.add_argument("--sweep", action="store_true", help="measure candidate keep-lists")
    args, names = parse(p, argv)
    if names is None:
        return 2
    return run_models(names, lambda name: evaluate_model(name, args.images, args.probe, args.sweep),
                      lambda results: write_report(merge_results(paths.REPORTS_DIR / "fp16.json", results))[0],
                      debug=args.debug)


if __name__ == "__main__":
    raise SystemExit(main())
