"""The spec dataclasses (timm's pretrained-config habit, one frozen record per model): ``ModelSpec`` and the
tensors, graphs, recipe and options it holds, plus the image input and class logits every model here uses.

One frozen ``ModelSpec`` per servable model drives every stage: training reads ``task`` and ``train``,
export reads ``inputs``/``outputs``/``graphs`` and ``export``, the repository generator reads the tensors,
``composition`` and ``serving``, and the gates read ``checks``. Nothing downstream branches on a model's
name or an output's name: every stage loops over the named tensors and graphs the spec declares.

This module imports nothing of the registry (``training.registry`` holds the registered specs and re-exports
these names), so that code deriving specs (``training.derived``) sits below the registry, not beside it.
torch is not imported here: the client and the repository generator read specs without it.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from training.images import ImagePreprocess
from training.tasks import Classification, Task

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

# A loss gets the model's outputs by name and the batch dict, and returns (loss, metrics for the log).
LossFn = Callable[[dict[str, "torch.Tensor"], dict[str, "torch.Tensor"]], tuple["torch.Tensor", dict[str, float]]]
# Extra test-split metrics from all outputs by name (numpy, concatenated over the split) and the split's arrays.
MetricsFn = Callable[[dict[str, "np.ndarray"], dict[str, "np.ndarray"]], dict[str, float]]
# A model's own bars beyond its task's: returns the failed ones as messages (empty list = all met).
BarsFn = Callable[[dict[str, float]], list[str]]


@dataclass(frozen=True)
class Dim:
    """A dynamic axis: its name in every graph and its (min, opt, max) range, used alike for TensorRT's
    optimization profile, the server's input bounds and the front door's checks."""

    name: str
    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise ValueError(f"dim {self.name!r}: need 1 <= min <= opt <= max, got {self.min}, {self.opt}, {self.max}")


@dataclass(frozen=True)
class TensorSpec:
    """One named input or output. ``axes`` is per sample (the batch axis is implicit): an int, or a ``Dim``."""

    name: str
    axes: tuple[int | Dim, ...]
    dtype: str = "float32"  # numpy dtype name
    kind: str = "tensor"  # an output kind (training.tasks): how it is compared and shown
    description: str = ""
    data: str | None = None  # the data split's array that feeds this input (None: generated)
    value_range: tuple[float, float] = (0.0, 1.0)  # of generated or checked values
    # An input a request may leave out (Triton ``optional: true``); the server and training then feed ``default``.
    optional: bool = False
    default: float | None = None

    def __post_init__(self) -> None:
        if self.optional and self.default is None:
            raise ValueError(f"tensor {self.name!r}: an optional input needs a default")
        bad = [a for a in self.axes if not isinstance(a, Dim) and (not isinstance(a, int) or a < 1)]
        if bad:
            raise ValueError(f"tensor {self.name!r}: axes {self.axes} must be sizes >= 1 or Dim(name, min, opt, max) "
                             "for a dynamic axis")

    def default_batch(self, n: int) -> np.ndarray:
        """An optional input's default for ``n`` samples: what the server feeds when a request leaves it out."""
        import numpy as np

        if not self.optional or self.dynamic:
            raise ValueError(f"input {self.name!r} has no default batch (optional with static axes only)")
        return np.full((n, *self.shape), self.default, dtype=self.dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        """Per-sample shape with -1 for every dynamic axis (Triton's ``dims``)."""
        return tuple(-1 if isinstance(a, Dim) else a for a in self.axes)

    @property
    def dynamic(self) -> dict[int, Dim]:
        """Per-sample axis index -> its Dim."""
        return {i: a for i, a in enumerate(self.axes) if isinstance(a, Dim)}

    def concrete(self, sizes: dict[str, int] | int | None = None) -> tuple[int, ...]:
        """Per-sample shape with each Dim set from ``sizes`` (by name; an int sets every Dim; default opt)."""
        def size(d: Dim) -> int:
            if isinstance(sizes, int):
                return sizes
            return (sizes or {}).get(d.name, d.opt)

        return tuple(size(a) if isinstance(a, Dim) else a for a in self.axes)


@dataclass(frozen=True)
class GraphSpec:
    """One exported ONNX graph of a deployable. ``module`` picks what to export from the trained model
    (None: the whole model); its forward takes ``inputs`` in order and returns ``outputs`` in order."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    module: Callable[[nn.Module], nn.Module] | None = None


@dataclass(frozen=True)
class Step:
    """One step of a composition: run ``graph``, feeding its inputs from pipeline tensors and naming its
    outputs as pipeline tensors (Triton ensemble's ``input_map``/``output_map``: graph name -> pipeline name)."""

    graph: str
    input_map: dict[str, str]
    output_map: dict[str, str]


@dataclass(frozen=True)
class Composition:
    """How Triton composes a multi-graph deployable: ``ensemble`` (a fixed chain, Triton's scheduler) or
    ``bls`` (a python model calling the graphs: where a step depends on data). The pipeline's inputs and
    outputs are the spec's own."""

    kind: Literal["ensemble", "bls"]
    steps: tuple[Step, ...]


@dataclass(frozen=True)
class Stage:
    """One phase of a multi-stage recipe (e.g. MA-CNN's alternation of its grouping and classification
    losses): ``steps`` with its own optimizer and cosine schedule over the parameters ``params`` picks (None:
    all), its own ``loss`` (None: the recipe's), after ``setup(model, train_split)`` (e.g. a k-means init)."""

    name: str
    steps: int
    loss: LossFn | None = None
    params: Callable[[nn.Module], list[torch.nn.Parameter]] | None = None
    lr: float | None = None  # None: the recipe's
    setup: Callable[[nn.Module, dict[str, np.ndarray]], None] | None = None


@dataclass(frozen=True)
class TrainRecipe:
    """Budgeted by steps, not wall time, so that results are reproducible on noisy 2-core hosts. With
    ``stages``, the stages run in order and ``steps`` is ignored (their sum is the budget)."""

    steps: int = 800
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    train_size: int = 10_000
    test_size: int = 2_000
    canvas: int = 64
    seed: int = 0
    data: str = "digits"  # the data source: training.data.SOURCES, or a user tree "folder:/root", "cub:/root"
    data_digest: str = ""  # a user tree's content digest (training.userdata.Dataset.digest): what weights saw
    skip_bad_images: bool = False  # leave a user tree's unreadable files out instead of stopping
    # Training arithmetic: "bfloat16" runs forward and loss under CPU autocast (AVX-512 BF16: 1.35x here on
    # conv nets); weights, optimizer and the exported graphs stay float32. channels_last: NHWC convolutions.
    precision: str = "float32"
    channels_last: bool = False
    loss: LossFn | None = None  # None: the task's loss
    metrics: MetricsFn | None = None  # extra metrics beside the task's
    stages: tuple[Stage, ...] = ()

    @property
    def total_steps(self) -> int:
        return sum(st.steps for st in self.stages) if self.stages else self.steps


@dataclass(frozen=True)
class ExportOptions:
    opset: int = 18  # 17/18 keep TensorRT's GridSample bilinear; 20 does not
    # Export-time rewrites (export/rewriters/registry.py, by name) this model's graphs may use; each applies only
    # where the model holds a module it rewrites and raises that graph's opset to what it needs. "fused_attention":
    # attention blocks as one ONNX ``Attention`` node (opset 23); "lean_feedback": the Feedback CNN's top-down pass
    # in cheaper ops. () exports the model's own forward at ``opset``.
    rewriters: tuple[str, ...] = ("fused_attention", "lean_feedback")
    # Ops (ONNX op types) kept in fp32 in the FP16 graph, chosen by measurement.
    fp16_keep_fp32_ops: tuple[str, ...] = ()
    # TensorRT optimization profile of the batch axis (min, opt, max); other axes: each input's Dims.
    profile_batch: tuple[int, int, int] = (1, 8, 64)


@dataclass(frozen=True)
class Checks:
    fp32_max_abs: float = 1e-4  # torch vs onnxruntime, every output (unless output_max_abs names it)
    trt_fp32_max_abs: float = 1e-3
    fp16_min_agreement: float = 0.995  # the output kinds' agreement rule (top-1, per-pixel argmax)
    parity_batches: tuple[int, ...] = (1, 8, 64)
    parity_sides: tuple[int, ...] = (64, 80)  # every Dim set to this: a second size catches shapes frozen at export
    bars: BarsFn | None = None
    # Per-output fp32 bounds where an output cannot meet ``fp32_max_abs`` (measured, with the reason beside it);
    # its agreement rule still applies in full.
    output_max_abs: dict[str, float] = field(default_factory=dict)
    # Also gate the deployed graph against the torch model in float64 (the exact result) at ``fp32_max_abs`` for
    # every output: where torch's own float32 rounding is near the bound, so that float32 vs float32 needs
    # ``output_max_abs``, the strict bound still holds against the exact computation.
    float64_reference: bool = False
    # Per-output FP16 agreement bars where an output cannot meet ``fp16_min_agreement`` (measured, with why).
    fp16_output_agreement: dict[str, float] = field(default_factory=dict)
    # The INT8 gate (export.int8): each output kind's agreement with the fp32 torch model, and the task's first
    # metric (accuracy, mean IoU) at most this much below fp32's, on the test split.
    int8_min_agreement: float = 0.99
    int8_max_metric_drop: float = 0.005

    def max_abs(self, output: str) -> float:
        return self.output_max_abs.get(output, self.fp32_max_abs)

    def fp16_agreement(self, output: str) -> float:
        return self.fp16_output_agreement.get(output, self.fp16_min_agreement)

    def int8_agreement(self, output: str) -> float:
        """An output whose FP16 bar was lowered by measurement (a map that reduced precision moves) keeps that
        lower bar at int8; every other output is held to ``int8_min_agreement``."""
        return min(self.int8_min_agreement, self.fp16_output_agreement.get(output, self.int8_min_agreement))


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
    task: Task = field(default_factory=Classification)
    train: TrainRecipe = field(default_factory=TrainRecipe)
    export: ExportOptions = field(default_factory=ExportOptions)
    checks: Checks = field(default_factory=Checks)
    serving: ServingOptions = field(default_factory=ServingOptions)
    # Empty: one graph, the whole model, with the spec's inputs/outputs. Otherwise the graphs and how
    # Triton composes them (the pipeline's inputs and outputs are still the spec's).
    graphs: tuple[GraphSpec, ...] = ()
    composition: Composition | None = None
    # How an encoded image file becomes the image input (the served ``<name>_image`` and the client); None:
    # the image input's own size and channels, [0, 1] values (``image_preprocess``).
    preprocess: ImagePreprocess | None = None
    class_names: tuple[str, ...] = ()  # labels of the class logits (default: the class indices)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.graphs) > 1 and self.composition is None:
            raise ValueError(f"model {self.name!r}: several graphs need a composition (ensemble or bls)")
        if self.composition is not None and not self.graphs:
            raise ValueError(f"model {self.name!r}: a composition needs the graphs it composes")
        if self.composition is not None:
            names = {g.name for g in self.graphs}
            unknown = [s.graph for s in self.composition.steps if s.graph not in names]
            if unknown:
                raise ValueError(f"model {self.name!r}: composition steps name unknown graphs {unknown}")

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.outputs)

    @property
    def image_input(self) -> TensorSpec | None:
        """The one image input a file can feed (kind ``image``) when every other input is optional, else None."""
        images = [t for t in self.inputs if t.kind == "image"]
        rest = [t for t in self.inputs if t.kind != "image" and not t.optional]
        return images[0] if len(images) == 1 and not rest and len(images[0].axes) == 3 else None

    def image_preprocess(self) -> ImagePreprocess | None:
        """The eval transform from an encoded file to the image input; None for a model without one."""
        if self.preprocess is not None or self.image_input is None:
            return self.preprocess
        t = self.image_input
        channels = t.axes[0]
        sides = [a.opt if isinstance(a, Dim) else a for a in t.axes[1:]]
        if channels not in (1, 3) or sides[0] != sides[1]:
            return None
        # The generated digits are square canvases in [0, 1]: resize the shorter side to the canvas, no crop.
        return ImagePreprocess(sides[0], channels, resize=sides[0], mean=(0.0,), std=(1.0,))

    def labels(self, num_classes: int) -> tuple[str, ...]:
        """Names of ``num_classes`` classes: ``class_names`` when they match, else the indices."""
        if len(self.class_names) == num_classes:
            return self.class_names
        return tuple(str(i) for i in range(num_classes))

    def deploy_graphs(self) -> tuple[GraphSpec, ...]:
        """Every graph to export: the declared ones, or the whole model as one graph named like the model."""
        return self.graphs or (GraphSpec(self.name, self.inputs, self.outputs),)

    def graph_model_name(self, graph: GraphSpec) -> str:
        """The Triton model (and repository folder) that serves ``graph``."""
        return self.name if graph.name == self.name else f"{self.name}_{graph.name}"



SIDE = Dim("height", 48, 64, 96), Dim("width", 48, 64, 96)


def image_input(name: str = "image", channels: int = 1) -> TensorSpec:
    """The image input every model here takes: [C, H, W] float32 in [0, 1], H and W dynamic within 48-96 px."""
    return TensorSpec(name, (channels, *SIDE), "float32", "image", "image in [0, 1]", data="image")


def class_logits(name: str = "logits", num_classes: int = 10) -> TensorSpec:
    return TensorSpec(name, (num_classes,), "float32", "logits", "class logits (digits 0-9)")
