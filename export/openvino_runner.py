"""OpenVINO as a second CPU engine behind the runner interface: ``OpenVinoRunner(path).infer(feeds) -> dict``.

The same ONNX files onnxruntime runs, read by the OpenVINO runtime itself (not onnxruntime's OpenVINO execution
provider: one pip wheel, no custom onnxruntime build). Settings, and why:

- ``LATENCY`` performance hint: one stream, every thread on one request, as a served model with a dynamic
  batcher uses it;
- ``INFERENCE_NUM_THREADS`` from ``export.runtime.intra_op_threads`` (the same share of the cores as
  onnxruntime gets);
- ``INFERENCE_PRECISION_HINT`` f32 by default: on a CPU with AVX-512 BF16 (or AMX) OpenVINO otherwise computes
  in bf16 (its default there, measured on these hosts), which is a precision change, not an engine choice;
- shapes: ``static=True`` (default) compiles the graph once per distinct input shape, reshaped to that shape,
  and keeps a few compiled models (the way the issue's figures were measured; OpenVINO's static-shape kernels
  are the fast ones: the Feedback CNN 2.2x faster than compiled for dynamic shapes); ``static=False`` compiles
  the graph's own dynamic shapes once. ``batch_buckets`` (static only; how a served model runs static shapes):
  a batch is padded up to the next bucket (its last sample repeated) and the outputs cut back, so a dynamic
  batcher's batch sizes 1..max compile a handful of shapes (powers of two: ``batch_buckets()``) instead of one
  per size.

A graph OpenVINO cannot read or compile raises ``OpenVinoCompileError`` naming the file and the first line of
OpenVINO's message (e.g. the int8 gen_attention graphs: ``dnnl_postops_composer``), so callers can report it.
"""

from __future__ import annotations

from collections import OrderedDict
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from export.runtime import intra_op_threads

MAX_SHAPES = 8  # compiled static-shape models kept per runner (batch 1, 8, 32 x a few sides in practice)


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """The batch sizes a bucketed static runner compiles: powers of two below ``max_batch``, and ``max_batch``."""
    sizes = [1 << k for k in range(max(max_batch, 1).bit_length()) if 1 << k < max_batch]
    return (*sizes, max(max_batch, 1))


class OpenVinoCompileError(RuntimeError):
    """OpenVINO cannot read or compile a graph."""


def available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def version() -> str | None:
    try:
        import openvino as ov
    except ImportError:
        return None
    return ov.__version__.split("-")[0]


@cache
def core() -> Any:
    import openvino as ov

    return ov.Core()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # OpenVINO's messages start with "Exception from src/...cpp:NN:" lines; the cause is the last such line.
    useful = [ln for ln in lines if not ln.startswith(("Exception from", "Check '"))] or lines
    return (useful[-1] if useful else type(e).__name__)[:300]


class OpenVinoRunner:
    """OpenVINO CPU on one ONNX graph; outputs named as the graph names them."""

    def __init__(self, path: Path | str, name: str | None = None, *, threads: int | None = None,
                 static: bool = True, precision: str = "f32", hint: str = "LATENCY",
                 batch_buckets: tuple[int, ...] = ()) -> None:
        import openvino as ov

        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"ONNX file not found: {self.path}")
        self.static, self.name = static, name or f"openvino {version()} CPU"
        self.buckets = tuple(sorted(set(batch_buckets))) if static else ()
        self.max_shapes = max(MAX_SHAPES, 2 * len(self.buckets))  # every bucket at two input sizes
        self.threads = threads or intra_op_threads()
        self.config = {"PERFORMANCE_HINT": hint, "INFERENCE_NUM_THREADS": self.threads,
                       "INFERENCE_PRECISION_HINT": precision}
        try:
            self.model = core().read_model(str(self.path))
        except Exception as e:
            raise OpenVinoCompileError(f"OpenVINO cannot read {self.path}: {_first_line(e)}") from e
        self.input_names = tuple(i.get_any_name() for i in self.model.inputs)
        self.output_names = tuple(o.get_any_name() for o in self.model.outputs)
        self._ov = ov
        self._compiled: OrderedDict[tuple, tuple[Any, Any]] = OrderedDict()
        if not static:  # compile now so that an uncompilable graph fails at construction
            self._request(())
        # static: compiled per shape at the first call with it (a compile failure raises there)

    def _request(self, key: tuple) -> tuple[Any, Any]:
        if key in self._compiled:
            self._compiled.move_to_end(key)
            return self._compiled[key]
        model = self.model
        if key:
            model = self.model.clone()
            model.reshape({n: self._ov.PartialShape(list(s)) for n, s in key})
        try:
            compiled = core().compile_model(model, "CPU", self.config)
        except Exception as e:
            shape = ", ".join(f"{n} {list(s)}" for n, s in key) or "dynamic shapes"
            raise OpenVinoCompileError(f"OpenVINO cannot compile {self.path} ({shape}): {_first_line(e)}") from e
        ports = [next(iter(o.get_names() & set(self.output_names)), o.get_any_name()) for o in compiled.outputs]
        entry = (compiled.create_infer_request(), dict(zip(ports, compiled.outputs, strict=True)))
        self._compiled[key] = entry
        while len(self._compiled) > self.max_shapes:
            self._compiled.popitem(last=False)
        return entry

    @property
    def compiled_shapes(self) -> int:
        """How many compiled models this runner holds (one per input shape seen when static)."""
        return len(self._compiled)

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise KeyError(f"{self.path}: missing inputs {missing}; the graph takes {list(self.input_names)}")
        arrays = {n: np.ascontiguousarray(feeds[n]) for n in self.input_names}
        batch = next(iter(arrays.values())).shape[0] if self.buckets and arrays else 0
        size = next((b for b in self.buckets if b >= batch), batch)
        if size > batch:  # pad to the bucket with copies of the last sample (every input's axis 0 is the batch)
            arrays = {n: np.concatenate([a, np.repeat(a[-1:], size - batch, axis=0)]) for n, a in arrays.items()}
        key = tuple((n, a.shape) for n, a in arrays.items()) if self.static else ()
        request, ports = self._request(key)
        result = request.infer(arrays)
        out = {n: np.array(result[ports[n]]) for n in self.output_names}
        return {n: a[:batch] for n, a in out.items()} if size > batch else out


def openvino_deployed_runner(spec: Any, graph_paths: dict[str, Path], **kw: Any) -> Any:
    """OpenVINO on the deployed graphs, composed as the spec composes them (``export.parity.deployed_runner``'s
    twin). Raises ``OpenVinoCompileError`` when any graph does not compile."""
    from export.runners import ComposedRunner

    runners = {g: OpenVinoRunner(p, **kw) for g, p in graph_paths.items()}
    if spec.composition is None:
        return next(iter(runners.values()))
    return ComposedRunner(spec.composition, runners, spec.output_names, name=f"openvino {spec.composition.kind}")
