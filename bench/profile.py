"""Where the time goes, per operator, in onnxruntime and in torch eager: the profile ``bench.ort_vs_torch`` prints
for a model whose onnxruntime graph is not the target's times faster than torch.

Both are self times per call, summed by operator (ORT's node op types from its profiler trace, torch's aten
ops from ``torch.profiler``), so the two columns add up to each runtime's compute time per batch.
"""

from __future__ import annotations

import json
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from export.runtime import ort_session


def ort_op_profile(path: Path, feeds: dict[str, np.ndarray], runs: int = 10, threads: int = 2) -> dict[str, float]:
    """ms per call by ONNX op type (after onnxruntime's graph fusions), over ``runs`` calls after a warm-up."""
    with tempfile.TemporaryDirectory() as tmp:
        sess = ort_session(path, threads=threads, profile_prefix=str(Path(tmp) / "ort"))
        names = [i.name for i in sess.get_inputs()]
        for _ in range(runs + 2):
            sess.run(None, {n: feeds[n] for n in names})
        trace = json.loads(Path(sess.end_profiling()).read_text())
    per_run: dict[str, list[float]] = defaultdict(list)
    for ev in trace:
        if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time"):
            per_run[ev["args"]["op_name"]].append(ev["dur"] / 1e3)
    # The first two calls are warm-up: drop each op's share of them.
    return {op: sum(v) * runs / (runs + 2) / runs for op, v in per_run.items()}


def torch_op_profile(model: Any, feeds: dict[str, np.ndarray], input_names: tuple[str, ...],
                     runs: int = 10) -> dict[str, float]:
    """ms per call by aten op (self CPU time), over ``runs`` calls after a warm-up."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    args = [torch.from_numpy(feeds[n]) for n in input_names]
    with torch.inference_mode():
        for _ in range(2):
            model(*args)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(runs):
                model(*args)
    return {e.key: e.self_cpu_time_total / 1e3 / runs for e in prof.key_averages() if e.self_cpu_time_total > 0}


def top(profile: dict[str, float], k: int = 6) -> list[dict[str, Any]]:
    """The ``k`` costliest ops with their share of the total (the rest summed as one row)."""
    total = sum(profile.values()) or 1.0
    ranked = sorted(profile.items(), key=lambda kv: -kv[1])
    rows = [{"op": op, "ms": ms, "share": ms / total} for op, ms in ranked[:k]]
    rest = sum(ms for _, ms in ranked[k:])
    if rest:
        rows.append({"op": f"{len(ranked) - k} others", "ms": rest, "share": rest / total})
    return rows
