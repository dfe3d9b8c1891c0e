"""onnxruntime kernels for the custom-domain nodes that ``translation_table(custom_ops=True)`` emits.

onnxruntime's Python API cannot register a kernel by itself; onnxruntime-extensions can, through
its ``onnx_op`` PyOp hook, but only in its fixed domain ``ai.onnx.contrib`` (hence the domain the
rewriters emit). The kernels are numpy: a reference path for graphs that keep the custom node,
not a fast one (the hook copies each output through a Python list).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from export.rewriters.crop_zoom import CUSTOM_OP_TYPE

_registered = False


def crop_zoom_numpy(image: np.ndarray, box: np.ndarray) -> np.ndarray:
    """Numpy ``attnzoo::crop_zoom``: bilinear, zeros outside, align_corners=False.

    image [B,C,H,W], box [B,3] = (tx, ty, tl) normalized to [0, 1]; returns [B,C,H,W] float32.
    """
    image = np.asarray(image, np.float32)
    box = np.asarray(box, np.float32)
    if image.ndim != 4 or box.shape != (image.shape[0], 3):
        raise ValueError(f"CropZoom: expected image [B,C,H,W] and box [B,3], got {image.shape} and {box.shape}")
    b, c, h, w = image.shape
    su = (2 * np.arange(w, dtype=np.float32) + 1) / w - 1  # 2u-1 at pixel centres
    sv = (2 * np.arange(h, dtype=np.float32) + 1) / h - 1
    tx, ty, tl = (box[:, k, None] for k in range(3))
    # Normalized [0,1] -> pixel coordinates (align_corners=False): p = x*W - 0.5.
    px = (tx + tl * su[None, :]) * w - 0.5  # [B,W]
    py = (ty + tl * sv[None, :]) * h - 0.5  # [B,H]
    x0 = np.floor(px)
    y0 = np.floor(py)
    fx = (px - x0).astype(np.float32)
    fy = (py - y0).astype(np.float32)
    x0 = x0.astype(np.int64)
    y0 = y0.astype(np.int64)
    out = np.zeros((b, c, h, w), np.float32)
    bi = np.arange(b)[:, None, None]
    for dy, wy in ((0, 1 - fy), (1, fy)):
        yy = y0 + dy  # [B,H]
        for dx, wx in ((0, 1 - fx), (1, fx)):
            xx = x0 + dx  # [B,W]
            valid = (yy >= 0)[:, :, None] & (yy < h)[:, :, None] & (xx >= 0)[:, None, :] & (xx < w)[:, None, :]
            vals = image[bi, :, np.clip(yy, 0, h - 1)[:, :, None], np.clip(xx, 0, w - 1)[:, None, :]]  # [B,H,W,C]
            weight = (wy[:, :, None] * wx[:, None, :] * valid)[..., None]
            out += np.moveaxis(vals * weight, -1, 1)
    return out


def register_kernels() -> None:
    """Register the numpy kernels with onnxruntime-extensions (once per process)."""
    global _registered
    if _registered:
        return
    from onnxruntime_extensions import PyCustomOpDef, onnx_op

    onnx_op(op_type=CUSTOM_OP_TYPE, inputs=[PyCustomOpDef.dt_float, PyCustomOpDef.dt_float],
            outputs=[PyCustomOpDef.dt_float])(crop_zoom_numpy)
    _registered = True


def register_custom_ops(so: ort.SessionOptions) -> None:
    """Make the custom-domain kernels available to sessions built with ``so``."""
    from onnxruntime_extensions import get_library_path

    register_kernels()
    so.register_custom_ops_library(get_library_path())
