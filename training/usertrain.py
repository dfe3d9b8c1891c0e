"""Train a model derived for a user's image tree (``python -m training FAMILY --data DIR --name NAME``): resolve
the base model, scan the tree, measure its normalisation, write ``NAME.spec.json`` (``training.derived``),
register the spec and train it.

This sits above the registry and the training loop; ``training.derived`` (what the registry reads to load user
specs) sits below them, so that neither imports the other back.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from training import registry, userdata
from training.derived import (
    IN_CHANS,
    RESERVED_SUFFIXES,
    DerivationError,
    check_shapes,
    derive_spec,
    image_side,
    spec_path,
    train_samples,
    write_spec,
)
from training.images import ImagePreprocess
from training.registry import ModelSpec, get_spec, list_models
from training.train import train_model


def resolve_base(name: str) -> ModelSpec:
    """A registered model name, or a family with one model (``cnn``, ``racnn``, ``mhsa``...)."""
    if name in list_models():
        return get_spec(name)
    family = [m for m in list_models(family=name) if "derived_from" not in get_spec(m).extra]
    if len(family) == 1:
        return get_spec(family[0])
    if family:
        raise DerivationError(f"family {name!r} has several models, name one: {', '.join(family)}")
    zoo = [m for m in list_models() if "derived_from" not in get_spec(m).extra]
    raise DerivationError(f"unknown model or family {name!r}; known models: {', '.join(zoo)}")


def check_name(name: str) -> None:
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]{0,63}", name) or name.endswith(RESERVED_SUFFIXES):
        raise DerivationError(f"model name {name!r}: use letters, digits, '_' and '-', starting with a letter, "
                              f"not ending in {', '.join(RESERVED_SUFFIXES)}")
    if name in list_models() and not spec_path(name).exists():
        raise DerivationError(f"model name {name!r} is a model of the zoo; choose another --name")


def prepare_user_model(base_name: str, data: str | Path, name: str, layout: str | None = None,
                       size: int | None = None, steps: int | None = None, skip_bad_images: bool = False,
                       seed: int = 0, write: bool = True, extra: dict[str, Any] | None = None
                       ) -> tuple[ModelSpec, list[str]]:
    """Scan the tree, decode it (cached), measure its normalisation, write ``NAME.spec.json`` (unless not
    ``write``: a distributed job's other ranks) and register NAME; returns its spec and the bad images left out."""
    base = resolve_base(base_name)
    check_name(name)
    ds = userdata.scan(data, layout)
    size = size or image_side(base)
    pre = ImagePreprocess(size, IN_CHANS)
    bad: list[str] = []
    for split in ("train", "test"):
        _, _, b = userdata.load_resized(ds.split(split), pre.resize_side, IN_CHANS, skip_bad_images,
                                        desc=f"decode {split}")
        bad += b
    mean, std = userdata.channel_stats(ds, pre, skip_bad_images)
    n_test = len(ds.test) - sum(1 for b in bad if any(b.startswith(str(i.path)) for i in ds.test))
    info = {"name": name, "base": base.name, "data": ds.source, "layout": ds.layout, "size": size,
            "classes": list(ds.classes), "mean": list(mean), "std": list(std), "data_digest": ds.digest(),
            "has_boxes": ds.has_boxes, "train_images": len(ds.train), "test_images": len(ds.test),
            "train_size": train_samples(len(ds.train), size), "test_size": n_test, "steps": steps, "seed": seed,
            "skip_bad_images": skip_bad_images, "skipped": bad, **(extra or {})}
    spec = derive_spec(base, info)
    check_shapes(spec)
    if write:
        write_spec(info)
    registry.register_model(spec, replace=True)  # a retrained user model replaces its earlier spec
    registry.mark_user_spec_loaded(str(spec_path(name)))
    return spec, bad


def create_user_model(base_name: str, data: str | Path, name: str, layout: str | None = None,
                      size: int | None = None, steps: int | None = None, skip_bad_images: bool = False,
                      seed: int = 0, progress: bool = True, trainer: Callable[..., dict[str, Any]] = train_model,
                      write: bool = True, **train_kw: Any) -> dict[str, Any]:
    """Prepare NAME (``prepare_user_model``), train and save it with ``trainer`` (the one-process loop, or
    ``training.distributed.train_model`` under torchrun); returns the training record (with ``skipped``: the
    bad images left out)."""
    spec, bad = prepare_user_model(base_name, data, name, layout, size, steps, skip_bad_images, seed, write=write,
                                   extra=train_kw.pop("extra", None))
    record = trainer(spec, progress=progress, **train_kw)
    return {**record, "skipped": bad, "spec_file": str(spec_path(name))}
