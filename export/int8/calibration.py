"""Calibration data: training-split images only (never test images), read through onnxruntime's
``CalibrationDataReader``.

The training split is cut in two: the first ``n_calibration`` images feed the calibrator, the next ones
(``selection``) are where the probe compares calibration methods and keep-lists, so that no choice is
made on the images the calibrator saw, and none on the test images the gate then measures.
"""

from __future__ import annotations

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from training.feeds import sample_feeds
from training.registry import ModelSpec

BATCH = 32  # images per calibration step (the calibrator's memory grows with it)


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
    feeds = sample_feeds(spec, n_cal + n_selection, spec.train.canvas, split="train")
    return {k: v[:n_cal] for k, v in feeds.items()}, {k: v[n_cal:] for k, v in feeds.items()}
