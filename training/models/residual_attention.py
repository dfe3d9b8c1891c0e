"""Residual Attention Network ("Residual Attention Network for Image Classification", Wang et al. 2017).

An attention module has a trunk branch T(x) (residual units) and a soft-mask branch M(x): bottom-up
max-pooling with residual units, top-down bilinear up-sampling with a skip connection at every matching
resolution, two 1x1 convolutions and a normalisation. Attention residual learning: H = (1 + M) * T, so a
mask near zero keeps the trunk's features instead of erasing them (plain M * T is the paper's ablation).

The three normalisations of the paper's section 3.3 (``mask_norm``):
  mixed    sigmoid at every channel and position                    f1
  channel  L2 normalisation over the channels at each position      f2
  spatial  each channel's map standardised by its own mean and std, then sigmoid   f3

In miniature of Attention-56 (each stage: pre unit p=0, trunk t=1, mask units r=1, basic pre-activation
units instead of bottlenecks, to train in minutes on 2 cores): the small CNN's stem (1/4 resolution, 32
channels) -> a module whose mask pools twice (1/16) -> residual unit to 64 channels at 1/8 -> a module
whose mask pools once -> global average pool -> FC.

Export: every up-sampling takes its size from the runtime shape of the tensor it is added to (the popular
public implementation's fixed-size ``UpsamplingBilinear2d`` pins the resolution). Pools are 3x3, stride 2,
padding 1 (ceil(n/2)), so at odd sizes the down- and up-sampling do not round-trip (72 px: 18 -> 9 -> 5 ->
9 -> 18), which the parity check at 72 px exercises.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from training.models.common import conv_bn_relu
from training.registry import (
    Checks,
    Dim,
    ModelSpec,
    TensorSpec,
    TrainRecipe,
    class_logits,
    image_input,
    register_model,
)
from training.tasks import Classification

MASK_NORMS = ("mixed", "channel", "spatial")
EPS = 1e-5


def normalise_mask(x: torch.Tensor, mode: str) -> torch.Tensor:
    """The paper's f1/f2/f3 on mask logits [B, C, H, W]."""
    if mode == "mixed":
        return torch.sigmoid(x)
    if mode == "channel":
        return x / (x.pow(2).sum(dim=1, keepdim=True) + EPS).sqrt()
    if mode == "spatial":
        mean = x.mean(dim=(2, 3), keepdim=True)
        var = (x - mean).pow(2).mean(dim=(2, 3), keepdim=True)
        return torch.sigmoid((x - mean) / (var + EPS).sqrt())
    raise ValueError(f"unknown mask normalisation {mode!r}; expected one of {MASK_NORMS}")


class ResidualUnit(nn.Module):
    """Pre-activation basic residual unit (BN-ReLU-conv3x3 twice), 1x1 projection when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1, self.bn2 = nn.BatchNorm2d(cin), nn.BatchNorm2d(cout)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.bn1(x))
        skip = self.shortcut(a) if self.shortcut is not None else x
        return self.conv2(F.relu(self.bn2(self.conv1(a)))) + skip


def _pool(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, 3, 2, 1)


def _resize_like(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


class SoftMaskBranch(nn.Module):
    """Bottom-up (``depth`` max-pools, a residual unit after each), top-down (bilinear up-sampling to the
    skip's runtime size + the skip, a residual unit), up to the input's size, two 1x1 convs, normalisation."""

    def __init__(self, channels: int, depth: int, mask_norm: str) -> None:
        super().__init__()
        if mask_norm not in MASK_NORMS:
            raise ValueError(f"unknown mask normalisation {mask_norm!r}; expected one of {MASK_NORMS}")
        if depth < 1:
            raise ValueError(f"soft-mask depth must be >= 1, got {depth}")
        self.mask_norm = mask_norm
        self.down = nn.ModuleList(ResidualUnit(channels, channels) for _ in range(depth))
        self.skips = nn.ModuleList(ResidualUnit(channels, channels) for _ in range(depth - 1))
        self.up = nn.ModuleList(ResidualUnit(channels, channels) for _ in range(depth - 1))
        self.head = nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True), nn.Conv2d(channels, channels, 1),
                                  nn.BatchNorm2d(channels), nn.ReLU(inplace=True), nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, skips = x, []
        for i, unit in enumerate(self.down):
            h = unit(_pool(h))
            if i < len(self.skips):
                skips.append(self.skips[i](h))
        for i in reversed(range(len(self.up))):
            h = self.up[i](_resize_like(h, skips[i]) + skips[i])
        return normalise_mask(self.head(_resize_like(h, x)), self.mask_norm)


class AttentionModule(nn.Module):
    """H = (1 + M) * T (``residual``), or M * T, or T alone (``use_mask=False``: naive stacking)."""

    def __init__(self, channels: int, depth: int, mask_norm: str = "mixed", residual: bool = True,
                 use_mask: bool = True) -> None:
        super().__init__()
        self.residual = residual
        self.trunk = ResidualUnit(channels, channels)
        self.mask = SoftMaskBranch(channels, depth, mask_norm) if use_mask else None
        self.post = ResidualUnit(channels, channels)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.trunk(x)
        if self.mask is None:
            return self.post(t), torch.zeros_like(t[:, :1])
        m = self.mask(x)
        return self.post((1 + m) * t if self.residual else m * t), m


class ResidualAttentionNet(nn.Module):
    """Stem to 1/4 (32 ch) -> module (mask depth 2) -> unit to 1/8 (64 ch) -> module (mask depth 1) -> FC.
    Returns (logits, the last module's mask averaged over channels [B, 1, H/8, W/8])."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1, mask_norm: str = "mixed", residual: bool = True,
                 use_mask: bool = True, widths: tuple[int, int, int] = (16, 32, 64)) -> None:
        super().__init__()
        c1, c2, c3 = widths
        self.stem = nn.Sequential(conv_bn_relu(in_chans, c1), nn.MaxPool2d(2), conv_bn_relu(c1, c2), nn.MaxPool2d(2))
        self.stage1 = AttentionModule(c2, 2, mask_norm, residual, use_mask)
        self.down = ResidualUnit(c2, c3, stride=2)
        self.stage2 = AttentionModule(c3, 1, mask_norm, residual, use_mask)
        self.norm = nn.Sequential(nn.BatchNorm2d(c3), nn.ReLU(inplace=True))
        self.fc = nn.Linear(c3, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, _ = self.stage1(self.stem(x))
        h, mask = self.stage2(self.down(h))
        return self.fc(self.norm(h).mean(dim=(2, 3))), mask.mean(dim=1, keepdim=True)


def residual_attention(mask_norm: str = "mixed", residual: bool = True, use_mask: bool = True,
                       num_classes: int = 10, in_chans: int = 1) -> ResidualAttentionNet:
    return ResidualAttentionNet(num_classes, in_chans, mask_norm, residual, use_mask)


# The last module works at 1/8 of the 48-96 px input (the stem floors twice, the unit's stride-2 conv ceils).
MASK_GRID = Dim("mask_rows", 6, 8, 12), Dim("mask_cols", 6, 8, 12)
RECIPE = TrainRecipe(steps=1500, batch_size=64, lr=3e-3)


def variant_spec(mask_norm: str = "mixed", residual: bool = True, use_mask: bool = True,
                 name: str = "residual_attention") -> ModelSpec:
    """The served spec, or (other arguments) one of the paper's ablations for ``bench.studies``."""
    return ModelSpec(
        name=name,
        family="residual_attention",
        builder=lambda n=mask_norm, r=residual, u=use_mask, **kw: residual_attention(n, r, u, **kw),
        description="Residual Attention Network in miniature: two attention modules with soft-mask branches, "
                    f"{mask_norm} normalisation, H = {'(1 + M) * T' if residual else 'M * T'}",
        inputs=(image_input(),),
        outputs=(class_logits(),
                 TensorSpec("soft_mask", (1, *MASK_GRID), "float32", "map",
                            "the last attention module's soft mask M (1/8 resolution), mean over channels")),
        task=Classification(min_accuracy=0.96),
        train=RECIPE,
        # 72 px: the masks' pools do not round-trip (18 -> 9 -> 5 -> 9), so sizes frozen at export would show.
        checks=Checks(parity_sides=(64, 72)),
    )


register_model(variant_spec())
