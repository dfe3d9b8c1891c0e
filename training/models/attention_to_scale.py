"""Attention to Scale ("Attention to Scale: Scale-aware Semantic Image Segmentation", Chen et al. 2016).

One shared fully convolutional network runs on the image at several scales (1, 0.75, 0.5 here); each
scale's score map is resized to a common grid (scale 1's output, 1/4 of the input); an attention head (two
layers over the scales' concatenated features) gives one weight map per scale, a softmax over the scales
at every pixel, and the merged score map is the weighted sum. Merged scores and weights are up-sampled to
the input size. Extra supervision: a cross-entropy on every scale's own score map beside the merged one,
which the paper finds essential (without it the attention learns little).

The merges compared in ``bench.studies attention_to_scale`` (``merge``): ``attention`` (served),
``average`` and ``max`` pooling over the scales (the paper's baselines), and a single scale.

Export: every resize takes its size from the runtime shapes: the image is scaled with a scale factor
(``Resize`` with scales, so its output is floor(H * s) for any H), score maps and features are resized to
the runtime size of scale 1's map, and the outputs to the input's. ``int(h * s)`` in Python would freeze
the sizes of the export's example input, which the parity check at 80 and 96 px catches.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from training.models.common import conv_bn_relu
from training.registry import SIDE, Checks, ModelSpec, TensorSpec, TrainRecipe, image_input, register_model
from training.tasks import Segmentation

NUM_CLASSES = 11  # background + the ten digits
SCALES = (1.0, 0.75, 0.5)
MERGES = ("attention", "average", "max")
AUX_WEIGHT = 1.0  # weight of each scale's own cross-entropy (the paper's extra supervision)
# Per-class weights of the cross-entropy: background is ~88% of the pixels; mean IoU weighs every class alike.
DIGIT_WEIGHT = 3.0


def dilated(cin: int, cout: int, dilation: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=dilation, dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SharedFCN(nn.Module):
    """DeepLab in miniature: conv blocks to 1/4 resolution (fine features), a block to 1/8 and dilated 3x3
    convolutions (rates 2, 4) there for context (~140 px receptive field), brought back to 1/4 and fused with
    the fine features by a 1x1 convolution (DeepLabv3+'s decoder, cheapened), then a 1x1 classifier.
    Returns (features [B, C, H/4, W/4], class scores [B, K, H/4, W/4])."""

    def __init__(self, in_chans: int = 1, num_classes: int = NUM_CLASSES,
                 widths: tuple[int, int, int, int] = (16, 32, 96, 64)) -> None:
        super().__init__()
        c1, c2, c3, c4 = widths
        self.stem = nn.Sequential(conv_bn_relu(in_chans, c1), nn.MaxPool2d(2), conv_bn_relu(c1, c2), nn.MaxPool2d(2))
        self.context = nn.Sequential(nn.MaxPool2d(2), conv_bn_relu(c2, c3), dilated(c3, c3, 2), dilated(c3, c3, 4))
        self.fuse = nn.Sequential(nn.Conv2d(c2 + c3, c4, 1, bias=False), nn.BatchNorm2d(c4), nn.ReLU(inplace=True))
        self.classifier = nn.Conv2d(c4, num_classes, 1)
        self.out_channels = c4

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fine = self.stem(x)
        f = self.fuse(torch.cat([fine, resize_to(self.context(fine), fine)], 1))
        return f, self.classifier(f)


def resize_to(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Bilinear resize of ``x`` to the runtime spatial size of ``like`` (never a size frozen at export)."""
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


def merge_scales(scores: torch.Tensor, weights: torch.Tensor | None, merge: str) -> torch.Tensor:
    """Scores [B, S, K, h, w] merged over S: the attention-weighted sum (weights [B, S, h, w], a softmax over
    S at every pixel), or average or max pooling."""
    if merge == "attention":
        return (weights.unsqueeze(2) * scores).sum(1)
    if merge == "average":
        return scores.mean(1)
    if merge == "max":
        return scores.amax(1)
    raise ValueError(f"unknown merge {merge!r}; expected one of {MERGES}")


class AttentionToScale(nn.Module):
    """Returns (per-pixel class logits [B, K, H, W], per-scale weights [B, S, H, W]) at the input's size.
    ``training_outputs`` adds each scale's own logits (``scale_logits`` [B, S, K, H, W]) for the extra
    supervision."""

    def __init__(self, scales: tuple[float, ...] = SCALES, merge: str = "attention", in_chans: int = 1,
                 num_classes: int = NUM_CLASSES, hidden: int = 64) -> None:
        super().__init__()
        if merge not in MERGES:
            raise ValueError(f"unknown merge {merge!r}; expected one of {MERGES}")
        if not scales or scales[0] != 1.0:
            raise ValueError(f"scales must start with 1.0 (the common grid), got {scales}")
        self.scales, self.merge = tuple(scales), merge
        self.fcn = SharedFCN(in_chans, num_classes)
        c = self.fcn.out_channels
        # The paper's attention model: two layers on the scales' concatenated features, one output per scale
        # (1x1 then 3x3 here: a 3x3 first layer over S x C channels cost as much as the three FCNs together).
        self.attention = (nn.Sequential(nn.Conv2d(c * len(scales), hidden, 1), nn.ReLU(inplace=True),
                                        nn.Conv2d(hidden, len(scales), 3, padding=1))
                          if merge == "attention" and len(scales) > 1 else None)

    def _scales(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(scores [B, S, K, h, w], weights [B, S, h, w] or None, a tensor shaped like the weights) on scale 1's
        grid."""
        feats, scores = [], []
        for s in self.scales:
            xs = x if s == 1.0 else F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
            f, z = self.fcn(xs)
            if feats:  # onto scale 1's grid, whose runtime size is feats[0]'s
                f, z = resize_to(f, feats[0]), resize_to(z, feats[0])
            feats.append(f)
            scores.append(z)
        stacked = torch.stack(scores, 1)
        if self.attention is not None:
            return stacked, torch.softmax(self.attention(torch.cat(feats, 1)), dim=1), stacked[:, :, 0]
        return stacked, None, stacked[:, :, 0]

    def _outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scores, weights, like = self._scales(x)
        merged = merge_scales(scores, weights, self.merge) if len(self.scales) > 1 else scores[:, 0]
        if weights is None:  # pooling: every scale weighs the same in the output map
            weights = torch.full_like(like, 1.0 / len(self.scales))
        return resize_to(merged, x), resize_to(weights, x), scores

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, weights, _ = self._outputs(x)
        return logits, weights

    def training_outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        logits, weights, scores = self._outputs(x)
        b, s, k, h, w = scores.shape
        scale_logits = resize_to(scores.reshape(b, s * k, h, w), x).reshape(b, s, k, *x.shape[-2:])
        return {"logits": logits, "scale_weights": weights, "scale_logits": scale_logits}


def deeply_supervised_loss(outputs: dict[str, Any], batch: dict[str, Any]) -> tuple[Any, dict[str, float]]:
    """Cross-entropy of the merged logits plus ``AUX_WEIGHT`` times each scale's own (the paper's extra
    supervision), digit pixels weighted ``DIGIT_WEIGHT``; a single-scale model has no extra term."""
    target = batch["mask"].long()
    weight = torch.full((outputs["logits"].shape[1],), DIGIT_WEIGHT, device=target.device)
    weight[0] = 1.0
    merged = F.cross_entropy(outputs["logits"], target, weight=weight)
    loss = merged
    scale_logits = outputs.get("scale_logits")
    if scale_logits is not None and scale_logits.shape[1] > 1:
        loss = loss + AUX_WEIGHT * sum(F.cross_entropy(scale_logits[:, i], target, weight=weight)
                                       for i in range(scale_logits.shape[1]))
    return loss, {"loss": loss.item(), "merged": merged.item()}


def attention_to_scale(scales: tuple[float, ...] = SCALES, merge: str = "attention", in_chans: int = 1,
                       num_classes: int = NUM_CLASSES) -> AttentionToScale:
    return AttentionToScale(scales, merge, in_chans, num_classes)


RECIPE = TrainRecipe(steps=1600, batch_size=32, lr=3e-3, train_size=8000, test_size=1000, data="multiscale",
                     loss=deeply_supervised_loss, precision="bfloat16", channels_last=True)


def variant_spec(merge: str = "attention", scales: tuple[float, ...] = SCALES,
                 name: str = "attention_to_scale") -> ModelSpec:
    """The served spec, or (other arguments) one of the paper's baselines for ``bench.studies``."""
    how = {"attention": "a per-pixel softmax attention over scales", "average": "average pooling over scales",
           "max": "max pooling over scales"}[merge] if len(scales) > 1 else "a single scale"
    return ModelSpec(
        name=name,
        family="attention_to_scale",
        builder=lambda sc=scales, m=merge, **kw: attention_to_scale(sc, m, **kw),
        description=f"Attention to Scale: a shared dilated FCN at scales {', '.join(map(str, scales))} merged by "
                    f"{how}; per-pixel segmentation of digits (background + 10 classes)",
        inputs=(image_input(),),
        outputs=(TensorSpec("logits", (NUM_CLASSES, *SIDE), "float32", "segmentation",
                            "per-pixel class logits (0 background, 1 + digit)"),
                 TensorSpec("scale_weights", (len(scales), *SIDE), "float32", "map",
                            f"per-pixel weight of each scale ({', '.join(map(str, scales))}); sums to 1")),
        task=Segmentation(output="logits", num_classes=NUM_CLASSES, min_mean_iou=0.75),
        train=RECIPE,
        # 80 and 96 px besides the export's 64: sizes frozen at export would show (0.75 * 80 = 60, * 96 = 72).
        # Logits up to ~16 put 1e-4 at float32's noise floor: torch's own float32 result is 8.8e-5 from the
        # float64 one, onnxruntime's 4.8e-5, the two float32 runtimes 1.4e-4 apart (batch 64, 80 px). So 1e-4
        # holds against torch in float64, a measured 3e-4 against torch in float32; argmax agreement stays 100%.
        checks=Checks(parity_sides=(64, 80, 96), float64_reference=True, output_max_abs={"logits": 3e-4}),
    )


register_model(variant_spec())
