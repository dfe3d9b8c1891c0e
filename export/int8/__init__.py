"""INT8 graphs: quantize (``quantize``: QDQ, two flavours), calibrate on training images (``calibration``),
choose the method and what stays float by measurement (``probe`` -> ``choices``), gate against the fp32 model
(``gate``), build TensorRT-RTX engines (``engines``), report (``report``); ``python -m export.int8`` is the CLI
(the int8 vs fp32 timings are ``bench.int8``).

The int8 graph of a Triton model lives at ``training.layout.int8_onnx_path``; its FP32 source at
``training.layout.onnx_path``.
"""

from export.int8.choices import Int8Choice, choice_for, load_choices, save_choice
from export.int8.gate import Int8GateError, build_int8_graphs, gate_miss, int8_gate, measure, remove_int8_graphs
from export.int8.quantize import FLAVOURS, Int8GraphError, preprocess, quantize, quantized_nodes

__all__ = [
    "FLAVOURS",
    "Int8Choice",
    "Int8GateError",
    "Int8GraphError",
    "build_int8_graphs",
    "choice_for",
    "gate_miss",
    "int8_gate",
    "load_choices",
    "measure",
    "preprocess",
    "quantize",
    "quantized_nodes",
    "remove_int8_graphs",
    "save_choice",
]
