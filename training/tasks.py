"""Tasks and output kinds: what a model's outputs mean, and so how each stage treats them.

- An **output kind** (``TensorSpec.kind``) says how one output is compared and shown: the agreement rule
  that parity and FP16 gates apply beside the max abs error (top-1 for class logits of any rank,
  per-pixel argmax for segmentation logits, none for maps and boxes) and how a client presents one
  sample of it. Kinds are looked up by name, so the name travels in Triton's config (``output_kinds``) and
  a client with no torch presents a new model's outputs with no code of its own.
- A **task** (``ModelSpec.task``) is the kind of problem: the default loss, the test metrics and the bars
  (accuracy for classification, mean IoU for segmentation), all on the output it names.

numpy only at import time: the client and the repository generator import this module, torch is
imported inside the losses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

# ------------------------------------------------------------------------------------------ output kinds


def _softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


# Colours of segmentation classes (0 = background black), repeated for more classes; tab10-like.
PALETTE = np.array([[0, 0, 0], [31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189],
                    [140, 86, 75], [227, 119, 194], [127, 127, 127], [188, 189, 34], [23, 190, 207]], np.uint8)


def heat(a: np.ndarray) -> np.ndarray:
    """A [H, W] map scaled to its own range -> RGB uint8 (black -> red -> yellow -> white)."""
    a = np.asarray(a, np.float64)
    t = (a - a.min()) / (np.ptp(a) or 1.0)
    return (np.clip(np.stack([3 * t, 3 * t - 1, 3 * t - 2], -1), 0, 1) * 255).astype(np.uint8)


class OutputKind:
    """How one output is compared and presented. Subclasses set ``name`` and override what differs."""

    name: ClassVar[str] = "tensor"
    # Axis of the per-batch array whose argmax is the answer; None: no agreement rule (max abs only).
    argmax_axis: ClassVar[int | None] = None

    def agreement(self, ref: np.ndarray, got: np.ndarray) -> float | None:
        """Fraction of answers (argmax over ``argmax_axis``) that agree; None where the kind has none."""
        if self.argmax_axis is None or ref.size == 0:
            return None
        return float(np.mean(ref.argmax(self.argmax_axis) == got.argmax(self.argmax_axis)))

    def present(self, sample: np.ndarray) -> dict[str, Any]:
        """One sample of the output as plain values (JSON-able)."""
        a = np.asarray(sample, dtype=np.float64)
        return {"shape": list(a.shape), "min": round(float(a.min()), 4) if a.size else None,
                "max": round(float(a.max()), 4) if a.size else None}

    def format(self, name: str, v: dict[str, Any]) -> str:
        return f"{name}: shape {v['shape']}, min {v['min']}, max {v['max']}"

    def render(self, sample: np.ndarray) -> np.ndarray | None:
        """One sample drawn as an RGB uint8 image [H, W, 3]; None where the kind is not drawn."""
        return None


class ClassLogits(OutputKind):
    """Class logits on the last axis; any rank ([C], or [S, C] per scale): top-1 agreement per row."""

    name = "logits"
    argmax_axis = -1

    def present(self, sample: np.ndarray) -> dict[str, Any]:
        a = np.asarray(sample, dtype=np.float64)
        p = _softmax(a)
        if a.ndim == 1:
            return {"prediction": int(a.argmax()), "probability": round(float(p.max()), 4)}
        return {"prediction": a.reshape(-1, a.shape[-1]).argmax(-1).tolist(),
                "probability": np.round(p.reshape(-1, a.shape[-1]).max(-1), 4).tolist()}

    def format(self, name: str, v: dict[str, Any]) -> str:
        if isinstance(v["prediction"], list):
            return f"{name}: predictions {v['prediction']}"
        return f"{name}: prediction {v['prediction']} (p={v['probability']:.3f})"


class SegmentationLogits(OutputKind):
    """Per-pixel class logits [C, H, W]: per-pixel argmax agreement (batch axis first, so axis 1)."""

    name = "segmentation"
    argmax_axis = 1

    def present(self, sample: np.ndarray) -> dict[str, Any]:
        labels = np.asarray(sample).argmax(0)
        classes, counts = np.unique(labels, return_counts=True)
        return {"shape": list(labels.shape),
                "pixels_per_class": {int(c): int(n) for c, n in zip(classes, counts, strict=True)}}

    def format(self, name: str, v: dict[str, Any]) -> str:
        return f"{name}: {v['shape'][0]}x{v['shape'][1]} mask, pixels per class {v['pixels_per_class']}"

    def render(self, sample: np.ndarray) -> np.ndarray:
        """The per-pixel argmax as a colour mask (``PALETTE``; class 0 black)."""
        labels = np.asarray(sample).argmax(0)
        return PALETTE[labels % len(PALETTE)]


class Boxes(OutputKind):
    """Boxes [..., 4] as (x0, y0, x1, y1) normalized to the input image: max abs only. An all-zero box is an unused
    slot of a fixed-size output (e.g. a proposal window that was not selected) and is not shown."""

    name = "boxes"

    def present(self, sample: np.ndarray) -> dict[str, Any]:
        a = np.asarray(sample, dtype=np.float64)
        boxes = a.reshape(-1, a.shape[-1])
        return {"boxes": np.round(boxes[np.any(boxes != 0, axis=1)], 4).tolist()}

    def format(self, name: str, v: dict[str, Any]) -> str:
        boxes = "; ".join("(" + ", ".join(f"{c:.3f}" for c in b) + ")" for b in v["boxes"])
        return f"{name} (x0, y0, x1, y1): {boxes}"


class AttentionMap(OutputKind):
    """A map that is only drawn (attention, part or saliency maps): max abs only; shown by its peak."""

    name = "map"

    def present(self, sample: np.ndarray) -> dict[str, Any]:
        a = np.asarray(sample, dtype=np.float64)
        flat = a.reshape(-1, *a.shape[-2:]) if a.ndim >= 2 else a.reshape(1, 1, -1)
        peaks = [list(np.unravel_index(int(m.argmax()), m.shape)) for m in flat]
        return {"shape": list(a.shape), "peak_yx": [[int(y), int(x)] for y, x in peaks],
                "min": round(float(a.min()), 4), "max": round(float(a.max()), 4)}

    def format(self, name: str, v: dict[str, Any]) -> str:
        return f"{name}: map {v['shape']}, peak (y, x) {v['peak_yx']}, range [{v['min']}, {v['max']}]"

    def render(self, sample: np.ndarray) -> np.ndarray:
        """Every channel as a heat map (each scaled to its own range), side by side with a 2 px white gap."""
        a = np.asarray(sample, dtype=np.float64)
        maps = a.reshape(-1, *a.shape[-2:]) if a.ndim >= 2 else a.reshape(1, 1, -1)
        gap = np.full((maps.shape[1], 2, 3), 255, np.uint8)
        return np.concatenate([x for m in maps for x in (heat(m), gap)][:-1], axis=1)


class SaliencyMap(AttentionMap):
    """A saliency map whose answer is where it points (the pointing game): agreement = the fraction of maps
    whose maximum is at the same position."""

    name = "saliency"

    def agreement(self, ref: np.ndarray, got: np.ndarray) -> float | None:
        if ref.size == 0:
            return None
        n = ref.shape[0]
        return float(np.mean(ref.reshape(n, -1).argmax(1) == got.reshape(n, -1).argmax(1)))


class Image(OutputKind):
    name = "image"


_KINDS: dict[str, OutputKind] = {k.name: k() for k in (OutputKind, ClassLogits, SegmentationLogits, Boxes,
                                                        AttentionMap, SaliencyMap, Image)}


def output_kind(name: str) -> OutputKind:
    """The kind registered as ``name``; an unknown name is presented as a plain tensor."""
    return _KINDS.get(name, _KINDS["tensor"])


def known_kinds() -> tuple[str, ...]:
    return tuple(_KINDS)


# ------------------------------------------------------------------------------------------------ tasks


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of class logits (classes on the last axis)."""
    return float((logits.argmax(-1) == labels).mean())


@dataclass(frozen=True)
class Classification:
    """One label per image, read from the ``output`` logits: cross-entropy, test accuracy, a minimum bar."""

    output: str = "logits"
    min_accuracy: float = 0.95
    label_smoothing: float = 0.0
    name: ClassVar[str] = "classification"

    def loss(self, outputs: dict[str, Any], batch: dict[str, Any]) -> tuple[Any, dict[str, float]]:
        import torch.nn.functional as F

        logits = outputs[self.output]
        loss = F.cross_entropy(logits, batch["label"], label_smoothing=self.label_smoothing)
        return loss, {"loss": loss.item(), "acc": float((logits.argmax(-1) == batch["label"]).float().mean())}

    def metrics(self, outputs: dict[str, np.ndarray], data: dict[str, np.ndarray]) -> dict[str, float]:
        return {"accuracy": accuracy(outputs[self.output], data["label"])}

    def bars(self, metrics: dict[str, float]) -> list[str]:
        acc = metrics["accuracy"]
        return [] if acc >= self.min_accuracy else [f"test accuracy {acc:.4f} < {self.min_accuracy}"]


def confusion(pred: np.ndarray, target: np.ndarray, num_classes: int) -> np.ndarray:
    idx = target.astype(np.int64).ravel() * num_classes + pred.astype(np.int64).ravel()
    return np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_per_class(conf: np.ndarray) -> np.ndarray:
    """IoU of each class from a confusion matrix; NaN for a class absent from both prediction and truth."""
    tp = np.diag(conf).astype(np.float64)
    union = conf.sum(0) + conf.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


@dataclass(frozen=True)
class Segmentation:
    """Per-pixel labels (``mask``) read from the ``output`` logits [C, H, W]: per-pixel cross-entropy,
    mean IoU over the classes present, a minimum bar."""

    output: str = "segmentation"
    num_classes: int = 11
    min_mean_iou: float = 0.5
    name: ClassVar[str] = "segmentation"

    def loss(self, outputs: dict[str, Any], batch: dict[str, Any]) -> tuple[Any, dict[str, float]]:
        import torch.nn.functional as F

        logits = outputs[self.output]
        loss = F.cross_entropy(logits, batch["mask"].long())
        return loss, {"loss": loss.item(), "pix_acc": float((logits.argmax(1) == batch["mask"]).float().mean())}

    def metrics(self, outputs: dict[str, np.ndarray], data: dict[str, np.ndarray]) -> dict[str, float]:
        pred = outputs[self.output].argmax(1)
        iou = iou_per_class(confusion(pred, data["mask"], self.num_classes))
        m = {"mean_iou": float(np.nanmean(iou)), "pixel_accuracy": float((pred == data["mask"]).mean())}
        m.update({f"iou_{c}": float(v) for c, v in enumerate(iou) if np.isfinite(v)})
        return m

    def bars(self, metrics: dict[str, float]) -> list[str]:
        miou = metrics["mean_iou"]
        return [] if miou >= self.min_mean_iou else [f"test mean IoU {miou:.4f} < {self.min_mean_iou}"]


Task = Classification | Segmentation
