"""Fine-tuning from a checkpoint (``python -m training FAMILY --data DIR --name NAME --init CHECKPOINT``).

``CHECKPOINT`` is a zoo model's name (its shipped weights, ``training/weights/<name>.pt``) or a state-dict file
in timm's layout for the same family: a flat ``{parameter name: tensor}``, or one under ``state_dict``/``model``/
``state_dict_ema``, with or without DDP's ``module.`` prefix (what ``torch.save(model.state_dict())``, timm's
``save_checkpoint`` and a DDP job write). Loading follows timm's ``load_pretrained``:

- the first convolution is adapted when the checkpoint's input channels differ from the model's (timm's
  ``adapt_input_conv``): to 1 channel the kernel is summed over its input channels; to C channels from I it is
  tiled and scaled by I / C, so that an image whose channels are equal (a grayscale photo as RGB) gives the
  same response as the grayscale image gave the original;
- every tensor whose shape differs in a class-count axis is the classifier: left at its fresh initialisation
  (a new head for the tree's classes);
- any other tensor missing or of another shape is an error naming it (another family's checkpoint).

The fine-tuning learning-rate recipe: the new head at the recipe's rate, everything loaded at ``BODY_LR_SCALE``
of it, both under the recipe's warm-up and cosine decay (discriminative rates, as in timm's and fast.ai's
fine-tuning recipes: the loaded features move slowly, the fresh head fast).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

BODY_LR_SCALE = 0.1
WRAPPER_KEYS = ("state_dict", "model", "state_dict_ema", "model_ema")


class FinetuneError(ValueError):
    """One line: why this checkpoint cannot start this model."""


@dataclass
class InitReport:
    """What ``load_init`` did: the source, its checksum, tensors loaded, adapted (first conv) and left new."""

    source: str
    sha256: str
    loaded: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "sha256": self.sha256, "loaded": len(self.loaded), "adapted": self.adapted,
                "new_head": self.new, "body_lr_scale": BODY_LR_SCALE}


def checkpoint_file(source: str) -> Path:
    """A zoo model's shipped weights by name, or a file path."""
    p = Path(source)
    if p.is_file():
        return p
    from training.checkpoints import checkpoint_path
    from training.registry import UnknownModelError, get_spec

    try:
        get_spec(source)
    except UnknownModelError:
        raise FinetuneError(f"--init {source!r}: neither a file nor a registered model") from None
    path = checkpoint_path(source)
    if not path.exists():
        raise FinetuneError(f"--init {source!r}: model has no trained weights at {path}; train it first")
    return path


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The flat state dict in ``path`` (timm's wrappers and DDP's ``module.`` prefix removed)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle traceback says nothing to a user: one line
        raise FinetuneError(f"--init {path}: not a torch state-dict file ({type(e).__name__})") from None
    for key in WRAPPER_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise FinetuneError(f"--init {path}: expected a dict of tensors (a state dict), got {type(obj).__name__}")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def adapt_input_conv(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """A conv kernel [O, I, kh, kw] for ``in_chans`` input channels (timm's ``adapt_input_conv``, extended to
    any I: summed to 1 channel; tiled and scaled by I / in_chans otherwise)."""
    i = weight.shape[1]
    if in_chans == i:
        return weight
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    reps = math.ceil(in_chans / i)
    return weight.repeat(1, reps, 1, 1)[:, :in_chans] * (i / in_chans)


def adapt_state_dict(source: dict[str, torch.Tensor], model: nn.Module, num_classes: int,
                     report: InitReport) -> dict[str, torch.Tensor]:
    """The model's state dict with every tensor the checkpoint can give taken from it (see the module docstring);
    raises ``FinetuneError`` naming the first tensor it cannot."""
    target = model.state_dict()
    first_conv = next((f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
    out = dict(target)
    for key, want in target.items():
        if key not in source:
            if key.endswith("num_batches_tracked"):
                continue
            raise FinetuneError(f"--init {report.source}: has no tensor {key!r} (a checkpoint of another family?)")
        got = source[key]
        if got.shape == want.shape:
            out[key] = got.to(want.dtype)
            report.loaded.append(key)
        elif key == first_conv and got.dim() == 4 and got.shape[0] == want.shape[0] and got.shape[2:] == want.shape[2:]:
            out[key] = adapt_input_conv(got, want.shape[1]).to(want.dtype)
            report.adapted.append(f"{key}: {got.shape[1]} -> {want.shape[1]} input channels")
        elif got.dim() == want.dim() and _differs_in_classes(got.shape, want.shape, num_classes):
            report.new.append(key)  # the classifier for the tree's classes: the fresh initialisation stays
        else:
            raise FinetuneError(f"--init {report.source}: tensor {key!r} has shape {tuple(got.shape)}, the model "
                                f"needs {tuple(want.shape)} (a checkpoint of another family or width?)")
    return out


def _differs_in_classes(got: torch.Size, want: torch.Size, num_classes: int) -> bool:
    diff = [d for d, (a, b) in enumerate(zip(got, want, strict=True)) if a != b]
    return len(diff) == 1 and want[diff[0]] == num_classes


def initializer(source: str, num_classes: int) -> tuple[Callable[[nn.Module], Any], InitReport]:
    """``(initializer, report)`` for the training loops (``training.train.train_model(initializer=...)``): it
    loads ``source`` into the built model and returns the fine-tuning parameter groups."""
    path = checkpoint_file(source)
    report = InitReport(source, hashlib.sha256(path.read_bytes()).hexdigest()[:16])
    state = read_state_dict(path)

    def apply(model: nn.Module) -> Callable[[nn.Module, list[nn.Parameter], float], list[dict[str, Any]]]:
        model.load_state_dict(adapt_state_dict(state, model, num_classes, report))
        return groups

    def groups(model: nn.Module, params: list[nn.Parameter], lr: float) -> list[dict[str, Any]]:
        head = {id(p) for n, p in model.named_parameters() if n in report.new}
        new = [p for p in params if id(p) in head]
        body = [p for p in params if id(p) not in head]
        out = [{"params": body, "lr": lr * BODY_LR_SCALE}] if body else []
        return out + ([{"params": new, "lr": lr}] if new else [])

    return apply, report
