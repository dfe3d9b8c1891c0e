"""What the benchmarks share: example inputs, a closed loop of client threads, and the served benchmarks'
arguments."""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from export.timing import percentiles


def example_inputs(spec, batch: int = 1) -> dict[str, np.ndarray]:
    """Real test images for image inputs (at the trained canvas), generated values for anything else."""
    from training.feeds import sample_feeds

    return sample_feeds(spec, batch, spec.train.canvas)


def _stats(lat_s: list[float], elapsed: float) -> tuple[float, float, float, float]:
    p = percentiles([t * 1e3 for t in lat_s])
    return p["p50"], p["p95"], p["p99"], len(lat_s) / elapsed


def measure_callable(fn: Callable[[], Any], concurrency: int, duration: float, warmup: int = 5
                     ) -> tuple[float, float, float, float, int]:
    """``concurrency`` threads call ``fn`` back to back for ``duration`` s: (p50, p95, p99 ms, req/s, n)."""
    for _ in range(warmup):
        fn()
    lats: list[list[float]] = [[] for _ in range(concurrency)]
    start = time.perf_counter()
    stop_at = start + duration

    def worker(k: int) -> None:
        while True:
            t0 = time.perf_counter()
            if t0 >= stop_at:
                return
            fn()
            lats[k].append(time.perf_counter() - t0)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    flat = [x for lat in lats for x in lat]
    return (*_stats(flat, elapsed), len(flat))


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
