"""Models derived from a registered one for a user's image tree: same family and code, built for the tree's
channels, classes and input size (timm's ``create_model(name, in_chans=..., num_classes=...)``).

``python -m training FAMILY --data DIR --name NAME`` writes ``user_models/NAME.spec.json`` (the base model,
the tree, its classes, the input size, the normalisation measured on the training split, the tree's digest)
beside ``NAME.pt`` and ``NAME.json``. The registry loads every such file, so each later stage (export, the
repository generator, the server, the client) finds NAME like a registered model; nothing downstream knows
it was derived.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from training import paths
from training.images import ImagePreprocess
from training.specs import Dim, ModelSpec, TensorSpec
from training.tasks import Classification

SPEC_SUFFIX = ".spec.json"
IN_CHANS = 3  # every user image is converted to RGB
TRAIN_SAMPLES = (2_000, 10_000)  # random-resized crops drawn per training run: at least, at most
TRAIN_BYTES = 1.5e9  # and at most this much float32 of them


class DerivationError(ValueError):
    """One line: why a model cannot be derived from this base (its inputs, its task)."""


def spec_path(name: str) -> Path:
    return paths.USER_MODELS_DIR / f"{name}{SPEC_SUFFIX}"


def _scaled(d: Dim, r: float) -> Dim:
    return Dim(d.name, max(1, round(d.min * r)), max(1, round(d.opt * r)), max(1, round(d.max * r)))


def image_side(spec: ModelSpec) -> int:
    t = spec.image_input
    if t is None:
        raise DerivationError(f"model {spec.name!r} cannot be trained on image files: it takes "
                              f"{[i.name for i in spec.inputs]} (a derived model needs one image input, every other "
                              "input optional)")
    opt = [a.opt for a in t.axes[1:] if isinstance(a, Dim)]
    if not opt:
        raise DerivationError(f"model {spec.name!r}: its image input has no dynamic height/width")
    return opt[0]


def _num_classes(spec: ModelSpec) -> int:
    logits = [o for o in spec.outputs if o.kind == "logits"]
    if not isinstance(spec.task, Classification) or not logits:
        raise DerivationError(f"model {spec.name!r} is a {spec.task.name} model; image folders carry class labels "
                              "only (derive a classification model)")
    return int(logits[0].axes[-1])


def _tensor(t: TensorSpec, r: float, base_classes: int, num_classes: int, in_chans: int) -> TensorSpec:
    axes: list[int | Dim] = [_scaled(a, r) if isinstance(a, Dim) else a for a in t.axes]
    if t.kind == "image" and axes:
        axes[0] = in_chans
    if t.kind == "logits" and axes and axes[-1] == base_classes:
        axes[-1] = num_classes
    # Integer inputs that name a class (e.g. a target class) range over the new classes.
    value_range = t.value_range
    if t.kind != "image" and t.dtype.startswith("int") and t.value_range[1] == base_classes - 1:
        value_range = (t.value_range[0], num_classes - 1)
    return dataclasses.replace(t, axes=tuple(axes), value_range=value_range,
                               description=t.description.replace("digits 0-9", f"{num_classes} classes"))


def train_samples(num_images: int, size: int) -> int:
    per_sample = IN_CHANS * size * size * 4
    return int(min(TRAIN_SAMPLES[1], max(TRAIN_SAMPLES[0], 20 * num_images), TRAIN_BYTES // per_sample))


def derive_spec(base: ModelSpec, info: dict[str, Any]) -> ModelSpec:
    """The spec of a derived model from its base spec and its ``.spec.json`` content."""
    size = int(info["size"])
    classes = tuple(info["classes"])
    r = size / image_side(base)
    base_classes = _num_classes(base)
    k = len(classes)
    inputs = tuple(_tensor(t, r, base_classes, k, IN_CHANS) for t in base.inputs)
    outputs = tuple(_tensor(t, r, base_classes, k, IN_CHANS) for t in base.outputs)
    base_builder = base.builder

    def build(in_chans: int = IN_CHANS, num_classes: int = k, base_model: str = base.name, **kw: Any):
        return base_builder(in_chans=in_chans, num_classes=num_classes, **kw)

    build.__module__ = base_builder.__module__  # the fingerprint hashes the family's code, not this file's
    side = image_side(dataclasses.replace(base, inputs=inputs))
    dims = [a for a in inputs[0].axes if isinstance(a, Dim)]
    second = min(round(side * 1.25), min(d.max for d in dims))
    recipe = dataclasses.replace(
        base.train, data=info["data"], data_digest=info["data_digest"], canvas=size, seed=int(info.get("seed", 0)),
        steps=int(info["steps"]) if info.get("steps") else base.train.total_steps, stages=(),
        train_size=int(info["train_size"]), test_size=int(info["test_size"]),
        skip_bad_images=bool(info.get("skip_bad_images", False)),
        # A base's extra metrics may read arrays a folder tree lacks (RA-CNN's box IoU needs boxes).
        metrics=base.train.metrics if info.get("has_boxes") else None)
    if base.train.stages and not info.get("steps"):
        recipe = dataclasses.replace(recipe, stages=base.train.stages, steps=base.train.steps)
    elif base.train.stages:  # the base's stages scaled to the requested steps
        total = sum(st.steps for st in base.train.stages)
        recipe = dataclasses.replace(recipe, stages=tuple(
            dataclasses.replace(st, steps=max(1, round(st.steps * int(info["steps"]) / total)))
            for st in base.train.stages))
    return dataclasses.replace(
        base, name=info["name"], builder=build, inputs=inputs, outputs=outputs,
        description=f"{base.name} trained on {info['data']} ({k} classes, {size} px)",
        task=dataclasses.replace(base.task, min_accuracy=0.0),  # a user's data has no bar of ours
        train=recipe,
        checks=dataclasses.replace(base.checks, bars=None, parity_sides=tuple(sorted({side, second}))),
        graphs=tuple(dataclasses.replace(g, inputs=inputs, outputs=outputs) for g in base.graphs)
        if len(base.graphs) == 1 else base.graphs,
        preprocess=ImagePreprocess(size, IN_CHANS, None, tuple(info["mean"]), tuple(info["std"])),
        class_names=classes,
        extra={**base.extra, "derived_from": base.name, "data": info["data"]})


def check_shapes(spec: ModelSpec) -> None:
    """Build the derived model and run it at each parity side: every output must have the spec's shape (a
    family whose outputs do not scale with its input as the spec's Dims say is refused here, not at export)."""
    import torch

    model = spec.builder().eval()
    for side in spec.checks.parity_sides:
        x = torch.zeros(2, *spec.inputs[0].concrete(side))
        with torch.no_grad():
            outs = model(*([x] + [torch.from_numpy(t.default_batch(2)) for t in spec.inputs[1:]]))
        for o, got in zip(spec.outputs, outs, strict=True):
            shape = tuple(got.shape[1:])
            ok = len(shape) == len(o.axes) and all(isinstance(a, Dim) or a == s
                                                   for a, s in zip(o.axes, shape, strict=False))
            if not ok:
                raise DerivationError(f"model {spec.name!r} ({spec.extra['derived_from']}) at {side} px: output "
                                      f"{o.name!r} has shape {shape} per sample, the derived spec says {o.shape}")


def write_spec(info: dict[str, Any]) -> Path:
    p = spec_path(info["name"])
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(info, indent=2) + "\n")
    return p


def user_spec_files() -> list[Path]:
    d = paths.USER_MODELS_DIR
    return sorted(d.glob(f"*{SPEC_SUFFIX}")) if d.is_dir() else []


def load_user_spec(path: Path, base: ModelSpec) -> ModelSpec:
    return derive_spec(base, json.loads(path.read_text()))


RESERVED_SUFFIXES = ("_image", "_preprocess", "_int8", "_trt")
