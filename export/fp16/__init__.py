"""FP16 graphs: convert (``passes``), gate on agreement with the fp32 model (``gate``), measure what to keep
in fp32 (``probe``), report (``report``); ``python -m export.fp16`` is the CLI.

The FP16 graph of a Triton model lives at ``training.layout.fp16_onnx_path``; its FP32 source at
``training.layout.onnx_path``.
"""

from export.fp16.gate import Fp16AgreementError, convert_graphs, fp16_gate, measure, require_agreement
from export.fp16.passes import PASSES, Fp16GraphError, convert_to_fp16, kept_op_problems, passes_without
from export.fp16.probe import keep_list_sweep, probe_drift, probe_model, suspects
from export.fp16.report import write_report

__all__ = [
    "PASSES",
    "Fp16AgreementError",
    "Fp16GraphError",
    "convert_graphs",
    "convert_to_fp16",
    "fp16_gate",
    "keep_list_sweep",
    "kept_op_problems",
    "measure",
    "passes_without",
    "probe_drift",
    "probe_model",
    "require_agreement",
    "suspects",
    "write_report",
]
