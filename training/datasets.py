"""A spec's data, whatever its source: the generated digits (``training.data``) or a user's image tree
(``training.userdata``, a recipe ``data`` of ``folder:/root`` or ``cub:/root``). Every stage that needs a
split of a model's data (training, parity feeds, INT8 calibration and gate, sweeps) asks here."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from training import data, userdata
from training.registry import ModelSpec


@lru_cache(maxsize=4)
def user_dataset(source: str) -> userdata.Dataset:
    layout, root = userdata.parse_source(source)
    return userdata.scan(root, layout)


def split_for(spec: ModelSpec, split: str, n: int | None = None, canvas: int | None = None,
              seed: int | None = None) -> dict[str, np.ndarray]:
    """``n`` samples of ``split`` (``train`` or ``test``) at ``canvas`` px (default: the recipe's), with the
    recipe's seed unless ``seed`` is given. For a user tree, ``test`` is the held-out split through the spec's
    eval transform and ``n=None`` means every image."""
    r = spec.train
    canvas = canvas or r.canvas
    seed = r.seed if seed is None else seed
    if not userdata.is_user_source(r.data):
        return data.make_split(split, n or (r.train_size if split == "train" else r.test_size), canvas, seed, r.data)
    if split not in data.SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {data.SPLITS}")
    pre = spec.image_preprocess().at_size(canvas)
    return userdata.make_split(user_dataset(r.data), pre, split, n, seed, r.skip_bad_images)
