"""Latency statistics and the interleaved timing loop shared by every benchmark (numpy only, so the GPU check can
use it anywhere)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

THREADS = 2  # intra-op threads of the side-by-side onnxruntime timings (the int8 probe, variants, roofline)


def batch_of(feeds: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """The first ``n`` samples (repeated when there are fewer)."""
    have = len(next(iter(feeds.values())))
    idx = np.arange(n) % have
    return {k: np.ascontiguousarray(v[idx]) for k, v in feeds.items()}


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    """p50/p95/p99 and mean of latency samples in ms."""
    a = np.asarray(samples_ms, dtype=np.float64)
    return {"p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean())}


BUSY_IDLE_S = 0.05  # untimed pause after a runner whose threads stay busy once it returns (``interleaved``)


def interleaved(runners: dict[str, Any], feeds: dict[str, np.ndarray], rounds: int = 40, warmup: int = 3, *,
                settle: bool = False, progress: Any = None, idle_after: dict[str, float] | None = None
                ) -> dict[str, dict[str, float]]:
    """Runner name -> p50/p95/p99/mean ms per ``infer(feeds)`` call, all runners interleaved per round (in a
    shuffled order). ``settle``:
    every timed call follows an untimed one on the same runner (a spinning onnxruntime pool keeps burning cores just
    after its run, which the next runner would pay for). ``progress``: a tqdm bar advanced once per round.
    ``idle_after``: seconds to sleep, untimed, after a named runner's timed call, for runners whose threads keep
    the cores busy after they return (``BUSY_IDLE_S``): torch's OpenMP pool (measured, an identical onnxruntime
    session 1.3x slower when it always followed torch.compile, and within 1.05x with a 50 ms pause after each
    torch call), and onnxruntime with spin-wait on, whose pool outlasts the next runner's settling call (measured,
    nonlocal_gaussian at batch 32: onnxruntime spin off 7.4-9.1 ms among candidates that include spinning ones,
    5.3-5.6 ms without them, and 5.5-5.7 ms with them and this pause)."""
    for _ in range(warmup):
        for r in runners.values():
            r.infer(feeds)
    times: dict[str, list[float]] = {k: [] for k in runners}
    order = list(runners.items())
    rng = np.random.default_rng(0)
    for _ in range(rounds):
        # a fresh order each round (seeded), so no runner always follows the same one: a runner may pay for what
        # the one before leaves behind (see ``idle_after``)
        for j in rng.permutation(len(order)):
            key, r = order[j]
            if settle:
                r.infer(feeds)
            t0 = time.perf_counter()
            r.infer(feeds)
            times[key].append((time.perf_counter() - t0) * 1e3)
            if idle_after and key in idle_after:
                time.sleep(idle_after[key])
        if progress is not None:
            progress.update(1)
    return {k: percentiles(v) for k, v in times.items()}
