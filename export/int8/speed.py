"""Side-by-side latency: runners timed in one run, interleaved per round, so that load spikes on a shared
2-core host hit every variant alike; p50/p95/p99 per call and ratios of p50s."""

from __future__ import annotations

import numpy as np

THREADS = 2


def batch_of(feeds: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """The first ``n`` samples (repeated when there are fewer)."""
    have = len(next(iter(feeds.values())))
    idx = np.arange(n) % have
    return {k: np.ascontiguousarray(v[idx]) for k, v in feeds.items()}
