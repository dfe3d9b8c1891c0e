"""Named input arrays for a spec: real test-split images where an input names a data array, generated
values (within the input's ``value_range``) for the rest. What parity, FP16 gates and clients send."""

from __future__ import annotations

import numpy as np

from training.datasets import split_for
from training.registry import ModelSpec, TensorSpec


def generated(t: TensorSpec, n: int, side: int | None, rng: np.random.Generator) -> np.ndarray:
    shape = (n, *t.concrete(side))
    lo, hi = t.value_range
    if np.dtype(t.dtype).kind in "iu":
        return rng.integers(int(lo), int(hi) + 1, size=shape).astype(t.dtype)
    return rng.uniform(lo, hi, size=shape).astype(t.dtype)


def sample_feeds(spec: ModelSpec, n: int, side: int | None = None, seed: int = 0,
                 split: str = "test") -> dict[str, np.ndarray]:
    """``n`` samples for every input of ``spec``; every dynamic axis is ``side`` (default: its opt size)."""
    rng = np.random.default_rng(seed)
    data = None
    feeds = {}
    for t in spec.inputs:
        if t.data is not None:
            if data is None:
                data = split_for(spec, split, n, side, seed)
            feeds[t.name] = np.ascontiguousarray(data[t.data])
        else:
            feeds[t.name] = generated(t, n, side, rng)
    return feeds
