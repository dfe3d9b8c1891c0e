"""Export-time rewrite of the Feedback CNN's written-out top-down pass (``FeedbackCNN.top_down``) into fewer,
cheaper ONNX ops. The same numbers, in another order of ops: the parity gate checks every output of the rewritten
graph against the unrewritten torch model, and the weights (and their fingerprint) do not change.

Why: the unrolled feedback graph (5 loops, each a forward and a top-down pass) ran at 14% of the 2-thread peak.
Profiled at batch 32 (onnxruntime, 2 threads), 20% of its time was ``ConvTranspose`` and about 40% the max-pool
routing: a 6-D Transpose into [B, C, h, w, 4] windows, a ReduceMax, a broadcast Equal against it, and the Transpose
back. Two changes:

- A 3x3, stride-1, padding-1 transposed convolution with weight W is the convolution with W's in/out channels
  swapped and its taps flipped: ``conv2d(g, W.transpose(0, 1).flip(2, 3), padding=1)``. The flipped weight is a
  constant of the graph, and onnxruntime's Conv kernels are faster than its ConvTranspose.
- The routing works on the full-resolution map: the window maxima (a MaxPool of the map) upsampled 2x (nearest:
  one ``Resize``) mark every cell equal to its window's maximum; each such cell scores 4, 3, 2 or 1 by its place in
  the window in row-major order (0 elsewhere), and a second MaxPool, upsampled, picks the first maximum: PyTorch's
  tie rule, exactly as ``route_max_pool_grad`` (ties are common: flat image regions give equal activations). The
  routed map is the window gradient upsampled 2x times that mask. No 6-D tensors, no reduction, no broadcast
  compare. Measured in onnxruntime (2 threads), the feedback graph 1.5x faster at batch 1 and 1.2x at batch 32.
  Two formulations that measured slower: the four cells as stride-2 slices interleaved back by ``DepthToSpace``
  (onnxruntime's DepthToSpace and Where were 35% of the time), and the upsampling by ``Expand`` (52%). The window
  maximum is pooled from the very map it is compared with, never reused from the forward pass's MaxPool:
  onnxruntime runs some fp16 ops in fp32 and drops the Casts between them, so two paths to "the same" value may
  round differently; in the FP16 graph no cell then equalled the forward's maximum (every saliency map NaN).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from training.models.feedback import FeedbackCNN

LEAN_FEEDBACK = "lean_feedback"


def bn_scale(bn: nn.BatchNorm2d) -> torch.Tensor:
    """d bn(c) / dc in eval mode, per channel [1, C, 1, 1] (the model's own helper is private to it)."""
    return (bn.weight / torch.sqrt(bn.running_var + bn.eps))[None, :, None, None]


def transposed_conv_as_conv(g: torch.Tensor, weight: torch.Tensor, padding: int) -> torch.Tensor:
    """``F.conv_transpose2d(g, weight, padding=padding)`` for stride 1, as a convolution."""
    return F.conv2d(g, weight.transpose(0, 1).flip(2, 3), padding=weight.shape[-1] - 1 - padding)


def route_to_first_max(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``route_max_pool_grad(grad, x)``: the 2x2 window gradient ``grad`` sent to each window's first maximum in
    row-major order; rows and columns the pool dropped get zero."""
    h2, w2 = grad.shape[-2], grad.shape[-1]
    crop = x[..., : 2 * h2, : 2 * w2]

    def up(t: torch.Tensor) -> torch.Tensor:
        return F.interpolate(t, scale_factor=2.0, mode="nearest")

    is_max = (crop == up(F.max_pool2d(crop, 2))).to(grad.dtype)
    place = torch.tensor([[4.0, 3.0], [2.0, 1.0]], dtype=grad.dtype, device=grad.device).repeat(1, 1, h2, w2)
    score = place * is_max  # earlier in the window scores higher; 0 where not a maximum
    first = (score == up(F.max_pool2d(score, 2))).to(grad.dtype)
    return F.pad(up(grad) * first, (0, x.shape[-1] - 2 * w2, 0, x.shape[-2] - 2 * h2))


def lean_top_down(self: FeedbackCNN, k_row: torch.Tensor, inputs: list[torch.Tensor], pre: list[torch.Tensor],
                  relu: list[torch.Tensor], gates: list[torch.Tensor] | None, to_input: bool
                  ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """``FeedbackCNN.top_down`` with ``transposed_conv_as_conv`` and ``route_to_first_max``."""
    last = relu[-1]
    g = (k_row[:, :, None, None] / (last.shape[-2] * last.shape[-1])).expand_as(last)
    dz: list[torch.Tensor] = [None] * self.depth  # type: ignore[list-item]
    dx = None
    for i in reversed(range(self.depth)):
        dz[i] = g * relu[i]
        dr = g if gates is None else g * gates[i]
        dc = dr * (pre[i] > 0).to(dr.dtype) * bn_scale(self.bns[i])
        if i == 0 and not to_input:
            break
        d_in = transposed_conv_as_conv(dc, self.convs[i].weight, padding=1)
        if i == 0:
            dx = d_in
        else:
            gated_prev = relu[i - 1] if gates is None else relu[i - 1] * gates[i - 1]
            g = route_to_first_max(d_in, gated_prev)
    return dz, dx


def holds_feedback(module: nn.Module) -> bool:
    return any(isinstance(m, FeedbackCNN) for m in module.modules())
