"""Cluttered digits: real handwritten digits (scikit-learn's ``load_digits``) on a larger canvas.

Two sources (``make_split(..., source=)``, a recipe's ``data``):

- ``digits``: each sample is one digit scaled to 14-28 px at a random position, plus clutter fragments cut
  from other digits and Gaussian noise, so that a model has to find the digit before it can read it (what
  the attention mechanisms are for).
- ``multiscale``: one to three digits per image, each 10-56 px (log-uniform), placed without overlapping
  (a digit with no free place is left out), over the same clutter: the segmentation split, where the best
  scale to read a pixel at differs from digit to digit.

Everything is deterministic from (source, split, n, canvas, seed), and the train and test splits draw
from disjoint source digits.
"""

from __future__ import annotations

from functools import cache, lru_cache

import numpy as np
from PIL import Image

DIGIT_SIZE = (14, 28)
CLUTTER = (4, 8)
FRAGMENT = (5, 10)
NOISE = 0.05
TEST_FRACTION = 0.25
SPLITS = ("train", "test")
SOURCES = ("digits", "multiscale")
MULTI_DIGITS = (1, 3)
MULTI_SIZE = (10, 56)
MASK_THRESHOLD = 0.35  # a digit's pixels above this (of 1) are its mask


@lru_cache(maxsize=1)
def _source_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)


def split_indices(split: str) -> np.ndarray:
    images, _ = _source_digits()
    order = np.random.default_rng(12345).permutation(len(images))  # fixed: splits never overlap
    n_test = int(len(images) * TEST_FRACTION)
    return order[:n_test] if split == "test" else order[n_test:]


@cache
def _scaled_digit(index: int, size: int) -> np.ndarray:
    img = _source_digits()[0][index]
    return np.asarray(Image.fromarray(img, mode="F").resize((size, size), Image.BILINEAR), dtype=np.float32)


def make_split(split: str, n: int, canvas: int = 64, seed: int = 0, source: str = "digits") -> dict[str, np.ndarray]:
    """Return ``image`` [n,1,H,W] float32 in [0,1], ``label`` [n], ``box`` [n,4] (x0,y0,x1,y1 in [0,1])
    and ``mask`` [n,H,W] uint8 (0 background, 1+class on the digits' pixels). With several digits per image
    (``multiscale``), ``label`` and ``box`` are the largest digit's."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if source not in SOURCES:
        raise ValueError(f"unknown data source {source!r}; expected one of {SOURCES}")
    largest = DIGIT_SIZE[1] if source == "digits" else 28
    if canvas < largest + 2:
        raise ValueError(f"canvas {canvas} is too small for digits up to {largest} px")
    # A copy: the cached arrays are shared by every caller in the process, and a caller that writes into
    # its split (a NaN for a bad-input test, say) must not change what the next caller evaluates on.
    return {k: v.copy() for k, v in _make_split(split, n, canvas, seed, source).items()}


def _paste_clutter(img: np.ndarray, pool: np.ndarray, rng: np.random.Generator) -> None:
    canvas = img.shape[-1]
    for _ in range(rng.integers(CLUTTER[0], CLUTTER[1] + 1)):
        src = _scaled_digit(int(rng.choice(pool)), int(rng.integers(*DIGIT_SIZE)))
        f = int(rng.integers(*FRAGMENT))
        sy, sx = rng.integers(0, src.shape[0] - f + 1, size=2)
        y, x = rng.integers(0, canvas - f + 1, size=2)
        np.maximum(img[y : y + f, x : x + f], src[sy : sy + f, sx : sx + f], out=img[y : y + f, x : x + f])


def _paste_digit(img: np.ndarray, mask: np.ndarray, index: int, size: int, rng: np.random.Generator,
                 at: tuple[int, int] | None = None) -> np.ndarray:
    """Paste digit ``index`` at ``size`` px at ``at`` (y, x) or a random position (clipped to the canvas); write
    its class into ``mask`` (a later digit overwrites an earlier one where they overlap); return its box in
    [0, 1]."""
    canvas = img.shape[-1]
    digit = _scaled_digit(index, size)
    y, x = at if at is not None else rng.integers(0, max(1, canvas - size + 1), size=2)
    digit = digit[: canvas - y, : canvas - x]
    region = img[y : y + digit.shape[0], x : x + digit.shape[1]]
    np.maximum(region, digit, out=region)
    on = digit > MASK_THRESHOLD
    mask[y : y + digit.shape[0], x : x + digit.shape[1]][on] = 1 + _source_digits()[1][index]
    ys, xs = np.nonzero(on)
    return np.array([(x + xs.min()) / canvas, (y + ys.min()) / canvas, (x + xs.max() + 1) / canvas,
                     (y + ys.max() + 1) / canvas], np.float32)


def _free_place(taken: list[tuple[int, int, int]], size: int, canvas: int, rng: np.random.Generator,
                tries: int = 20) -> tuple[int, int] | None:
    """A random (y, x) where a ``size`` square overlaps none of ``taken``: digits blended by max are unreadable
    where their strokes cross, so they do not overlap."""
    for _ in range(tries):
        y, x = (int(v) for v in rng.integers(0, canvas - size + 1, size=2))
        if all(y + size <= ty or ty + ts <= y or x + size <= tx or tx + ts <= x for ty, tx, ts in taken):
            return y, x
    return None


@lru_cache(maxsize=8)
def _make_split(split: str, n: int, canvas: int, seed: int, source: str) -> dict[str, np.ndarray]:
    targets = _source_digits()[1]
    pool = split_indices(split)
    # Distinct streams per split so that train/test never share a layout either (and per source beyond the
    # first, whose stream is what the shipped weights were trained on).
    key = [seed, SPLITS.index(split), canvas] + ([SOURCES.index(source)] if source != "digits" else [])
    rng = np.random.default_rng(key)
    images = np.zeros((n, 1, canvas, canvas), np.float32)
    masks = np.zeros((n, canvas, canvas), np.uint8)
    labels = np.zeros(n, np.int64)
    boxes = np.zeros((n, 4), np.float32)
    for k in range(n):
        _paste_clutter(images[k, 0], pool, rng)
        if source == "digits":
            i = int(rng.choice(pool))
            boxes[k] = _paste_digit(images[k, 0], masks[k], i, int(rng.integers(DIGIT_SIZE[0], DIGIT_SIZE[1] + 1)),
                                    rng)
            labels[k] = targets[i]
            continue
        count = int(rng.integers(MULTI_DIGITS[0], MULTI_DIGITS[1] + 1))
        lo, hi = np.log(MULTI_SIZE[0]), np.log(MULTI_SIZE[1] + 1)
        sizes = sorted((min(int(np.exp(rng.uniform(lo, hi))), MULTI_SIZE[1]) for _ in range(count)), reverse=True)
        taken: list[tuple[int, int, int]] = []  # (y, x, size) of the digits placed
        for size in sizes:  # largest first; a digit that finds no free place is left out
            at = _free_place(taken, size, canvas, rng)
            if at is None:
                continue
            i = int(rng.choice(pool))
            box = _paste_digit(images[k, 0], masks[k], i, size, rng, at)
            if not taken:
                boxes[k], labels[k] = box, targets[i]
            taken.append((*at, size))
    images += rng.normal(0.0, NOISE, images.shape).astype(np.float32)
    np.clip(images, 0.0, 1.0, out=images)
    return {"image": images, "label": labels, "box": boxes, "mask": masks}


def test_images(n: int, canvas: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Real test-split images and labels: what parity checks and clients send."""
    d = make_split("test", n, canvas, seed)
    return d["image"], d["label"]


def save_sample_grid(path, n: int = 16, canvas: int = 64, seed: int = 0) -> None:
    """A PNG grid of training samples with their digit boxes, for people to look at."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    d = make_split("train", n, canvas, seed)
    cols = 8
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.6, rows * 1.7))
    for k, ax in enumerate(np.atleast_1d(axes).ravel()):
        ax.axis("off")
        if k >= n:
            continue
        ax.imshow(d["image"][k, 0], cmap="gray", vmin=0, vmax=1)
        x0, y0, x1, y1 = d["box"][k] * canvas
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, ec="lime", lw=1))
        ax.set_title(str(d["label"][k]), fontsize=8)
    fig.suptitle("cluttered digits (train split) with digit boxes")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
