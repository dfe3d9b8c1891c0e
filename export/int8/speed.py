"""Side-by-side latency: runners timed in one run, interleaved per round, so that load spikes on a shared
2-core host hit every variant alike; p50/p95/p99 per call and ratios of p50s."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from export.timing import percentiles

THREADS = 2


def interleaved(runners: dict[str, Any], feeds: dict[str, np.ndarray], rounds: int = 40,
                warmup: int = 3) -> dict[str, dict[str, float]]:
    """Runner name -> p50/p95/p99/mean ms per ``infer(feeds)`` call."""
    for _ in range(warmup):
        for r in runners.values():
            r.infer(feeds)
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(rounds):
        for key, r in runners.items():
            t0 = time.perf_counter()
            r.infer(feeds)
            times[key].append((time.perf_counter() - t0) * 1e3)
    return {k: percentiles(v) for k, v in times.items()}


def batch_of(feeds: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """The first ``n`` samples (repeated when there are fewer)."""
    have = len(next(iter(feeds.values())))
    idx = np.arange(n) % have
    return {k: np.ascontiguousarray(v[idx]) for k, v in feeds.items()}
