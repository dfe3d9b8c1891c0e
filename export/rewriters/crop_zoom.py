"""ONNX translations of ``attnzoo::crop_zoom`` (see ``training/ops/crop_zoom.py`` for the definition).

- ``crop_zoom_standard``: plain opset-18 ops. The sampling grid is computed in the graph from
  ``Shape(image)``, so dynamic batch and dynamic H, W stay right; the resampling is one
  ``GridSample`` (opset 16 semantics: ``mode="bilinear"``; opset 20 renamed it to "linear", which
  onnxruntime rejects under opset 18 and TensorRT does not read as bilinear).
- ``crop_zoom_custom``: one ``CropZoom`` node in the custom domain, for runtimes with a kernel or
  plugin (onnxruntime: ``export/ort_custom_ops.py``; TensorRT: ``docs/tensorrt_plugin_cropzoom.md``).
  The domain is ``ai.onnx.contrib`` because onnxruntime-extensions registers its Python kernels
  there and nowhere else; TensorRT's plugin fallback matches on the op type (plus the
  ``plugin_version``/``plugin_namespace`` attributes), so the same node serves both.
"""

from __future__ import annotations

import onnx
from onnxscript import opset18 as op
from onnxscript.values import Op, Opset

CUSTOM_DOMAIN = "ai.onnx.contrib"
CUSTOM_OP_TYPE = "CropZoom"
CUSTOM_OPSET_VERSION = 1
contrib = Opset(CUSTOM_DOMAIN, CUSTOM_OPSET_VERSION)
# onnxscript only emits ops it has a schema for; this one is ours, so declare it (not registered globally).
_SCHEMA = onnx.defs.OpSchema(
    CUSTOM_OP_TYPE, CUSTOM_DOMAIN, CUSTOM_OPSET_VERSION,
    doc="Zoom the square box (tx, ty, tl) of image to its own H x W (see training/ops/crop_zoom.py).",
    inputs=[onnx.defs.OpSchema.FormalParameter("image", "T"), onnx.defs.OpSchema.FormalParameter("box", "T")],
    outputs=[onnx.defs.OpSchema.FormalParameter("output", "T")],
    type_constraints=[("T", ["tensor(float)"], "image [B,C,H,W] and box [B,3] (tx, ty, tl)")],
)
_crop_zoom_node = Op(contrib, CUSTOM_OP_TYPE, _SCHEMA)


def crop_zoom_standard(image, box):
    """image [B,C,H,W], box [B,3] = (tx, ty, tl) -> [B,C,H,W], with standard ONNX ops only."""
    shape = op.Shape(image)
    batch = op.Slice(shape, [0], [1])
    height = op.Slice(shape, [2], [3])  # int64 [1], read at run time
    width = op.Slice(shape, [3], [4])
    one = op.CastLike(1.0, box)
    two = op.CastLike(2.0, box)

    def unit_coords(n):  # 2u-1 at the n pixel centres u=(k+0.5)/n: (2k+1)/n - 1
        k = op.CastLike(op.Range(op.Constant(value_int=0), op.Squeeze(n), op.Constant(value_int=1)), box)
        return op.Sub(op.Div(op.Add(op.Mul(two, k), one), op.CastLike(n, box)), one)

    sx = op.Unsqueeze(unit_coords(width), [0, 1])  # [1,1,W]
    sy = op.Unsqueeze(unit_coords(height), [0, 2])  # [1,H,1]
    b3 = op.Unsqueeze(box, [2])  # [B,3,1]
    tx = op.Slice(b3, [0], [1], [1])  # [B,1,1]
    ty = op.Slice(b3, [1], [2], [1])
    tl = op.Slice(b3, [2], [3], [1])
    gx = op.Sub(op.Mul(two, op.Add(tx, op.Mul(tl, sx))), one)  # [B,1,W]
    gy = op.Sub(op.Mul(two, op.Add(ty, op.Mul(tl, sy))), one)  # [B,H,1]
    bhw = op.Concat(batch, height, width, axis=0)
    grid = op.Concat(op.Unsqueeze(op.Expand(gx, bhw), [3]), op.Unsqueeze(op.Expand(gy, bhw), [3]), axis=3)
    return op.GridSample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=0)


def crop_zoom_custom(image, box):
    """One custom-domain node; the runtime must provide the kernel (same sampling as the standard form)."""
    return _crop_zoom_node(image, box)
