"""``python -m export.int8 <model|all> [--probe] [--tensorrt]``: quantize each exported model's graphs
to QDQ int8 with its recorded choice, gate them on the test split against the fp32 torch model, and write
reports/int8.{md,json}.

``--probe`` first measures the choice on held-out training images (calibration method, nodes kept float) and
records it in export/int8/choices.json; ``--tensorrt`` parses and builds the TensorRT flavour ahead of time.
Results merge into reports/int8.json model by model, so models can be run one command at a time
(``python -m bench.int8`` adds the int8 vs fp32 timings the same way). A gate miss is an ``error:`` line naming
the model and a non-zero exit.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from typing import Any

from training import paths

REPORT_JSON = "int8.json"


def evaluate_model(name: str, n: int = 1000, probe: bool = False, nodes: bool = True,
                   tensorrt: bool = False) -> dict[str, Any]:
    from export.cli_loop import exported_graphs
    from export.int8.choices import Int8Choice, choice_for, save_choice
    from export.int8.engines import build_int8_engines
    from export.int8.gate import int8_gate, remove_int8_graphs
    from export.int8.probe import probe_model
    from training import load_trained
    from training.registry import get_spec

    spec = get_spec(name)
    fp32 = exported_graphs(spec)
    result: dict[str, Any] = {}
    if probe:
        result["probe"] = probe_model(spec, fp32, nodes=nodes)
        save_choice(name, Int8Choice.from_dict(result["probe"]["choice"]))
    choice = choice_for(name)
    gate = int8_gate(spec, load_trained(name), fp32, n, choice=choice, raise_on_fail=False)
    # The gate's verdict decides whether the variant ships (the export then neither builds nor serves it).
    verdict = replace(choice, ship=gate["passed"], not_shipped="" if gate["passed"] else
                      f"missed its test-split gate: {'; '.join(f.split(': ', 1)[-1] for f in gate['failures'][:2])}")
    if verdict != choice:
        save_choice(name, verdict)
    result |= {"choice": verdict.as_dict(), "gate": gate}
    # A variant that missed its gate is still built (the report says what it would have cost), and only then
    # removed, so that it is never served (bench.int8 times it from the recorded choice).
    if tensorrt:
        result["tensorrt"] = build_int8_engines(spec, fp32, choice)
    if not verdict.ship:
        remove_int8_graphs(spec)
    return result


def _show(name: str, r: dict[str, Any]) -> None:
    if not r["gate"]["passed"]:
        print(f"error: model {name!r}: {'; '.join(r['gate']['failures'][:2])} (recorded: not shipped)",
              file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    from export.cli_loop import merge_results, model_parser, parse, run_models

    p = model_parser("python -m export.int8", __doc__, "test images per model for the gate (default 1000)")
    p.add_argument("--probe", action="store_true", help="measure and record the calibration method and keep-list")
    p.add_argument("--no-nodes", action="store_true", help="with --probe: compare calibrations only")
    p.add_argument("--tensorrt", action="store_true", help="parse and build the TensorRT-RTX int8 engines")
    args, names = parse(p, argv)
    if names is None:
        return 2
    from export.int8.report import write_report

    return run_models(
        names, lambda name: evaluate_model(name, args.images, args.probe, not args.no_nodes, args.tensorrt),
        lambda results: write_report(merge_results(paths.REPORTS_DIR / REPORT_JSON, results)),
        debug=args.debug, show=_show)


if __name__ == "__main__":
    raise SystemExit(main())
