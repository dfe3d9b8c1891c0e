"""``TensorRTRunner``: a serialized engine behind the runners' interface (``export.runners``),
``infer(feeds: dict[str, ndarray]) -> dict[str, ndarray]``, for any number of named inputs and outputs.

Device buffers are torch CUDA tensors, so no pycuda/cuda-python is needed. Needs a GPU; the engine's sidecar
is checked first (flavour, version, architecture), and feeds outside its profile are refused in one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from export.tensorrt.library import import_trt
from export.tensorrt.loaders import load_engine
from export.tensorrt.profiles import as_shapes


class TensorRTRunner:
    """Run ``plan`` (built by ``build_engine``) on named numpy feeds; outputs come back as numpy, floating
    ones as float32 (FP16 engines here have fp32 I/O anyway)."""

    def __init__(self, plan: str | Path, name: str | None = None, prefer: str | None = None) -> None:
        import torch

        self.torch = torch
        self.plan = Path(plan)
        self.trt, flavour = import_trt(prefer)
        self.runtime, self.engine, self.info = load_engine(plan, prefer)  # refuses a mismatched engine first
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == self.trt.TensorIOMode.INPUT for n in names}
        self.input_names = tuple(n for n in names if is_input[n])
        self.output_names = tuple(n for n in names if not is_input[n])
        self.name = name or f"TensorRT {self.info.precision}" + (" (RTX)" if flavour == "tensorrt_rtx" else "")

    def dtype(self, tensor: str) -> np.dtype:
        """numpy dtype of an engine tensor."""
        return np.dtype(self.trt.nptype(self.engine.get_tensor_dtype(tensor)))

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise KeyError(f"{self.plan}: missing inputs {missing}; the engine takes {list(self.input_names)}")
        arrays = {n: np.ascontiguousarray(feeds[n]) for n in self.input_names}
        if self.info.profile:
            problems = self.info.shape_problems(as_shapes(arrays))
            if problems:
                raise ValueError(f"{self.plan}: " + "; ".join(problems))
        held: list[Any] = []  # device buffers must outlive the launch
        for n, a in arrays.items():
            if a.dtype != self.dtype(n):
                raise TypeError(f"{self.plan}: input {n!r} is {a.dtype}, the engine takes {self.dtype(n)}")
            t = torch.from_numpy(a).cuda()
            if not self.context.set_input_shape(n, tuple(t.shape)):
                raise ValueError(f"{self.plan}: TensorRT refused input {n!r} of shape {list(t.shape)}")
            self.context.set_tensor_address(n, t.data_ptr())
            held.append(t)
        outs = {}
        for n in self.output_names:
            shape = tuple(self.context.get_tensor_shape(n))
            if any(d < 0 for d in shape):
                raise RuntimeError(f"{self.plan}: output {n!r} has a data-dependent shape {list(shape)}")
            t = torch.empty(shape, dtype=torch.from_numpy(np.zeros(0, self.dtype(n))).dtype, device="cuda")
            self.context.set_tensor_address(n, t.data_ptr())
            outs[n] = t
        if not self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise RuntimeError(f"TensorRT execution failed for {self.plan}")
        # .cpu() synchronizes with the stream the engine ran on
        return {n: (t.float() if t.is_floating_point() else t).cpu().numpy() for n, t in outs.items()}
