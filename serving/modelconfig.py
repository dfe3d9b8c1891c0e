"""Triton model configs as protobuf: building blocks, text in and out, the checks every config passes, and the
atomic file writes of a repository. What ``serving.repository`` (a spec's models) and ``serving.image_models``
(their ``<name>_image`` ensembles) both build on, so neither imports the other's helpers."""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from serving.contract import Contract
    from training.registry import ModelSpec, TensorSpec


class RepositoryError(RuntimeError):
    """A one-line problem with the repository (missing graph, invalid config)."""


def triton_dtype(dtype: str) -> int:
    import numpy as np
    from tritonclient.grpc import model_config_pb2 as mc
    from tritonclient.utils import np_to_triton_dtype

    t = np_to_triton_dtype(np.dtype(dtype))
    return mc.DataType.Value("TYPE_STRING" if t == "BYTES" else f"TYPE_{t}")


def input_bounds(inputs: Iterable[TensorSpec]) -> dict[str, dict[str, list[int]]]:
    """{input: {per-sample axis index: [min, max]}} for every dynamic axis: the same range the TensorRT
    profile allows. Written into each config (parameter ``input_bounds``): the backend enforces it and
    clients read it."""
    return {t.name: {str(i): [d.min, d.max] for i, d in t.dynamic.items()} for t in inputs if t.dynamic}


def input_ranges(inputs: Iterable[TensorSpec]) -> dict[str, list[float]]:
    """{integer input: [min, max]}: the values an integer input (a class index, say) may take. Enforced by the
    backend, since an index outside it would make the graph gather out of range."""
    import numpy as np

    return {t.name: list(t.value_range) for t in inputs if np.dtype(t.dtype).kind in "iu"}


def add_tensors(cfg: Any, inputs: Iterable[TensorSpec], outputs: Iterable[TensorSpec], optional: bool = True) -> None:
    """``optional=False``: every input required (NVIDIA's native backends hand the graph only what the request
    holds, and an exported graph needs all its inputs; the python backend fills in the defaults)."""
    for t in inputs:
        cfg.input.add(name=t.name, data_type=triton_dtype(t.dtype), dims=list(t.shape),
                      optional=optional and t.optional)
    for t in outputs:
        cfg.output.add(name=t.name, data_type=triton_dtype(t.dtype), dims=list(t.shape))


def set_parameters(cfg: Any, params: dict[str, str]) -> None:
    for k, v in params.items():
        cfg.parameters[k].string_value = v


def client_contract(spec: ModelSpec, inputs: Iterable[TensorSpec], outputs: Iterable[TensorSpec]) -> Contract:
    """What clients (and the backend) read from a config (``serving.contract``): how to present each output, the
    inputs' bounds and value ranges, the optional inputs' defaults, a description."""
    from serving.contract import Contract

    inputs = tuple(inputs)
    return Contract(spec.description, {t.name: t.kind for t in outputs}, input_bounds(inputs), input_ranges(inputs),
                    {t.name: t.default for t in inputs if t.optional})


def client_parameters(spec: ModelSpec, inputs: Iterable[TensorSpec], outputs: Iterable[TensorSpec]) -> dict:
    """``client_contract`` as the config's parameters."""
    return client_contract(spec, inputs, outputs).parameters()


def config_text(cfg: Any) -> str:
    from google.protobuf import text_format

    return text_format.MessageToString(cfg)


def config_json(cfg: Any) -> str:
    """The JSON form Triton's ``load_model(config=...)`` override takes."""
    from google.protobuf import json_format

    return json_format.MessageToJson(cfg, preserving_proto_field_name=True)


def parse_config(text: str, source: str = "config.pbtxt") -> Any:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    try:
        return text_format.Parse(text, mc.ModelConfig())
    except text_format.ParseError as e:
        raise RepositoryError(f"{source}: not a valid Triton model config: {e}") from None


def check_config(text: str, source: str = "config.pbtxt") -> Any:
    """Parse with Triton's protobuf and check what every config needs; returns the ``ModelConfig``."""
    cfg = parse_config(text, source)

    def fail(msg: str) -> None:
        raise RepositoryError(f"{source}: {msg}")

    if not cfg.name:
        fail("no model name")
    if not cfg.backend and not cfg.platform:
        fail("neither backend nor platform is set")
    if cfg.max_batch_size < 1:
        fail(f"max_batch_size must be >= 1, got {cfg.max_batch_size}")
    for b in cfg.dynamic_batching.preferred_batch_size:
        if not 1 <= b <= cfg.max_batch_size:
            fail(f"preferred batch size {b} outside 1..{cfg.max_batch_size}")
    if not cfg.instance_group and cfg.platform != "ensemble":
        fail("no instance_group")
    if cfg.platform == "ensemble" and not cfg.ensemble_scheduling.step:
        fail("an ensemble without steps")
    for w in cfg.model_warmup:
        if set(w.inputs) != {i.name for i in cfg.input}:
            fail(f"warmup {w.name!r} does not feed exactly the model's inputs")
    return cfg


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)  # atomic: a server polling the repository never reads half a config


def copy_file(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return dst
