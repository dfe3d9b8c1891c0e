"""onnxruntime sessions, with the project's custom-op kernels registered when a graph needs them."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort


def ort_session(path: Path | str, custom_ops: bool = False, threads: int | None = None) -> ort.InferenceSession:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"ONNX file not found: {path}")
    from export.ort_custom_ops import session_options

    opts = session_options(custom_ops)
    opts.intra_op_num_threads = threads or min(4, os.cpu_count() or 1)
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # corrupt or truncated file: say which
        raise RuntimeError(f"onnxruntime cannot load {path}: {str(e).splitlines()[0]}") from e


def run(session: ort.InferenceSession, x: np.ndarray) -> list[np.ndarray]:
    return session.run(None, {session.get_inputs()[0].name: x})
