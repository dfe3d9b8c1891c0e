"""FP16 graphs: convert, prove the kept ops stay fp32, and measure accuracy without a GPU.

TensorRT-RTX and TensorRT 11 are strongly typed: an FP16 engine is an FP16-typed ONNX graph. The
graph comes from the exported FP32 graph through onnxconverter-common, with the ops listed in
``spec.export.fp16_keep_fp32_ops`` left in fp32 behind Casts. The list is chosen by measurement:

- ``probe_drift`` runs both graphs with every intermediate tensor exposed and names the nodes whose
  output overflows fp16 (|x| > 65504) or whose relative error jumps well above its inputs';
- ``keep_list_sweep`` converts with candidate lists and measures top-1 agreement and logit error.

Accuracy is measured with onnxruntime on CPU against the fp32 torch model on real test images. ORT's
CPU kernels compute most ops in fp32 between fp16 tensors (it inserts Casts), so this catches fp16
storage effects (overflow, rounding between ops), the main risk; a GPU run (``make gpu-check``)
confirms with real fp16 kernels.

CLI: ``python -m export.fp16 <model|all> [--probe] [--sweep]`` writes ``reports/fp16.{md,json}``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from export.runtime import ort_session
from training.paths import ARTIFACTS_DIR, REPORTS_DIR, REPOSITORY_DIR

log = logging.getLogger(__name__)

FP16_MAX = 65504.0
# Op types worth trying in fp32 when they are in a graph: numerically touchy ones (ranges, exp/log,
# reductions, attention-style products, sampling coordinates).
CANDIDATE_OPS = (
    "MatMul", "Gemm", "Softmax", "GridSample", "Exp", "Log", "Pow", "Sqrt", "Div", "ReduceSum",
    "ReduceMean", "Resize", "LayerNormalization", "Sigmoid", "Einsum",
)


class Fp16GraphError(RuntimeError):
    """The converted graph is not what was asked for (invalid, or a kept op still runs in fp16)."""


class Fp16AgreementError(RuntimeError):
    """An FP16 graph's predictions disagree with the fp32 model more than the spec allows."""


# --------------------------------------------------------------------------------------------- convert


def fp16_graph_path(model: str) -> Path:
    """Default home of a model's FP16 graph (beside the checkpoints: it is a build product, not a
    served file; the served FP16 form is the TensorRT engine)."""
    return ARTIFACTS_DIR / "onnx" / f"{model}.fp16.onnx"


def fp32_graph_path(model: str) -> Path:
    return REPOSITORY_DIR / model / "1" / "model.onnx"


def _elem_types(model: Any) -> dict[str, int]:
    """Tensor name -> ONNX element type, after shape inference."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    types = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    for init in inferred.graph.initializer:
        types[init.name] = init.data_type
    return types


def _restore_output_types(model: Any, original_outputs: dict[str, int]) -> int:
    """onnxconverter-common leaves a graph output in fp16 when a kept (blocked) op produces it, despite
    ``keep_io_types``: rename the fp16 tensor and Cast it back to the output's original type."""
    from onnx import TensorProto, helper

    graph = model.graph
    wrong = [o for o in graph.output if o.name in original_outputs
             and o.type.tensor_type.elem_type != original_outputs[o.name]]
    if not wrong:
        return 0
    types = _elem_types(model)
    producers = {o: n for n in graph.node for o in n.output}
    for out in wrong:
        name, internal = out.name, out.name + "_fp16"
        prod = producers.get(name)
        source = internal
        if prod is not None and prod.op_type == "Cast" and types.get(prod.input[0]) == TensorProto.FLOAT:
            source = prod.input[0]  # fp32 -> fp16 -> fp32 would only lose precision: cast from the fp32 tensor
        for node in graph.node:
            node.output[:] = [internal if o == name else o for o in node.output]
            node.input[:] = [internal if i == name else i for i in node.input]
        for vi in graph.value_info:
            if vi.name == name:
                vi.name = internal
        want = original_outputs[name]
        graph.node.append(helper.make_node("Cast", [source], [name], name=f"{name}_cast_to_output", to=want))
        out.type.tensor_type.elem_type = want
    return len(wrong)


def ops_without_fp16(model: Any) -> tuple[str, ...]:
    """Op types in ``model`` whose ONNX schema (at the graph's opset) has no float16 form although it
    takes float32 (e.g. Range): they must stay fp32 whatever the keep-list says."""
    import onnx

    opset = {o.domain: o.version for o in model.opset_import}
    found = set()
    for op in {n.op_type for n in model.graph.node if n.domain in ("", "ai.onnx")}:
        try:
            schema = onnx.defs.get_schema(op, opset.get("", 18), "")
        except onnx.defs.SchemaError:
            continue
        for tc in schema.type_constraints:
            allowed = set(tc.allowed_type_strs)
            if "tensor(float)" in allowed and "tensor(float16)" not in allowed:
                found.add(op)
    return tuple(sorted(found))


def shape_subgraph_nodes(model: Any) -> set[str]:
    """Names of nodes that compute from tensor shapes (sizes, coordinate ramps, scales), plus the first
    nodes that combine such a float value with image data.

    They stay fp32: TensorRT evaluates shape-derived values on the host, in fp32 only (an fp16 one, or
    an fp16 Cast of one, fails the build: "ShapeHostToDeviceCopy ... output type must be ... kFLOAT"),
    so the switch to fp16 has to happen after the first op on the device. They cost next to nothing,
    and fp16 would round pixel coordinates (1/96 steps) that GridSample consumes."""
    from onnx import TensorProto

    graph = model.graph
    constant = {t.name for t in graph.initializer}  # pure constants: the converter handles those
    shape_derived: set[str] = set()
    names = set()
    for node in graph.node:  # nodes are topologically sorted in a valid graph
        ins = [i for i in node.input if i]
        if node.op_type in ("Shape", "Size"):
            shape_derived.update(node.output)
            names.add(node.name)
        elif node.op_type == "Constant" or (ins and all(i in constant or i in shape_derived for i in ins)):
            if any(i in shape_derived for i in ins):
                shape_derived.update(node.output)
                names.add(node.name)
            else:
                constant.update(node.output)
    types = _elem_types(model)
    float_host = {t for t in shape_derived if types.get(t) == TensorProto.FLOAT}
    boundary = {n.name for n in graph.node if n.name not in names and float_host.intersection(n.input)}
    return names | boundary


def _name_nodes(model: Any) -> None:
    """Node-level choices need names: give unnamed nodes unique ones."""
    taken = {n.name for n in model.graph.node if n.name}
    for k, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{k}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)


def _unshare_constants(model: Any, block_ops: set[str], block_nodes: set[str]) -> int:
    """Give kept-fp32 nodes their own copy of any float constant they share with fp16 nodes.

    onnxconverter-common keeps a shared initializer fp32 when one consumer is kept in fp32, and then
    feeds it uncast to the fp16 consumers too (seen: RA-CNN's constant 1.0 shared by Range and Sub)."""
    import copy

    from onnx import TensorProto

    graph = model.graph
    float_inits = {t.name: t for t in graph.initializer if t.data_type == TensorProto.FLOAT}
    const_nodes = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}
    kept = [n for n in graph.node if n.op_type in block_ops or n.name in block_nodes]
    others = [n for n in graph.node if not (n.op_type in block_ops or n.name in block_nodes)]
    used_by_others = {i for n in others for i in n.input}
    copies = 0
    for node in kept:
        for k, name in enumerate(node.input):
            if name not in used_by_others or not (name in float_inits or name in const_nodes):
                continue
            new = f"{name}__fp32"
            if name in float_inits and new not in float_inits:
                dup = copy.deepcopy(float_inits[name])
                dup.name = new
                graph.initializer.append(dup)
                float_inits[new] = dup
                copies += 1
            elif name in const_nodes and new not in const_nodes:
                dup = copy.deepcopy(const_nodes[name])
                dup.output[0], dup.name = new, f"{const_nodes[name].name}__fp32"
                graph.node.insert(list(graph.node).index(const_nodes[name]) + 1, dup)
                const_nodes[new] = dup
                copies += 1
            node.input[k] = new
    return copies


@contextlib.contextmanager
def _without_converter_cast_cleanup() -> Iterator[None]:
    """The converter's last step (removing Cast pairs) raises "The downstream node of the second cast
    node should be graph output" when a kept op produces a graph output (e.g. a kept Gemm making the
    logits); ``_remove_cast_round_trips`` does that job afterwards, for every case."""
    import onnxconverter_common.float16 as conv

    original = conv.remove_unnecessary_cast_node
    conv.remove_unnecessary_cast_node = lambda graph: None
    try:
        yield
    finally:
        conv.remove_unnecessary_cast_node = original


def _float_initializer_peaks(model: Any) -> dict[str, float]:
    from onnx import TensorProto, numpy_helper

    return {t.name: float(np.abs(numpy_helper.to_array(t)).max(initial=0.0))
            for t in model.graph.initializer if t.data_type == TensorProto.FLOAT}


def _kept_initializers(model: Any, block_ops: set[str], block_nodes: set[str]) -> dict[str, Any]:
    """Copies of the float initializers that only kept-fp32 nodes read (their weights)."""
    import copy

    from onnx import TensorProto

    readers: dict[str, list[bool]] = {}
    for node in model.graph.node:
        kept = node.op_type in block_ops or node.name in block_nodes
        for i in node.input:
            readers.setdefault(i, []).append(kept)
    return {
        t.name: copy.deepcopy(t) for t in model.graph.initializer
        if t.data_type == TensorProto.FLOAT and readers.get(t.name) and all(readers[t.name])
    }


def _restore_kept_initializers(model: Any, originals: dict[str, Any]) -> int:
    """The converter rounds every initializer to fp16 (clamping big ones) and Casts it back for kept
    nodes, so "kept in fp32" weights lost precision anyway: put the fp32 originals back and drop the
    Casts that became fp32 -> fp32."""
    from onnx import TensorProto

    graph = model.graph
    restored = 0
    for k, init in enumerate(graph.initializer):
        if init.name in originals and init.data_type != TensorProto.FLOAT:
            graph.initializer[k].CopyFrom(originals[init.name])
            restored += 1
    for node in list(graph.node):
        is_cast32 = node.op_type == "Cast" and any(a.name == "to" and a.i == TensorProto.FLOAT for a in node.attribute)
        if is_cast32 and node.input[0] in originals:
            for other in graph.node:
                other.input[:] = [node.input[0] if i == node.output[0] else i for i in other.input]
            graph.node.remove(node)
    return restored


def _fix_output_consumers(model: Any) -> int:
    """With ``keep_io_types`` the converter casts an fp16 graph output back to fp32 under the output's
    name, but nodes inside the graph that read that output still expect fp16: point them at the fp16
    tensor the Cast reads (kept-fp32 consumers read it through their own input Casts)."""
    from onnx import TensorProto

    graph = model.graph
    types = _elem_types(model)
    producers = {o: n for n in graph.node for o in n.output}
    fixed = 0
    for out in graph.output:
        prod = producers.get(out.name)
        if prod is None or prod.op_type != "Cast" or types.get(prod.input[0]) != TensorProto.FLOAT16:
            continue
        for node in graph.node:
            if node is not prod and out.name in node.input:
                node.input[:] = [prod.input[0] if i == out.name else i for i in node.input]
                fixed += 1
    return fixed


def _remove_cast_round_trips(model: Any) -> int:
    """Rewire ``Cast(to=fp32)(Cast(to=fp16)(x))`` with x fp32 to x itself.

    onnxconverter-common puts such a round trip between two nodes kept in fp32 by name. It only loses
    precision, and on shape-derived values TensorRT cannot even build it (host tensors are fp32 only)."""
    from onnx import TensorProto

    graph = model.graph
    types = _elem_types(model)
    producers = {o: n for n in graph.node for o in n.output}
    outputs = {o.name for o in graph.output}

    def cast_to(node: Any) -> int | None:
        return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None

    removed = 0
    for node in list(graph.node):
        first = producers.get(node.input[0]) if cast_to(node) == TensorProto.FLOAT else None
        if first is None or cast_to(first) != TensorProto.FLOAT16:
            continue
        src, dst = first.input[0], node.output[0]
        if types.get(src) != TensorProto.FLOAT:
            continue
        if dst in outputs:  # a graph output keeps its name: read the fp32 source through an Identity
            node.op_type, node.input[0] = "Identity", src
            del node.attribute[:]
            removed += 1
            continue
        for n in graph.node:
            n.input[:] = [src if i == dst else i for i in n.input]
        graph.node.remove(node)
        removed += 1
    used = {i for n in graph.node for i in n.input} | outputs
    for node in list(graph.node):  # first halves left without a consumer
        if node.op_type == "Cast" and node.output[0] not in used:
            graph.node.remove(node)
    return removed


def kept_op_problems(model: Any, keep_fp32_ops: tuple[str, ...], keep_fp32_nodes: tuple[str, ...] = ()) -> list[str]:
    """Nodes that should run in fp32 but see an fp16 input or produce an fp16 output (empty: all good)."""
    from onnx import TensorProto

    types = _elem_types(model)
    problems = []
    for node in model.graph.node:
        if node.op_type not in keep_fp32_ops and node.name not in keep_fp32_nodes:
            continue
        for t in list(node.input) + list(node.output):
            if t and types.get(t) == TensorProto.FLOAT16:
                problems.append(f"node {node.name!r} ({node.op_type}) has fp16 tensor {t!r}")
    return problems


def convert_to_fp16(
    onnx_path: str | Path,
    out_path: str | Path,
    keep_fp32_ops: tuple[str, ...] = (),
    keep_fp32_nodes: tuple[str, ...] = (),
) -> Path:
    """Write an FP16 copy of an FP32 graph: fp32 inputs/outputs, ``keep_fp32_ops`` (op types) and
    ``keep_fp32_nodes`` (node names) computed in fp32. Verified with onnx.checker and a type check
    of every kept node; raises ``Fp16GraphError`` otherwise."""
    import onnx
    from onnxconverter_common.float16 import convert_float_to_float16

    onnx_path, out_path = Path(onnx_path), Path(out_path)
    model = onnx.load(str(onnx_path))
    original_outputs = {o.name: o.type.tensor_type.elem_type for o in model.graph.output}
    float_casts = {
        n.name for n in model.graph.node
        if n.op_type == "Cast" and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT for a in n.attribute)
    }
    # Kept in fp32: the spec's op types, ops ONNX defines without fp16, the shape-derived arithmetic,
    # and the graph's own int -> float32 Casts (sizes turned into divisors or coordinates). The list
    # replaces the converter's default one (ML ops, and ops some runtimes once lacked fp16 kernels for).
    _name_nodes(model)
    block = sorted(set(keep_fp32_ops) | set(ops_without_fp16(model)))
    block_nodes = sorted(set(keep_fp32_nodes) | float_casts | shape_subgraph_nodes(model))
    _unshare_constants(model, set(block), set(block_nodes))
    kept_weights = _kept_initializers(model, set(block), set(block_nodes))
    peaks = _float_initializer_peaks(model)
    with warnings.catch_warnings(), _without_converter_cast_cleanup():
        warnings.simplefilter("ignore")  # one warning per clamped value; summarised below instead
        converted = convert_float_to_float16(
            model, keep_io_types=True, op_block_list=block, node_block_list=block_nodes,
            max_finite_val=FP16_MAX,  # the converter's default clamps constants at 1e4
        )
    meta = converted.metadata_props.add()
    meta.key, meta.value = "attnzoo.fp16_fp32_op_types", ",".join(block)
    # The converter can leave stale fp32 value_info on tensors its Casts now make fp16 (seen after a kept
    # MatMul): the nodes are right, the annotations are not. Drop them and infer again from the nodes.
    del converted.graph.value_info[:]
    _restore_kept_initializers(converted, kept_weights)
    clamped = [t.name for t in converted.graph.initializer
               if t.data_type == onnx.TensorProto.FLOAT16 and peaks.get(t.name, 0.0) > FP16_MAX]
    if clamped:  # weights beyond fp16's range were clamped to +-65504: the agreement gate shows the cost
        log.warning("%s: weights %s exceed fp16's range and were clamped; keep their ops in fp32",
                    onnx_path, ", ".join(clamped[:5]))
    _restore_output_types(converted, original_outputs)
    _fix_output_consumers(converted)
    _remove_cast_round_trips(converted)
    del converted.graph.value_info[:]
    try:
        converted = onnx.shape_inference.infer_shapes(converted, strict_mode=True)
        onnx.checker.check_model(converted, full_check=True)
    except Exception as exc:
        raise Fp16GraphError(f"{onnx_path}: the FP16 graph is invalid: {str(exc).splitlines()[0]}") from exc
    problems = kept_op_problems(converted, tuple(keep_fp32_ops), tuple(keep_fp32_nodes))
    if problems:
        raise Fp16GraphError(f"{onnx_path}: ops meant to stay fp32 run in fp16: {'; '.join(problems[:3])}")
    wrong_io = [o.name for o in converted.graph.output if o.type.tensor_type.elem_type != original_outputs[o.name]]
    if wrong_io:
        raise Fp16GraphError(f"{onnx_path}: FP16 graph outputs {wrong_io} changed dtype")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(converted, str(out_path))
    return out_path


# --------------------------------------------------------------------------------------------- measure


def _ort(path: str | Path, disable_optimizations: bool = False) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # ORT warns about every Cast it inserts for fp16 on CPU
    if disable_optimizations:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def torch_outputs(model: Any, images: np.ndarray, batch_size: int = 64) -> list[np.ndarray]:
    import torch

    model.eval()
    chunks: list[list[np.ndarray]] = []
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            out = model(torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size])))
            out = out if isinstance(out, tuple | list) else (out,)
            chunks.append([o.float().numpy() for o in out])
    return [np.concatenate(parts) for parts in zip(*chunks, strict=True)]


def ort_outputs(
    session: Any, input_name: str, images: np.ndarray, names: list[str], batch_size: int = 64
) -> list[np.ndarray]:
    chunks = [session.run(names, {input_name: images[i : i + batch_size]}) for i in range(0, len(images), batch_size)]
    return [np.concatenate(parts).astype(np.float32) for parts in zip(*chunks, strict=True)]


def compare_outputs(spec: Any, ref: list[np.ndarray], got: list[np.ndarray]) -> dict[str, Any]:
    """Top-1 agreement on the logits output (and on every scale_logits output), max abs/rel error and
    non-finite count per output."""
    per_output = {}
    for out_spec, r, g in zip(spec.outputs, ref, got, strict=True):
        finite = np.isfinite(g)
        err = np.abs(np.where(finite, g, 0.0) - r)
        entry = {
            "max_abs_err": float(err.max()) if err.size else 0.0,
            "max_rel_err": float(err.max() / max(float(np.abs(r).max()), 1e-12)) if err.size else 0.0,
            "nonfinite": int((~finite).sum()),
        }
        if out_spec.kind in ("logits", "scale_logits") and r.ndim == 2:
            entry["top1_agreement"] = float((r.argmax(1) == g.argmax(1)).mean())
        per_output[out_spec.name] = entry
    logits = spec.logits_output()
    return {"top1_agreement": per_output[logits]["top1_agreement"], "outputs": per_output}


def fp16_agreement(
    spec: Any,
    fp32_torch_model: Any,
    fp16_onnx_path: str | Path,
    images: np.ndarray,
    labels: np.ndarray | None = None,
    batch_size: int = 64,
    ref: list[np.ndarray] | None = None,
) -> dict[str, Any]:
    """Run the FP16 graph (onnxruntime, CPU) and the fp32 torch model on the same images (``ref``: the
    torch outputs when already computed).

    Returns ``{"top1_agreement", "outputs": {name: {max_abs_err, max_rel_err, nonfinite[, top1_agreement]}},
    "n", "min_top1_agreement", "passed"[, "accuracy_fp32", "accuracy_fp16"]}``."""
    images = np.ascontiguousarray(images, dtype=np.float32)
    if ref is None:
        ref = torch_outputs(fp32_torch_model, images, batch_size)
    session = ort_session(fp16_onnx_path)
    got = ort_outputs(session, spec.input.name, images, list(spec.output_names), batch_size)
    result = compare_outputs(spec, ref, got)
    result["n"] = len(images)
    result["min_top1_agreement"] = spec.checks.fp16_min_top1_agreement
    result["passed"] = result["top1_agreement"] >= spec.checks.fp16_min_top1_agreement
    if labels is not None:
        i = spec.output_names.index(spec.logits_output())
        result["accuracy_fp32"] = float((ref[i].argmax(1) == labels).mean())
        result["accuracy_fp16"] = float((got[i].argmax(1) == labels).mean())
    return result


def check_fp16_agreement(spec: Any, result: dict[str, Any]) -> None:
    """The export gate: raise ``Fp16AgreementError`` when an FP16 graph falls below the spec's bar."""
    if not result["passed"]:
        worst = max(result["outputs"].items(), key=lambda kv: kv[1]["max_rel_err"])
        raise Fp16AgreementError(
            f"model {spec.name!r}: FP16 top-1 agreement {result['top1_agreement']:.4f} < "
            f"{result['min_top1_agreement']} on {result['n']} test images (worst output {worst[0]!r}: "
            f"max abs err {worst[1]['max_abs_err']:.3g}); keep more ops in fp32 "
            "(spec.export.fp16_keep_fp32_ops; `python -m export.fp16 <model> --probe` finds them)"
        )


def fp16_gate(spec: Any, model: Any, fp32_onnx_path: str | Path, n: int = 1000) -> dict[str, Any]:
    """The export pipeline's step: convert the exported graph with the spec's keep-list to
    ``fp16_graph_path``, measure it on ``n`` real test images, raise ``Fp16AgreementError`` under the bar.
    Returns the agreement dict plus ``status`` (one line for the summary) and ``fp16_graph``."""
    from training.data import test_images

    keep = tuple(spec.export.fp16_keep_fp32_ops)
    fp16 = convert_to_fp16(fp32_onnx_path, fp16_graph_path(spec.name), keep)
    images, labels = test_images(n, canvas=spec.train.canvas)
    result = fp16_agreement(spec, model, fp16, images, labels)
    check_fp16_agreement(spec, result)
    result["fp16_graph"] = str(fp16)
    result["status"] = (
        f"fp16 top-1 agreement {result['top1_agreement']:.4f} on {result['n']} images "
        f"(kept fp32: {', '.join(keep) or 'none'})"
    )
    return result


# --------------------------------------------------------------------------------------------- probe


def _expose_all(model: Any, types: dict[str, int]) -> Any:
    """A copy of ``model`` with every float node output added as a graph output."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    have = {o.name for o in model.graph.output}
    for node in model.graph.node:
        for t in node.output:
            if t and t not in have and types.get(t) in (TensorProto.FLOAT, TensorProto.FLOAT16):
                model.graph.output.append(helper.make_tensor_value_info(t, types[t], None))
                have.add(t)
    return model


def probe_drift(
    fp32_onnx_path: str | Path,
    fp16_onnx_path: str | Path,
    images: np.ndarray,
    input_name: str = "image",
) -> list[dict[str, Any]]:
    """Compare every intermediate tensor of the FP16 graph with the FP32 graph's on ``images``.

    One row per float output of an FP32-graph node that has a twin (same name) in the FP16 graph: op,
    name, the dtype it has there, the fp32 output's max |x| (``overflow`` when it is > 65504 and the FP16
    graph holds it in fp16), non-finite values in the FP16 graph, the output's relative error, the
    worst relative error among its float inputs, and ``gain`` = out/in error: a node with a large gain
    is where fp16 drift starts (not where it merely propagates). Sorted worst first."""
    import tempfile

    import onnx

    m32 = onnx.load(str(fp32_onnx_path))
    m16 = onnx.load(str(fp16_onnx_path))
    t32, t16 = _elem_types(m32), _elem_types(m16)
    images = np.ascontiguousarray(images, dtype=np.float32)
    values: list[dict[str, np.ndarray]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for m, types, tag in ((m32, t32, "fp32"), (m16, t16, "fp16")):
            path = Path(tmp) / f"{tag}.onnx"
            onnx.save(_expose_all(m, types), str(path))
            sess = _ort(path, disable_optimizations=True)
            names = [o.name for o in sess.get_outputs()]
            outs = sess.run(names, {input_name: images})
            values.append({n: np.asarray(v, dtype=np.float32) for n, v in zip(names, outs, strict=True)})
    v32, v16 = values
    # Match tensors through node names (the converter keeps them, but renames the outputs of kept nodes).
    alias = {i.name: i.name for i in m32.graph.input}
    by_name = {n.name: n for n in m16.graph.node if n.name}
    for node in m32.graph.node:
        twin = by_name.get(node.name)
        if twin is not None and twin.op_type == node.op_type:
            alias.update(zip(node.output, twin.output, strict=False))

    def rel_err(name: str) -> float | None:
        other = alias.get(name)
        if name not in v32 or other not in v16 or v32[name].shape != v16[other].shape:
            return None
        r, g = v32[name], v16[other]
        scale = max(float(np.abs(r).max()), 1e-6)
        with np.errstate(invalid="ignore", over="ignore"):
            d = np.abs(g - r)
        return float("inf") if not np.all(np.isfinite(d)) else float(d.max() / scale)

    from onnx import TensorProto

    rows = []
    for node in m32.graph.node:
        for out in node.output:
            err = rel_err(out)
            if err is None:
                continue
            in_errs = [e for e in (rel_err(i) for i in node.input if i) if e is not None]
            in_err = max(in_errs) if in_errs else 0.0
            peak = float(np.abs(v32[out]).max()) if v32[out].size else 0.0
            in_fp16 = t16.get(alias[out]) == TensorProto.FLOAT16
            rows.append({
                "node": node.name,
                "op": node.op_type,
                "output": out,
                "dtype": "float16" if in_fp16 else "float32",
                "fp32_max_abs": peak,
                "overflow": in_fp16 and peak > FP16_MAX,
                "nonfinite_fp16": int((~np.isfinite(v16[alias[out]])).sum()),
                "rel_err": err,
                "input_rel_err": in_err,
                # fp16 rounding alone is ~5e-4 relative: floor the input error there (exact inputs)
                "gain": err / max(in_err, 5e-4) if np.isfinite(err) else float("inf"),
            })
    rows.sort(key=lambda r: (not r["overflow"], -r["gain"], -r["rel_err"]))
    return rows


def suspects(rows: list[dict[str, Any]], min_gain: float = 4.0, min_rel_err: float = 5e-3) -> dict[str, list[str]]:
    """Op type -> node names that overflow fp16 or amplify error (``gain`` >= min_gain with a relative
    error of at least ``min_rel_err``): the candidates for ``fp16_keep_fp32_ops``."""
    found: dict[str, list[str]] = {}
    for r in rows:
        if r["overflow"] or r["nonfinite_fp16"] or (r["gain"] >= min_gain and r["rel_err"] >= min_rel_err):
            found.setdefault(r["op"], []).append(r["node"])
    return found


def keep_list_sweep(
    spec: Any,
    fp32_torch_model: Any,
    fp32_onnx_path: str | Path,
    images: np.ndarray,
    candidates: list[tuple[str, ...]] | None = None,
) -> list[dict[str, Any]]:
    """Convert with each candidate keep-list and measure agreement/error: ``()`` (everything fp16),
    each touchy op type in the graph alone, the spec's own list, and all of them together."""
    import tempfile

    import onnx

    present = {n.op_type for n in onnx.load(str(fp32_onnx_path), load_external_data=False).graph.node}
    touchy = tuple(op for op in CANDIDATE_OPS if op in present)
    if candidates is None:
        candidates = [(), *((op,) for op in touchy), tuple(spec.export.fp16_keep_fp32_ops), touchy]
    seen, rows = set(), []
    ref = torch_outputs(fp32_torch_model, np.ascontiguousarray(images, dtype=np.float32))
    with tempfile.TemporaryDirectory() as tmp:
        for keep in candidates:
            if keep in seen:
                continue
            seen.add(keep)
            path = convert_to_fp16(fp32_onnx_path, Path(tmp) / f"k{len(seen)}.onnx", keep)
            res = fp16_agreement(spec, fp32_torch_model, path, images, ref=ref)
            rows.append({
                "keep_fp32_ops": list(keep),
                "top1_agreement": res["top1_agreement"],
                "max_abs_err": {k: v["max_abs_err"] for k, v in res["outputs"].items()},
                "nonfinite": sum(v["nonfinite"] for v in res["outputs"].values()),
                "is_spec": keep == tuple(spec.export.fp16_keep_fp32_ops),
            })
    return rows


# --------------------------------------------------------------------------------------------- report


def _md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(results: dict[str, dict[str, Any]], reports_dir: str | Path | None = None) -> tuple[Path, Path]:
    """``reports/fp16.json`` (everything) and ``reports/fp16.md`` (tables)."""
    out = Path(reports_dir or REPORTS_DIR)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "fp16.json", out / "fp16.md"
    json_path.write_text(json.dumps(results, indent=2, default=float) + "\n")
    parts = [
        "# FP16 graphs vs the fp32 torch models",
        "",
        "onnxruntime (CPU) runs each model's FP16 graph; the reference is the fp32 torch model on the same",
        "test images. Generated by `python -m export.fp16`; do not edit.",
        "",
    ]
    rows = []
    for name, r in results.items():
        a = r["agreement"]
        errs = ", ".join(f"{k} {v['max_abs_err']:.2e}" for k, v in a["outputs"].items())
        rows.append([
            name, ", ".join(r["keep_fp32_ops"]) or "(none)", a["n"], f"{a['top1_agreement']:.4f}",
            "pass" if a["passed"] else "FAIL", errs,
        ])
    parts += [_md_table(["model", "kept in fp32", "images", "top-1 agreement", "gate", "max abs err"], rows), ""]
    for name, r in results.items():
        if r.get("sweep"):
            parts += [f"## {name}: keep-list sweep", ""]
            parts += [_md_table(
                ["kept in fp32", "top-1 agreement", "max abs err (logits)", "non-finite", "spec"],
                [[", ".join(s["keep_fp32_ops"]) or "(none)", f"{s['top1_agreement']:.4f}",
                  f"{s['max_abs_err'][r['logits']]:.2e}", s["nonfinite"], "yes" if s["is_spec"] else ""]
                 for s in r["sweep"]],
            ), ""]
        if r.get("probe"):
            parts += [f"## {name}: nodes where fp16 drift starts (all in fp16)", ""]
            parts += [_md_table(
                ["node", "op", "fp32 max |x|", "rel err", "input rel err", "gain", "overflow"],
                [[p["node"], p["op"], f"{p['fp32_max_abs']:.3g}", f"{p['rel_err']:.2e}", f"{p['input_rel_err']:.2e}",
                  f"{p['gain']:.1f}", "yes" if p["overflow"] else ""] for p in r["probe"][:10]],
            ), ""]
            parts += [f"Suspects: {r['suspects'] or 'none'}", ""]
            for node, v in r.get("suspects_in_spec_graph", {}).items():
                after = v["rel_err_spec_graph"]
                parts += [f"- `{node}`: relative error {v['rel_err_all_fp16']:.2e} with everything in fp16, "
                          + (f"{after:.2e} in the shipped graph ({v['dtype_spec_graph']})" if after is not None
                             else "not comparable in the shipped graph")]
            parts += [""]
    md_path.write_text("\n".join(parts))
    return md_path, json_path


def evaluate_model(
    name: str,
    n: int = 1000,
    probe: bool = False,
    sweep: bool = False,
    out_path: Path | None = None,
) -> dict[str, Any]:
    """Convert a trained, exported model's graph to FP16 and measure it (plus the optional probe and sweep)."""
    from training import get_spec, load_trained
    from training.data import test_images

    spec = get_spec(name)
    fp32 = fp32_graph_path(name)
    if not fp32.is_file():
        raise FileNotFoundError(f"model {name!r}: {fp32} is missing (run `make export` first)")
    model = load_trained(name)
    images, labels = test_images(n, canvas=spec.train.canvas)
    keep = tuple(spec.export.fp16_keep_fp32_ops)
    fp16 = convert_to_fp16(fp32, out_path or fp16_graph_path(name), keep)
    result: dict[str, Any] = {
        "keep_fp32_ops": list(keep),
        "fp16_graph": str(fp16),
        "logits": spec.logits_output(),
        "agreement": fp16_agreement(spec, model, fp16, images, labels),
    }
    if probe:
        with __import__("tempfile").TemporaryDirectory() as tmp:
            all_fp16 = convert_to_fp16(fp32, Path(tmp) / "all.fp16.onnx", ())
            rows = probe_drift(fp32, all_fp16, images[:64], spec.input.name)
            found = suspects(rows)
            # The same nodes in the shipped graph (spec's keep-list): does keeping them in fp32 help?
            kept_rows = {r["node"]: r for r in probe_drift(fp32, fp16, images[:64], spec.input.name)}
        result["probe"] = rows[:40]
        result["suspects"] = found
        result["suspects_in_spec_graph"] = {
            node: {"rel_err_all_fp16": next(r["rel_err"] for r in rows if r["node"] == node),
                   "rel_err_spec_graph": kept_rows[node]["rel_err"] if node in kept_rows else None,
                   "dtype_spec_graph": kept_rows[node]["dtype"] if node in kept_rows else None}
            for nodes in found.values() for node in nodes
        }
    if sweep:
        result["sweep"] = keep_list_sweep(spec, model, fp32, images)
    return result


def main(argv: list[str] | None = None) -> int:
    from training import list_models

    p = argparse.ArgumentParser(prog="python -m export.fp16", description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="*", default=["all"], help="model names, or 'all' (default)")
    p.add_argument("-n", "--images", type=int, default=1000, help="test images per model (default 1000)")
    p.add_argument("--probe", action="store_true", help="find the nodes where fp16 overflows or drifts")
    p.add_argument("--sweep", action="store_true", help="measure candidate keep-lists")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    names = list_models() if args.models in (["all"], []) else args.models
    results, failed = {}, []
    for name in names:
        try:
            r = evaluate_model(name, args.images, args.probe, args.sweep)
        except Exception as exc:
            if args.debug:
                raise
            print(f"{name}: skipped: {exc}", file=sys.stderr)
            continue
        results[name] = r
        a = r["agreement"]
        print(f"{name}: fp16 top-1 agreement {a['top1_agreement']:.4f} on {a['n']} images "
              f"({'pass' if a['passed'] else 'FAIL'}), kept fp32: {r['keep_fp32_ops'] or 'none'}")
        if not a["passed"]:
            failed.append(name)
    if results:
        md, _ = write_report(results)
        print(f"wrote {md}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
