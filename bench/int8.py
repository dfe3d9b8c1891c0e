"""int8 vs fp32 onnxruntime, in one run: batch 1 and 32, p50/p95/p99, and the price of what stayed float.

Three deployables per model, timed interleaved: the fp32 graphs, the int8 graphs (the model's recorded choice
and keep-list; rebuilt from that choice where the variant missed its gate and was not shipped), and the same
int8 graphs with nothing kept float. Where int8 falls short of ``TARGET`` at batch 32, the int8 graph's
onnxruntime op profile says where the time goes. Results merge into reports/int8.json as each model's ``bench``
and reports/int8.md is rendered again (run ``python -m export.int8`` first: the gate's entry is needed).

    python -m bench.int8 [MODEL ... | all] [--rounds 50] [--debug]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.profile import ort_op_profile, top
from export.fp16.gate import graph_paths_of
from export.int8.choices import Int8Choice
from export.int8.gate import build_int8_graphs
from export.int8.report import TARGET
from export.parity import deployed_runner
from export.timing import THREADS, batch_of, interleaved
from training.feeds import sample_feeds
from training.registry import ModelSpec

BATCHES = (1, 32)


def bench_model(spec: ModelSpec, fp32: dict[str, Path] | Path, int8: dict[str, Path], choice: Int8Choice,
                rounds: int = 50) -> dict[str, Any]:
    fp32 = graph_paths_of(spec, fp32)
    feeds = sample_feeds(spec, max(BATCHES), spec.train.canvas)
    kept = sum(len(v) for v in choice.keep_fp32_nodes.values()) + len(choice.keep_fp32_ops)
    with tempfile.TemporaryDirectory() as tmp:
        runners = {"fp32": deployed_runner(spec, fp32, threads=THREADS),
                   "int8": deployed_runner(spec, int8, threads=THREADS)}
        if kept:
            bare = Int8Choice(calibration=choice.calibration, calibration_images=choice.calibration_images)
            runners["int8_nothing_kept"] = deployed_runner(spec, build_int8_graphs(spec, fp32, bare, Path(tmp)),
                                                           threads=THREADS)
        rows = {}
        for b in BATCHES:
            stats = interleaved(runners, batch_of(feeds, b), rounds)
            rows[str(b)] = {"latency": stats,
                            "speedup": stats["fp32"]["p50"] / stats["int8"]["p50"],
                            "speedup_nothing_kept": (stats["fp32"]["p50"] / stats["int8_nothing_kept"]["p50"]
                                                     if kept else None)}
    result: dict[str, Any] = {"threads": THREADS, "rounds": rounds, "batches": rows}
    b = str(max(BATCHES))
    if rows[b]["speedup"] < TARGET and len(int8) == 1:
        x = batch_of(feeds, max(BATCHES))
        result["profile"] = {"int8": top(ort_op_profile(next(iter(int8.values())), x, threads=THREADS), 8),
                             "fp32": top(ort_op_profile(next(iter(fp32.values())), x, threads=THREADS), 8)}
    return result


def int8_graphs(spec: ModelSpec, fp32: dict[str, Path], choice: Int8Choice, tmp: Path) -> dict[str, Path]:
    """The shipped int8 graphs, or (a variant that missed its gate is removed after the gate) the same graphs
    built again from the recorded choice into ``tmp``: the report says what it would have cost."""
    from export.variants import variant_graphs

    return variant_graphs(spec).get("int8") or build_int8_graphs(spec, fp32, choice, tmp)


def main(argv: list[str] | None = None) -> int:
    from export.cli_loop import exported_graphs, first_line, merge_results, parse
    from export.int8.__main__ import REPORT_JSON
    from export.int8.choices import choice_for
    from export.int8.report import write_report
    from training import paths
    from training.registry import get_spec

    p = argparse.ArgumentParser(prog="python -m bench.int8", description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="*", default=["all"], help="model names, or 'all' (default)")
    p.add_argument("--rounds", type=int, default=50, help="interleaved rounds per batch size")
    args, names = parse(p, argv)
    if names is None:
        return 2
    path = paths.REPORTS_DIR / REPORT_JSON
    gated = json.loads(path.read_text()) if path.is_file() else {}
    results, failed = {}, 0
    for name in names:
        try:
            if "gate" not in gated.get(name, {}):
                raise LookupError(f"no int8 gate recorded in {path} (run `python -m export.int8 {name}`)")
            spec = get_spec(name)
            fp32, choice = exported_graphs(spec), choice_for(name)
            with tempfile.TemporaryDirectory() as tmp:
                r = bench_model(spec, fp32, int8_graphs(spec, fp32, choice, Path(tmp)), choice, args.rounds)
        except Exception as e:
            if args.debug:
                raise
            print(f"error: model {name!r}: {first_line(e)}", file=sys.stderr)
            failed += 1
            continue
        results[name] = {"bench": r}
        b = r["batches"]
        print(f"{name}: int8 vs fp32 onnxruntime: batch 1 {b['1']['speedup']:.2f}x, batch 32 {b['32']['speedup']:.2f}x")
    if results:
        print(f"wrote {write_report(merge_results(path, results))}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
