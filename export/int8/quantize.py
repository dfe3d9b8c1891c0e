"""FP32 graph -> QDQ int8 graph with onnxruntime's static quantization.

- ``preprocess``: onnxruntime's ``quant_pre_process`` (symbolic shape inference + its graph optimizer) first,
  as onnxruntime asks; node names in keep-lists are those of the pre-processed graph.
- ``calibrate``: one calibration per (graph, method), written as onnxruntime's calibration cache, so that the
  probe's many keep-list candidates quantize without calibrating again.
- ``quantize``: QDQ format, per-channel symmetric int8 weights, in one of two flavours from the same
  calibration and keep-list (``FLAVOURS``), because onnxruntime's CPU kernels and TensorRT want different ones
  (measured on cnn, batch 32, onnxruntime 1.32, TensorRT-RTX 1.7.1):
  - ``cpu``: uint8 asymmetric activations and int32 bias, onnxruntime's recipe for AVX-512 VNNI. What is
    gated, benchmarked and served. Symmetric activations cost 1.26x here: a ReLU's output then needs its own
    DequantizeLinear/Relu/QuantizeLinear instead of folding into the zero point.
  - ``tensorrt``: int8 symmetric activations (zero point 0) and float bias: TensorRT-RTX refuses a non-zero
    zero point ("Non-zero zero point is not supported") and an int32 DequantizeLinear (the quantized bias).
    Only the inputs of Conv/Gemm/MatMul get Q/DQ pairs (TensorRT's own placement; it fuses the rest): with
    every op quantized, the builder refused the int8 scalar constants onnxruntime makes for a Mul or Add by a
    constant ("Quantized constant ... is only allowed before DQ"), and the parser a Range fed through Q/DQ.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from pathlib import Path

import numpy as np

from export.int8.calibration import BATCH, TrainingImages


class Int8GraphError(RuntimeError):
    """A graph could not be quantized as asked (unknown keep-list node, onnxruntime failure)."""


def _method(name: str):
    from onnxruntime.quantization import CalibrationMethod

    return getattr(CalibrationMethod, name)


def preprocess(fp32_path: str | Path, out_path: str | Path) -> Path:
    """``quant_pre_process``; symbolic shape inference is retried off where it cannot follow a graph."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = Path(out_path).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    src = str(Path(fp32_path).resolve())
    # Symbolic shape inference dumps the graph it failed on into the working directory: give it a scratch one.
    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp):
        try:
            quant_pre_process(src, str(out))
        except Exception:  # symbolic shape inference refuses some dynamic graphs; ONNX shape inference remains
            quant_pre_process(src, str(out), skip_symbolic_shape=True)
    return out


def node_names(path: str | Path) -> dict[str, str]:
    """Node name -> op type of a graph."""
    import onnx

    return {n.name: n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}


FLAVOURS = ("cpu", "tensorrt")


TENSORRT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _options(flavour: str) -> tuple[object, dict, list[str] | None]:
    """(activation type, extra options, op types to quantize: None = all) of a flavour; strided calibration
    bounds the calibrator's memory."""
    from onnxruntime.quantization import QuantType

    if flavour not in FLAVOURS:
        raise ValueError(f"unknown int8 flavour {flavour!r}; expected one of {FLAVOURS}")
    common = {"WeightSymmetric": True, "CalibStridedMinMax": BATCH}
    if flavour == "cpu":
        return QuantType.QUInt8, {**common, "ActivationSymmetric": False}, None
    return QuantType.QInt8, {**common, "ActivationSymmetric": True, "QuantizeBias": False}, list(TENSORRT_OPS)


def quantize(pre_path: str | Path, out_path: str | Path, method: str, *, cache: str | Path,
             feeds: dict[str, np.ndarray] | None = None, keep_fp32_ops: tuple[str, ...] = (),
             keep_fp32_nodes: tuple[str, ...] = (), flavour: str = "cpu") -> Path:
    """Write the QDQ graph of the pre-processed graph ``pre_path`` to ``out_path``. Calibrates on ``feeds``
    unless ``cache`` (a calibration cache of this graph and ``method``) exists already. Nodes named in
    ``keep_fp32_nodes`` or of a type in ``keep_fp32_ops`` stay float; an unknown node name is an error."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    names = node_names(pre_path)
    unknown = [n for n in keep_fp32_nodes if n not in names]
    if unknown:
        raise Int8GraphError(f"{pre_path}: keep-list names nodes the graph does not have: {unknown} "
                             "(the graph changed since the probe: rerun `python -m export.int8 <model> --probe`)")
    exclude = sorted(set(keep_fp32_nodes) | {n for n, op in names.items() if op in keep_fp32_ops})
    cache = Path(cache)
    if not cache.is_file() and feeds is None:
        raise Int8GraphError(f"{pre_path}: no calibration cache at {cache} and no calibration images given")
    activation, extra, op_types = _options(flavour)
    reader = TrainingImages(feeds) if feeds is not None else None
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    quiet = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # it warns about pre-processing it cannot see was done
    try:
        # cpu: 7-bit weights (reduce_range). onnxruntime's u8 x s8 kernels on CPUs without VNNI (AVX2 only) add
        # pairs of products in 16 bits and saturate: full-range weights gave cnn 0.891 top-1 agreement on an
        # AVX2 EPYC (0.993 on VNNI), 7-bit 0.994 on both, so one graph is right on every x86 host.
        with contextlib.redirect_stdout(io.StringIO()):  # the calibrators print their progress
            quantize_static(str(pre_path), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                            op_types_to_quantize=op_types, activation_type=activation,
                            reduce_range=flavour == "cpu",
                            weight_type=QuantType.QInt8,
                            nodes_to_exclude=exclude, calibrate_method=_method(method),
                            extra_options=extra, calibration_cache_path=str(cache))
    except Exception as e:
        raise Int8GraphError(f"{pre_path}: onnxruntime could not quantize it ({method}): {e}") from e
    finally:
        logging.getLogger().setLevel(quiet)
    return out


def quantized_nodes(int8_path: str | Path) -> dict[str, str]:
    """Node name -> op type of the nodes that run in int8 once onnxruntime or TensorRT fuses the Q/DQ pairs: they
    read a DequantizeLinear output and every output of theirs goes only to QuantizeLinear nodes (a float node
    that merely reads a dequantized tensor is not one)."""
    import onnx

    g = onnx.load(str(int8_path), load_external_data=False).graph
    dq = {o for n in g.node if n.op_type == "DequantizeLinear" for o in n.output}
    readers: dict[str, list[str]] = {}
    for n in g.node:
        for i in n.input:
            readers.setdefault(i, []).append(n.op_type)
    graph_outputs = {o.name for o in g.output}

    def requantized(t: str) -> bool:
        return t not in graph_outputs and bool(readers.get(t)) and all(op == "QuantizeLinear" for op in readers[t])

    return {n.name: n.op_type for n in g.node
            if n.op_type not in ("QuantizeLinear", "DequantizeLinear") and any(i in dq for i in n.input)
            and all(requantized(o) for o in n.output if o)}
