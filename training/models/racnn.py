"""RA-CNN ("Look Closer to See Better", Fu et al. 2017): recurrent attention over three scales.

Scale s classifies its image with its own small CNN; an Attention Proposal Network (APN) on scales
1 and 2 predicts a square box (tx, ty, tl) from that scale's features, and ``attnzoo::crop_zoom``
zooms the box to the next scale's image (scale 2 crops the input, scale 3 crops the scale-2 zoom).
All three read the input through one fixed Gaussian low-pass, so that the crops do not amplify pixel
noise (why: INPUT_BLUR_SIGMA).

What made the APN localise on cluttered digits (measured; a plain FC APN trained jointly zoomed out
to the whole image and wrecked the scale-1 classifier), all three used here:
1. the APN reads the scale's features detached: no APN gradient into the classifier;
2. the half side is bounded (scale 1: [0.12, 0.3] of the canvas) and the centre clamped so the box
   stays inside the image;
3. the centre is a soft-argmax over a 1x1-conv heat map, not a fully connected regression.
The APN learns only through crop_zoom's box gradient: from the next scale's cross-entropy and the
inter-scale ranking loss max(0, p_s[y] - p_{s+1}[y] + margin).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.models.common import SmallCNN
from training.ops import crop_zoom
from training.registry import (
    Checks,
    ExportOptions,
    ModelSpec,
    TensorSpec,
    TrainRecipe,
    class_logits,
    image_input,
    register_model,
)
from training.tasks import Classification, accuracy

NUM_SCALES = 3
RANK_MARGIN = 0.05
LABEL_SMOOTHING = 0.1  # also caps the ranking target (see racnn_loss)
# Half-side bounds per APN, as fractions of that scale's image. Scale 2's image is already the
# scale-1 crop, so its box is at most 0.5 (the whole zoom, i.e. at most the scale-1 box) and at
# least 0.3, which still holds a digit the scale-1 crop has centred; tighter cuts the digit.
HALF_SIDE_BOUNDS = ((0.12, 0.3), (0.3, 0.5))
# Every scale reads the input through one fixed Gaussian low-pass (sigma in input pixels). Why: a crop's
# pixels move with its box at the rate of the source's image gradient, and pixel noise makes that gradient
# large; the next scale (and its APN, whose box then moves too) amplifies it. Unfiltered, boxes 1e-7
# apart between runtimes moved the finest scale's logits by up to 3e-4 (the 1e-4 parity bar). Filtering
# before the crops cut that 10x (measured, trained). Filtering only the crops' source would handicap the
# finer scales against scale 1 (measured: finest 97.45% < scale-1 97.95%), so scale 1 reads it too.
INPUT_BLUR_SIGMA = 1.0


def _cell_centres(n: int, like: torch.Tensor) -> torch.Tensor:
    """(k+0.5)/n for k < n: normalized centres of n feature cells (n is symbolic under export)."""
    return (torch.arange(n, device=like.device, dtype=like.dtype) + 0.5) / n


class AttentionProposal(nn.Module):
    """Box (tx, ty, tl) in [0, 1] of the scale's own image, from its (detached) feature map."""

    def __init__(self, channels: int, min_half: float, max_half: float) -> None:
        super().__init__()
        self.min_half, self.max_half = min_half, max_half
        self.heat = nn.Conv2d(channels, 1, 1)  # where to look: soft-argmax of this map
        self.side = nn.Linear(channels, 1)  # how close: sigmoid mapped into [min_half, max_half]
        nn.init.zeros_(self.heat.weight)  # start centred (uniform heat map)
        nn.init.zeros_(self.heat.bias)

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        heat = self.heat(feat)  # [B,1,h,w]
        prob = torch.softmax(heat.flatten(1), dim=1).unflatten(1, heat.shape[1:])  # [B,1,h,w]
        cx = (prob.sum(dim=(1, 2)) * _cell_centres(feat.shape[-1], feat)).sum(1, keepdim=True)  # [B,1]
        cy = (prob.sum(dim=(1, 3)) * _cell_centres(feat.shape[-2], feat)).sum(1, keepdim=True)
        tl = self.min_half + (self.max_half - self.min_half) * torch.sigmoid(self.side(feat.mean(dim=(2, 3))))
        # Keep the whole box inside the image: centre in [tl, 1 - tl].
        cx = torch.minimum(torch.maximum(cx, tl), 1.0 - tl)
        cy = torch.minimum(torch.maximum(cy, tl), 1.0 - tl)
        return torch.cat((cx, cy, tl), dim=1)


class GaussianBlur(nn.Module):
    """Fixed (not trained) separable Gaussian low-pass per channel; exports as two plain Conv nodes."""

    def __init__(self, sigma: float) -> None:
        super().__init__()
        self.radius = max(1, int(np.ceil(3 * sigma)))
        t = torch.arange(-self.radius, self.radius + 1, dtype=torch.float32)
        kernel = torch.exp(-(t**2) / (2 * sigma**2))
        self.register_buffer("kernel", kernel / kernel.sum(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, r = x.shape[1], self.radius
        k = self.kernel.to(x.dtype)
        x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), padding=(0, r), groups=c)
        return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), padding=(r, 0), groups=c)


def _compose(outer: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """A box given in the zoom of ``outer`` -> the same box in ``outer``'s image coordinates."""
    ox, oy, ol = outer.unbind(1)
    ix, iy, il = inner.unbind(1)
    # zoom coordinate p in [0,1] maps to ox + ol*(2p - 1)
    return torch.stack((ox + ol * (2 * ix - 1), oy + ol * (2 * iy - 1), 2 * ol * il), dim=1)


def _corners(box: torch.Tensor) -> torch.Tensor:
    """(tx, ty, tl) -> (x0, y0, x1, y1)."""
    tx, ty, tl = box.unbind(1)
    return torch.stack((tx - tl, ty - tl, tx + tl, ty + tl), dim=1)


class RACNN(nn.Module):
    """Returns (fused logits [B,10], scale logits [B,3,10], APN boxes [B,2,4] in input coordinates)."""

    def __init__(self, num_classes: int = 10, bounds=HALF_SIDE_BOUNDS, in_chans: int = 1) -> None:
        super().__init__()
        self.scales = nn.ModuleList(SmallCNN(num_classes, in_chans=in_chans) for _ in range(NUM_SCALES))
        c = self.scales[0].out_channels
        self.apns = nn.ModuleList(AttentionProposal(c, lo, hi) for lo, hi in bounds)
        self.fuse = nn.Linear(NUM_SCALES * c, num_classes)
        self.input_blur = GaussianBlur(INPUT_BLUR_SIGMA)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.input_blur(image)
        pooled, logits, boxes = [], [], []
        box_in_input = None
        for s, net in enumerate(self.scales):
            feat = net.features(x)
            p = feat.mean(dim=(2, 3))
            pooled.append(p)
            logits.append(net.fc(p))
            if s < len(self.apns):
                box = self.apns[s](feat.detach())
                box_in_input = box if box_in_input is None else _compose(box_in_input, box)
                boxes.append(_corners(box_in_input))
                x = crop_zoom(x, box)
        fused = self.fuse(torch.cat(pooled, dim=1))
        return fused, torch.stack(logits, dim=1), torch.stack(boxes, dim=1)


def racnn_loss(outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]):
    """Cross-entropy at every scale and on the fused logits, plus the inter-scale ranking loss.

    Both terms are bounded so that no scale is pushed to unbounded confidence. The paper's ranking loss
    max(0, p_s[y] - p_{s+1}[y] + margin) can never reach zero once p_s[y] > 1 - margin, so it drives the
    finest scale's logits up without end; large logits make that scale's output swing with the tiny
    box differences between runtimes (its image is a crop of a crop). Here the target p_s[y] + margin
    is capped at the confidence label smoothing aims for, and the cross-entropy is label-smoothed.
    """
    fused, scale_logits = outputs["logits"], outputs["scale_logits"]
    y = batch["label"]
    ce_scales = [F.cross_entropy(scale_logits[:, s], y, label_smoothing=LABEL_SMOOTHING) for s in range(NUM_SCALES)]
    ce_fused = F.cross_entropy(fused, y, label_smoothing=LABEL_SMOOTHING)
    p_true = torch.softmax(scale_logits, dim=-1).gather(2, y[:, None, None].expand(-1, NUM_SCALES, 1))[..., 0]
    # The coarser scale is detached: the ranking term should pull the finer scale (and the APN box
    # feeding it) up, never push the coarser classifier down.
    cap = 1.0 - LABEL_SMOOTHING * (1.0 - 1.0 / scale_logits.shape[-1])
    rank = sum(F.relu(torch.clamp(p_true[:, s].detach() + RANK_MARGIN, max=cap) - p_true[:, s + 1]).mean()
               for s in range(NUM_SCALES - 1))
    loss = sum(ce_scales) + ce_fused + rank
    log = {"loss": loss.item(), "rank": rank.item(), "acc": float((fused.argmax(1) == y).float().mean())}
    log.update({f"acc{s + 1}": float((scale_logits[:, s].argmax(1) == y).float().mean()) for s in range(NUM_SCALES)})
    return loss, log


def racnn_metrics(outputs: dict[str, np.ndarray], data: dict[str, np.ndarray]) -> dict[str, float]:
    fused, scale_logits, boxes = outputs["logits"], outputs["scale_logits"], outputs["boxes"]
    y = data["label"]
    m = {f"acc_scale{s + 1}": accuracy(scale_logits[:, s], y) for s in range(NUM_SCALES)}
    m["acc_fused"] = accuracy(fused, y)
    b1 = boxes[:, 0]  # scale-1 APN box, (x0, y0, x1, y1) of the canvas
    centre = (b1[:, :2] + b1[:, 2:]) / 2
    digit_centre = (data["box"][:, :2] + data["box"][:, 2:]) / 2
    m["box_center_err"] = float(np.linalg.norm(centre - digit_centre, axis=1).mean())
    m["center_inside_rate"] = float(np.all((digit_centre >= b1[:, :2]) & (digit_centre <= b1[:, 2:]), axis=1).mean())
    m["half_side_scale1"] = float(((b1[:, 2] - b1[:, 0]) / 2).mean())
    return m


def racnn_bars(m: dict[str, float]) -> list[str]:
    failed = []
    if m["acc_fused"] < 0.97:
        failed.append(f"fused accuracy {m['acc_fused']:.4f} < 0.97")
    if m[f"acc_scale{NUM_SCALES}"] < m["acc_scale1"]:
        failed.append(f"finest scale accuracy {m[f'acc_scale{NUM_SCALES}']:.4f} < scale-1 {m['acc_scale1']:.4f}")
    if m["box_center_err"] > 0.1:
        failed.append(f"scale-1 box centre error {m['box_center_err']:.4f} > 0.1 of the canvas")
    return failed


register_model(ModelSpec(
    name="racnn",
    family="racnn",
    builder=RACNN,
    description="RA-CNN: three scales of a small CNN, APN boxes zoomed with crop_zoom, fused logits",
    inputs=(image_input(),),
    outputs=(
        class_logits(),
        TensorSpec("scale_logits", (NUM_SCALES, 10), "float32", "logits",
                   "class logits of each scale (1 = full image, 3 = finest zoom)"),
        TensorSpec("boxes", (NUM_SCALES - 1, 4), "float32", "boxes",
                   "APN boxes of scales 1 and 2 as (x0, y0, x1, y1) normalized to the input image"),
    ),
    task=Classification(min_accuracy=0.97),
    train=TrainRecipe(steps=3000, batch_size=64, lr=3e-3, loss=racnn_loss, metrics=racnn_metrics),
    export=ExportOptions(opset=18, fp16_keep_fp32_ops=("GridSample",)),
    # Every output meets the default 1e-4 (reports/parity.json). Before the input low-pass the per-scale
    # logits did not (3.0e-4): see INPUT_BLUR_SIGMA.
    checks=Checks(bars=racnn_bars),
))
