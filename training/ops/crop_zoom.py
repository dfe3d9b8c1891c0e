"""``attnzoo::crop_zoom``: the RA-CNN attention crop, as a torch custom op.

``crop_zoom(image [B,C,H,W], box [B,3]) -> [B,C,H,W]`` resamples the square box
``(tx, ty, tl)`` (centre and half side, normalized to [0, 1] of the image) to the image's own
H, W. Output pixel (i, j) samples ``x = tx + tl*(2u-1)``, ``y = ty + tl*(2v-1)`` with
``u = (j+0.5)/W``, ``v = (i+0.5)/H``: bilinear, zeros outside, ``align_corners=False``.

Why a custom op: the exported graph keeps one node per crop, which the ONNX translations in
``export/rewriters/crop_zoom.py`` turn into plain GridSample (default) or one custom-domain node
for runtimes with a kernel/plugin. The grid is built by hand, never with ``F.affine_grid``:
AffineGrid does not parse in TensorRT.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["crop_zoom", "crop_zoom_reference", "zoom_grid"]

# aten.grid_sampler_2d enums
_BILINEAR, _ZEROS = 0, 0


def _unit_coords(n: int, like: torch.Tensor) -> torch.Tensor:
    """2u-1 for the n pixel centres u=(k+0.5)/n along one axis, in [-1, 1]."""
    k = torch.arange(n, device=like.device, dtype=like.dtype)
    return (2.0 * k + 1.0) / n - 1.0


def zoom_grid(box: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """grid_sample grid [B,H,W,2] (x, y in [-1, 1]) that zooms ``box`` [B,3] to height x width."""
    tx, ty, tl = (box[:, k, None, None] for k in range(3))  # [B,1,1] each
    sx = _unit_coords(width, box)[None, None, :]  # [1,1,W]
    sy = _unit_coords(height, box)[None, :, None]  # [1,H,1]
    gx = 2.0 * (tx + tl * sx) - 1.0  # [B,1,W]
    gy = 2.0 * (ty + tl * sy) - 1.0  # [B,H,1]
    shape = (box.shape[0], height, width)
    return torch.stack((gx.expand(shape), gy.expand(shape)), dim=-1)


def crop_zoom_reference(image: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """Pure-torch definition (plain autograd); the custom op must match it, values and gradients."""
    grid = zoom_grid(box.to(image.dtype), image.shape[-2], image.shape[-1])
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _check(image: torch.Tensor, box: torch.Tensor) -> None:
    if image.dim() != 4:
        raise ValueError(f"crop_zoom: image must be [B,C,H,W], got shape {tuple(image.shape)}")
    if box.dim() != 2 or box.shape[1] != 3:
        raise ValueError(f"crop_zoom: box must be [B,3] (tx, ty, tl), got shape {tuple(box.shape)}")


@torch.library.custom_op("attnzoo::crop_zoom", mutates_args=())
def crop_zoom(image: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """Zoom the square ``box`` [B,3] = (tx, ty, tl) of ``image`` [B,C,H,W] to H x W."""
    _check(image, box)
    return crop_zoom_reference(image, box)


@crop_zoom.register_fake
def _(image: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    _check(image, box)
    return torch.empty_like(image)


def _setup_context(ctx, inputs, output) -> None:
    image, box = inputs
    ctx.save_for_backward(image, box)


def _backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    image, box = ctx.saved_tensors
    need_image, need_box = ctx.needs_input_grad
    if not (need_image or need_box):
        return None, None
    height, width = image.shape[-2], image.shape[-1]
    grid = zoom_grid(box.to(image.dtype), height, width)
    grad_image, grad_grid = torch.ops.aten.grid_sampler_2d_backward(
        grad_out.contiguous(), image, grid, _BILINEAR, _ZEROS, False, [need_image, need_box]
    )
    grad_box = None
    if need_box:
        # The grid is linear in (tx, ty, tl): gx = 2tx + 2tl*(2u-1) - 1, gy = 2ty + 2tl*(2v-1) - 1.
        ggx, ggy = grad_grid[..., 0], grad_grid[..., 1]  # [B,H,W]
        sx = _unit_coords(width, ggx)[None, None, :]
        sy = _unit_coords(height, ggy)[None, :, None]
        d_tx = 2.0 * ggx.sum(dim=(1, 2))
        d_ty = 2.0 * ggy.sum(dim=(1, 2))
        d_tl = 2.0 * (ggx * sx + ggy * sy).sum(dim=(1, 2))
        grad_box = torch.stack((d_tx, d_ty, d_tl), dim=1).to(box.dtype)
    return (grad_image if need_image else None), grad_box


crop_zoom.register_autograd(_backward, setup_context=_setup_context)
