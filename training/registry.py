"""Model specs and the registry (timm's ``@register_model`` habit).

One frozen ``ModelSpec`` per servable model drives every stage: training reads ``train``,
export reads ``export``, the repository generator reads ``inputs``/``outputs``/``serving``, and
the tests read ``checks``. Nothing downstream branches on a model's name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

# A loss gets the model's output tuple and the batch dict, and returns (loss, metrics for the log).
LossFn = Callable[[tuple[torch.Tensor, ...], dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float]]]
# Extra test-split metrics from all outputs (numpy, concatenated over the split) and the split's arrays.
MetricsFn = Callable[[tuple[np.ndarray, ...], dict[str, np.ndarray]], dict[str, float]]
# A model's own bars beyond min_accuracy: returns the failed ones as messages (empty list = all met).
BarsFn = Callable[[dict[str, float]], list[str]]


@dataclass(frozen=True)
class TensorSpec:
    """One named input or output. ``shape`` is per sample; -1 marks a dynamic axis."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"  # numpy dtype name
    kind: str = "tensor"  # logits | scale_logits | boxes | image | tensor: how clients present it
    description: str = ""


@dataclass(frozen=True)
class TrainRecipe:
    """Budgeted by steps, not wall time, so that results are reproducible on noisy 2-core hosts."""

    steps: int = 800
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    train_size: int = 10_000
    test_size: int = 2_000
    canvas: int = 64
    seed: int = 0
    loss: LossFn | None = None  # None: cross-entropy on the "logits" output
    metrics: MetricsFn | None = None  # None: accuracy only


@dataclass(frozen=True)
class ExportOptions:
    opset: int = 18  # 17/18 keep TensorRT's GridSample bilinear; 20 does not
    dynamic_spatial: bool = True  # H and W are dynamic axes as well as the batch
    # Ops (ONNX op types) kept in fp32 in the FP16 graph, chosen by measurement.
    fp16_keep_fp32_ops: tuple[str, ...] = ()
    # TensorRT optimization profile: batch (min, opt, max) and spatial side (min, opt, max).
    profile_batch: tuple[int, int, int] = (1, 8, 64)
    profile_side: tuple[int, int, int] = (48, 64, 96)


@dataclass(frozen=True)
class Checks:
    fp32_max_abs: float = 1e-4  # torch vs onnxruntime, every output
    trt_fp32_max_abs: float = 1e-3
    fp16_min_top1_agreement: float = 0.995
    min_accuracy: float = 0.95  # on the test split, checked after training
    parity_batches: tuple[int, ...] = (1, 8, 64)
    parity_sides: tuple[int, ...] = (64, 80)  # second input size catches shapes frozen at export
    bars: BarsFn | None = None


@dataclass(frozen=True)
class ServingOptions:
    max_batch_size: int = 64
    preferred_batch_sizes: tuple[int, ...] = (8, 16, 32)
    max_queue_delay_us: int = 500
    instance_count: int = 1
    intra_op_threads: int = 0  # onnxruntime threads per instance; 0: the host's usable cores / instances


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str  # the seed mechanism, e.g. "nonlocal", "racnn"
    builder: Callable[[], nn.Module]
    description: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    train: TrainRecipe = field(default_factory=TrainRecipe)
    export: ExportOptions = field(default_factory=ExportOptions)
    checks: Checks = field(default_factory=Checks)
    serving: ServingOptions = field(default_factory=ServingOptions)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def input(self) -> TensorSpec:
        return self.inputs[0]

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.outputs)

    def logits_output(self) -> str:
        """The output whose argmax is the prediction (top-1 parity uses it)."""
        return next(o.name for o in self.outputs if o.kind == "logits")


_REGISTRY: dict[str, ModelSpec] = {}


class UnknownModelError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; users want a plain line
        return str(self.args[0])


def register_model(spec: ModelSpec) -> ModelSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"model {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def _ensure_models_imported() -> None:
    # Importing the package runs every family file's register_model calls.
    import training.models  # noqa: F401


def get_spec(name: str) -> ModelSpec:
    _ensure_models_imported()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown model {name!r}; known models: {', '.join(sorted(_REGISTRY))}"
        ) from None


def list_models(family: str | None = None) -> list[str]:
    _ensure_models_imported()
    return sorted(n for n, s in _REGISTRY.items() if family is None or s.family == family)


def create_model(name: str) -> nn.Module:
    return get_spec(name).builder()


def image_input(side: int = -1, name: str = "image") -> TensorSpec:
    """The grayscale image input every model here takes: [1, H, W] float32 in [0, 1]."""
    return TensorSpec(name, (1, side, side), "float32", "image", "grayscale image in [0, 1]")


def class_logits(name: str = "logits", num_classes: int = 10) -> TensorSpec:
    return TensorSpec(name, (num_classes,), "float32", "logits", "class logits (digits 0-9)")
