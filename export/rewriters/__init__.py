"""ONNX translations of the torch custom ops, one file per op (mmdeploy's habit).

``translation_table(custom_ops)`` is handed to ``torch.onnx.export(..., dynamo=True,
custom_translation_table=...)``: with ``custom_ops=False`` every custom op is lowered to standard
ONNX (runs anywhere); with ``True`` each becomes one custom-domain node that needs a registered
kernel (onnxruntime) or plugin (TensorRT).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

import training.ops  # noqa: F401  (registers torch.ops.attnzoo.*)
from export.rewriters.crop_zoom import CUSTOM_DOMAIN, CUSTOM_OP_TYPE, crop_zoom_custom, crop_zoom_standard
from export.rewriters.fused_attention import attention_onnx

__all__ = ["CUSTOM_DOMAIN", "CUSTOM_OP_TYPE", "translation_table"]


def translation_table(custom_ops: bool = False) -> dict[Callable, Callable]:
    return {
        torch.ops.attnzoo.crop_zoom.default: crop_zoom_custom if custom_ops else crop_zoom_standard,
        # export-only, emitted by the fused-attention rewrite (fused_attention.py)
        torch.ops.attnzoo_export.multi_head_attention.default: attention_onnx,
    }
