"""int8 vs fp32 onnxruntime, in one run: batch 1 and 32, p50/p95/p99, and the price of what stayed float.

Three deployables per model, timed interleaved: the fp32 graphs, the shipped int8 graphs (the model's
keep-list), and the same int8 graphs with nothing kept float. Where int8 falls short of ``TARGET`` at batch 32,
the int8 graph's onnxruntime op profile says where the time goes.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from export.fp16.gate import graph_paths_of
from export.int8.choices import Int8Choice
from export.int8.gate import build_int8_graphs
from export.int8.speed import THREADS, batch_of
from export.parity import deployed_runner
from export.profile import ort_op_profile, top
from export.timing import interleaved
from training.feeds import sample_feeds
from training.registry import ModelSpec

TARGET = 2.0
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
