"""The one place onnxruntime sessions are built: export checks, benchmarks and the served python backend.

The thread rule lives here too (``intra_op_threads``): instances of a served model are separate processes
sharing the host's cores, so each gets its share; spinning worker threads are off by default because on
a small host they burn the cores the server and its clients share.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def intra_op_threads(fixed: int = 0, instances: int = 1) -> int:
    """``fixed`` when set, else this process's usable cores divided among ``instances``."""
    return fixed or max(1, usable_cores() // max(1, instances))


def session_options(threads: int | None = None, *, spinning: bool = False, custom_ops: bool = False,
                    disable_optimizations: bool = False, profile_prefix: str | None = None) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    if custom_ops:
        from export.ort_custom_ops import register_custom_ops

        register_custom_ops(so)
    so.intra_op_num_threads = threads or min(4, usable_cores())
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3  # ORT warns about every Cast it inserts for fp16 on CPU
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if disable_optimizations:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if profile_prefix is not None:  # per-node kernel times, written by session.end_profiling()
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return so


def ort_session(path: Path | str, custom_ops: bool = False, threads: int | None = None, *,
                spinning: bool = False, disable_optimizations: bool = False,
                providers: list[str] | None = None, profile_prefix: str | None = None) -> Any:
    """An onnxruntime session on ``path``; a missing or corrupt file is a one-line error naming it."""
    import onnxruntime as ort

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"ONNX file not found: {path}")
    opts = session_options(threads, spinning=spinning, custom_ops=custom_ops,
                           disable_optimizations=disable_optimizations, profile_prefix=profile_prefix)
    try:
        return ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])
    except Exception as e:  # corrupt or truncated file: say which
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RuntimeError(f"onnxruntime cannot load {path}: {first}") from e

