"""Calibration data: training-split images only (never test images), read through onnxruntime's
``CalibrationDataReader``.

The calibrator reads the first ``n_calibration`` training images (the images the model was trained on). The
probe compares calibration methods and keep-lists on ``selection`` images: training-split digits on layouts
drawn with another seed (``SELECTION_SEED``), so that no choice is made on the images the calibrator saw,
none on images the model was fitted to, and none on the test images the gate then measures. Measured why:
RA-CNN's per-scale top-1 agreed 99.87% on held-out images of the training layouts (seed 0) and 98.87% on the
test split; the images a model was fitted to have fewer near-ties and flatter the int8 graph.
"""

from __future__ import annotations

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from training.datasets import split_for
from training.feeds import sample_feeds
from training.registry import ModelSpec

BATCH = 32  # images per calibration step (the calibrator's memory grows with it)
SELECTION_SEED = 1  # the training split's layouts are seed 0 (TrainRecipe.seed)


class TrainingImages(CalibrationDataReader):
    """Feeds ``BATCH`` samples at a time from named arrays. ``__len__``/``set_range`` let onnxruntime
    calibrate in strides (``CalibStridedMinMax``), so the histogram calibrators hold one stride of
    intermediate tensors at a time instead of every image's."""

    def __init__(self, feeds: dict[str, np.ndarray], batch: int = BATCH) -> None:
        self.feeds, self.batch = feeds, batch
        self.n = len(next(iter(feeds.values())))
        self.set_range(0, self.n)

    def __len__(self) -> int:
        return self.n

    def set_range(self, start_index: int, end_index: int) -> None:
        self.start, self.end = start_index, min(end_index, self.n)

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.start >= self.end:
            return None
        stop = min(self.start + self.batch, self.end)
        out = {k: np.ascontiguousarray(v[self.start:stop]) for k, v in self.feeds.items()}
        self.start = stop
        return out


def training_feeds(spec: ModelSpec, n_calibration: int, n_selection: int = 0) -> tuple[dict, dict]:
    """(calibration feeds, selection feeds) of the spec's inputs from the training split at the training
    canvas; ``n_calibration`` is rounded down to whole calibration batches."""
    n_cal = max(BATCH, n_calibration // BATCH * BATCH)
    cal = sample_feeds(spec, n_cal, spec.train.canvas, seed=spec.train.seed, split="train")
    sel = sample_feeds(spec, n_selection, spec.train.canvas, seed=SELECTION_SEED, split="train") if n_selection \
        else {k: v[:0] for k, v in cal.items()}
    return cal, sel


def selection_data(spec: ModelSpec, n_selection: int) -> dict[str, np.ndarray]:
    """The selection images' labels and masks (the arrays ``training_feeds``'s selection feeds come from)."""
    return split_for(spec, "train", n_selection, seed=SELECTION_SEED)
