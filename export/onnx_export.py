"""torch -> ONNX with the dynamo exporter, driven by the model spec."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from export.rewriters import translation_table
from export.rewriters.registry import applied as rewrites_applied
from export.rewriters.registry import plan as rewrite_plan
from training.feeds import generated
from training.registry import GraphSpec, ModelSpec

# "torchvision is not installed. Skipping torchvision::nms" and similar: true, and irrelevant here.
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)


class ExportError(RuntimeError):
    pass


def example_inputs(graph: GraphSpec, batch: int = 2, side: int | None = None) -> tuple[torch.Tensor, ...]:
    """One example tensor per graph input. Batch > 1: the exporter specialises a batch of 1 to a constant."""
    rng = np.random.default_rng(0)
    return tuple(torch.from_numpy(generated(t, batch, side, rng)) for t in graph.inputs)


def _dynamic_shapes(graph: GraphSpec) -> tuple[dict[int, Any], ...]:
    """Batch and every Dim axis of every input are dynamic (sizes are read from Shape in the graph)."""
    return tuple({0: torch.export.Dim.DYNAMIC, **{i + 1: torch.export.Dim.DYNAMIC for i in t.dynamic}}
                 for t in graph.inputs)


def export_onnx(spec: ModelSpec, model: torch.nn.Module, path: Path, custom_ops: bool = False,
                slim: bool = True, graph: GraphSpec | None = None) -> Path:
    """Write ``graph`` of ``spec`` (default: the whole model as its one graph) to ``path`` as one
    self-contained file, check it fully, and return it. ``model`` is the trained model; the graph's
    ``module`` picks the part it exports."""
    graph = graph or spec.deploy_graphs()[0]
    module = (graph.module(model) if graph.module else model).eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rewrites, opset = rewrite_plan(spec.export.rewriters, module, spec.export.opset)
    with warnings.catch_warnings(), torch.no_grad(), rewrites_applied(rewrites):
        warnings.simplefilter("ignore")  # the exporter is chatty about things that do not matter here
        try:
            program = torch.onnx.export(
                module,
                example_inputs(graph, side=spec.train.canvas),
                dynamo=True,
                opset_version=opset,
                input_names=[t.name for t in graph.inputs],
                output_names=[t.name for t in graph.outputs],
                dynamic_shapes=_dynamic_shapes(graph),
                custom_translation_table=translation_table(custom_ops),
                external_data=False,
                optimize=True,
                verbose=False,
            )
        except Exception as e:
            raise ExportError(f"torch.onnx.export failed for model {spec.name!r} graph {graph.name!r}: {e}") from e
    proto = program.model_proto
    if slim:
        proto = _slim(proto)
    _name_dynamic_axes(proto, graph)
    _set_metadata(proto, spec, graph, custom_ops)
    onnx.save_model(proto, path)
    check_graph(path, graph, spec.name)
    return path


def _slim(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Constant folding and dead-node removal; the parity gate later proves nothing changed."""
    import onnxslim

    return onnxslim.slim(proto)


def _name_dynamic_axes(proto: onnx.ModelProto, graph: GraphSpec) -> None:
    """Rename the exporter's symbols (s0, s77, ...) to the spec's axis names (batch, height, ...) everywhere."""
    rename: dict[str, str] = {}
    for value, t in zip(proto.graph.input, graph.inputs, strict=True):
        names = {0: "batch", **{i + 1: d.name for i, d in t.dynamic.items()}}
        for k, d in enumerate(value.type.tensor_type.shape.dim):
            if d.dim_param and k in names:
                rename.setdefault(d.dim_param, names[k])
    for v in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]:
        for d in v.type.tensor_type.shape.dim:
            if d.dim_param in rename:
                d.dim_param = rename[d.dim_param]
    # Outputs whose axes the exporter wrote as expressions (e.g. "(s73//8)") take the output spec's names.
    for value, t in zip(proto.graph.output, graph.outputs, strict=True):
        names = {0: "batch", **{i + 1: d.name for i, d in t.dynamic.items()}}
        for k, d in enumerate(value.type.tensor_type.shape.dim):
            if d.dim_param and k in names and d.dim_param not in rename.values():
                d.dim_param = names[k]


def _set_metadata(proto: onnx.ModelProto, spec: ModelSpec, graph: GraphSpec, custom_ops: bool) -> None:
    meta = {"attnzoo.model": spec.name, "attnzoo.graph": graph.name, "attnzoo.family": spec.family,
            "attnzoo.custom_ops": str(custom_ops).lower()}
    del proto.metadata_props[:]
    for k, v in meta.items():
        proto.metadata_props.add(key=k, value=v)


def check_graph(path: Path, graph: GraphSpec, model: str = "") -> onnx.ModelProto:
    """Full checker + strict shape inference, and the I/O contract the graph's spec promises."""
    who = f"model {model!r} graph {graph.name!r}" if model and model != graph.name else f"model {graph.name!r}"
    try:
        onnx.checker.check_model(str(path), full_check=True)
        proto = onnx.shape_inference.infer_shapes(onnx.load(path), check_type=True, strict_mode=True)
    except Exception as e:
        raise ExportError(f"ONNX check failed for {path} ({who}): {e}") from e
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if opset >= 20 and any(n.op_type == "GridSample" for n in proto.graph.node):
        raise ExportError(f"{path}: opset {opset} makes TensorRT 10 sample GridSample nearest; use 17 or 18")
    inputs = [i.name for i in proto.graph.input]
    outputs = [o.name for o in proto.graph.output]
    want_in, want_out = [t.name for t in graph.inputs], [t.name for t in graph.outputs]
    if inputs != want_in or outputs != want_out:
        raise ExportError(f"{path}: graph I/O {inputs} -> {outputs} does not match the spec of {who} "
                          f"({want_in} -> {want_out})")
    for value in proto.graph.input:
        batch_dim = value.type.tensor_type.shape.dim[0]
        if batch_dim.HasField("dim_value"):
            raise ExportError(f"{path}: batch axis of {value.name!r} is fixed to {batch_dim.dim_value}")
    return proto
