"""torch -> ONNX with the dynamo exporter, driven by the model spec."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import onnx
import torch

from export.rewriters import translation_table
from training.registry import ModelSpec

# "torchvision is not installed. Skipping torchvision::nms" and similar: true, and irrelevant here.
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)


class ExportError(RuntimeError):
    pass


def example_input(spec: ModelSpec, batch: int = 2, side: int | None = None) -> torch.Tensor:
    # Batch > 1: the exporter specialises a batch of 1 to a constant.
    side = side or spec.train.canvas
    shape = [side if s < 0 else s for s in spec.input.shape]
    return torch.rand(batch, *shape, generator=torch.Generator().manual_seed(0))


def _dynamic_shapes(spec: ModelSpec):
    axes = {0: torch.export.Dim.DYNAMIC}
    if spec.export.dynamic_spatial:
        rank = len(spec.input.shape) + 1
        axes.update({rank - 2: torch.export.Dim.DYNAMIC, rank - 1: torch.export.Dim.DYNAMIC})
    return (axes,)


def export_onnx(spec: ModelSpec, model: torch.nn.Module, path: Path, custom_ops: bool = False,
                slim: bool = True) -> Path:
    """Write ``path`` (one self-contained file), check it fully, and return it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter is chatty about things that do not matter here
        try:
            program = torch.onnx.export(
                model,
                (example_input(spec),),
                dynamo=True,
                opset_version=spec.export.opset,
                input_names=[spec.input.name],
                output_names=list(spec.output_names),
                dynamic_shapes=_dynamic_shapes(spec),
                custom_translation_table=translation_table(custom_ops),
                external_data=False,
                optimize=True,
                verbose=False,
            )
        except Exception as e:
            raise ExportError(f"torch.onnx.export failed for model {spec.name!r}: {e}") from e
    proto = program.model_proto
    if slim:
        proto = _slim(proto)
    _name_dynamic_axes(proto, spec)
    _set_metadata(proto, spec, custom_ops)
    onnx.save_model(proto, path)
    check_graph(path, spec)
    return path


def _slim(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Constant folding and dead-node removal; the parity gate later proves nothing changed."""
    try:
        import onnxslim
    except ImportError:  # optional: the unslimmed graph is correct, only larger
        return proto
    return onnxslim.slim(proto)


def _name_dynamic_axes(proto: onnx.ModelProto, spec: ModelSpec) -> None:
    """Rename the exporter's symbols (s0, s77, ...) to batch/height/width everywhere in the graph."""
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    names = ["batch"] + [""] * (len(dims) - 3) + (["height", "width"] if spec.export.dynamic_spatial else ["", ""])
    rename = {d.dim_param: n for d, n in zip(dims, names, strict=True) if d.dim_param and n}
    values = [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]
    for v in values:
        for d in v.type.tensor_type.shape.dim:
            if d.dim_param in rename:
                d.dim_param = rename[d.dim_param]


def _set_metadata(proto: onnx.ModelProto, spec: ModelSpec, custom_ops: bool) -> None:
    meta = {"attnzoo.model": spec.name, "attnzoo.family": spec.family,
            "attnzoo.custom_ops": str(custom_ops).lower()}
    del proto.metadata_props[:]
    for k, v in meta.items():
        proto.metadata_props.add(key=k, value=v)


def check_graph(path: Path, spec: ModelSpec) -> onnx.ModelProto:
    """Full checker + strict shape inference, and the I/O contract the spec promises."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
        proto = onnx.shape_inference.infer_shapes(onnx.load(path), check_type=True, strict_mode=True)
    except Exception as e:
        raise ExportError(f"ONNX check failed for {path} (model {spec.name!r}): {e}") from e
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if opset >= 20:
        raise ExportError(f"{path}: opset {opset} makes TensorRT 10 sample GridSample nearest; use 17 or 18")
    inputs = [i.name for i in proto.graph.input]
    outputs = [o.name for o in proto.graph.output]
    if inputs != [spec.input.name] or outputs != list(spec.output_names):
        raise ExportError(f"{path}: graph I/O {inputs} -> {outputs} does not match the spec of {spec.name!r} "
                          f"({spec.input.name} -> {list(spec.output_names)})")
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    if batch_dim.HasField("dim_value"):
        raise ExportError(f"{path}: batch axis of {spec.input.name!r} is fixed to {batch_dim.dim_value}")
    return proto
