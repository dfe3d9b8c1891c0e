"""FP16 conversion: an FP32 graph -> an FP16-typed graph, as an ordered list of named graph passes.

TensorRT-RTX and TensorRT 11 are strongly typed: an FP16 engine is an FP16-typed ONNX graph. It comes from
the exported FP32 graph through onnxruntime's converter (``onnxruntime.transformers.float16``), with fp32
inputs/outputs and chosen nodes left in fp32 behind Casts. ``convert_to_fp16`` runs ``PASSES`` in order on
the ``ModelProto`` (each returns how many things it changed), then ``validate`` checks the result: strict
shape inference, ``onnx.checker`` full check, every kept node fp32, output dtypes unchanged.

Which converter (measured on every model's graph, the test graphs of tests/test_fp16.py and RA-CNN at
sides 64/80/96; onnxruntime 1.32, onnxconverter-common 1.16, TensorRT-RTX 1.7.1): onnxruntime's copy is a
drop-in for onnxconverter-common's (the same outputs, to the last digit, once the passes below ran) and
makes these old hand-written repairs unnecessary, so they are gone:

- the global monkeypatch of onnxconverter-common's last step (``remove_unnecessary_cast_node``, which raised
  "The downstream node of the second cast node should be graph output" when a kept op produces a graph
  output): onnxruntime's copy has no such step, so nothing is patched;
- saving and restoring the fp32 weights of kept nodes (onnxconverter-common rounded every initializer to
  fp16 and Cast it back): onnxruntime's keeps an initializer that only fp32 nodes read in fp32;
- restoring graph outputs that a kept op left fp16, and re-pointing in-graph readers of a graph output:
  onnxruntime's renames graph outputs before converting; both repairs changed nothing on any graph;
- giving kept nodes their own copy of a constant shared with fp16 nodes (RA-CNN's 1.0 shared by Range
  and Sub): onnxruntime's converts the shared constant and Casts it for the kept node (outputs identical);
- naming unnamed nodes: the dynamo exporter names every node (0 renamed on every graph); ``convert``
  refuses a graph whose node-level choices would need a name instead.

The old rule "everything computed from tensor shapes stays fp32" was narrowed to its int -> float Casts:
measured, that alone makes every RA-CNN graph build in TensorRT-RTX, with outputs identical to the wider
rule at sides 64, 80 and 96.

What is left, each with a test in tests/test_fp16.py that fails without it:

- ``keep_ops_without_fp16`` (ops ONNX defines without fp16, RA-CNN's Range, stay fp32): else the checker
  refuses the graph (``test_each_pass_is_needed[keep_ops_without_fp16]``);
- ``keep_int_to_float_casts`` (a size or index turned into a float stays fp32): TensorRT computes
  shape-derived values on the host, in fp32 only, so an int64 -> fp16 Cast of a shape fails the
  TensorRT-RTX build ("ShapeHostToDeviceCopy ... output type must be ... kFLOAT")
  (``test_int_to_float_casts_are_needed_by_tensorrt``); and fp16 holds integers exactly only up to 2048;
- ``drop_value_info`` (the converter annotates fp16 the fp32 weights it leaves to kept nodes: a kept Gemm's
  weights): else shape inference refuses the graph (``test_each_pass_is_needed[drop_value_info]``);
- ``sort_topologically`` (the converter appends its Casts at the end of the node list): else the graph
  is not topologically sorted and shape inference refuses it (``test_each_pass_is_needed[sort_topologically]``);
- ``remove_cast_round_trips`` (the converter puts ``Cast(fp32)(Cast(fp16)(x))`` after a kept node whose
  output feeds another kept node or leaves the graph): else a kept MatMul's 1e5 goes through fp16 to inf
  and a kept Gemm's output is rounded to fp16 (``test_cast_round_trips_are_removed``).
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

log = logging.getLogger(__name__)

FP16_MAX = 65504.0
FLOAT, FLOAT16 = 1, 10  # onnx.TensorProto.FLOAT / FLOAT16 (onnx is imported lazily)
INTEGER_TYPES = frozenset({2, 3, 4, 5, 6, 7, 9, 12, 13})  # uint8 int8 uint16 int16 int32 int64 bool uint32 uint64
METADATA_KEY = "attnzoo.fp16_fp32_op_types"


class Fp16GraphError(RuntimeError):
    """The converted graph is not what was asked for (invalid, or a kept op still runs in fp16)."""


@dataclass
class Fp16Plan:
    """What a conversion was asked for and what the passes decided: the state the passes share."""

    keep_fp32_ops: tuple[str, ...] = ()
    keep_fp32_nodes: tuple[str, ...] = ()
    block_ops: set[str] = field(default_factory=set)  # op types the converter leaves in fp32
    block_nodes: set[str] = field(default_factory=set)  # node names the converter leaves in fp32
    output_types: dict[str, int] = field(default_factory=dict)  # graph output -> its original elem type
    changes: dict[str, int] = field(default_factory=dict)  # pass name -> what it changed


class GraphPass(NamedTuple):
    name: str
    run: Callable[[Any, Fp16Plan], int]


# ------------------------------------------------------------------------------------------------ helpers


def elem_types(model: Any) -> dict[str, int]:
    """Tensor name -> ONNX element type, after shape inference."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    types = {}
    for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    for init in inferred.graph.initializer:
        types[init.name] = init.data_type
    return types


def cast_to(node: Any) -> int | None:
    """The element type a Cast node casts to (None for any other node)."""
    return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None


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


def kept_op_problems(model: Any, keep_fp32_ops: tuple[str, ...], keep_fp32_nodes: tuple[str, ...] = ()) -> list[str]:
    """Nodes that should run in fp32 but see an fp16 input or produce an fp16 output (empty: all good)."""
    types = elem_types(model)
    problems = []
    for node in model.graph.node:
        if node.op_type not in keep_fp32_ops and node.name not in keep_fp32_nodes:
            continue
        for t in [*node.input, *node.output]:
            if t and types.get(t) == FLOAT16:
                problems.append(f"node {node.name!r} ({node.op_type}) has fp16 tensor {t!r}")
    return problems


# ------------------------------------------------------------------------------------------------- passes


def keep_requested(model: Any, plan: Fp16Plan) -> int:
    """The caller's keep-list (op types, chosen by measurement) and node names. Returns the nodes kept."""
    plan.block_ops |= set(plan.keep_fp32_ops)
    plan.block_nodes |= set(plan.keep_fp32_nodes)
    return sum(n.op_type in plan.block_ops or n.name in plan.block_nodes for n in model.graph.node)


def keep_ops_without_fp16(model: Any, plan: Fp16Plan) -> int:
    """Ops that ONNX defines without fp16 (Range) stay fp32. Returns the op types added."""
    new = set(ops_without_fp16(model)) - plan.block_ops
    plan.block_ops |= new
    return len(new)


def keep_int_to_float_casts(model: Any, plan: Fp16Plan) -> int:
    """Casts from integers to float32 (sizes turned into divisors or coordinates) stay fp32: TensorRT
    computes shape-derived values on the host, in fp32 only. Returns the nodes added."""
    types = elem_types(model)
    new = {n.name for n in model.graph.node if cast_to(n) == FLOAT and types.get(n.input[0]) in INTEGER_TYPES}
    new -= plan.block_nodes
    plan.block_nodes |= new
    return len(new)


def convert(model: Any, plan: Fp16Plan) -> int:
    """onnxruntime's converter with the plan's block lists (replacing its default list: ML ops and ops some
    runtimes once lacked fp16 kernels for), fp32 I/O, and constants clamped at fp16's real range (65504; a
    weight beyond it is logged: the agreement gate shows the cost). Returns the Casts it added.

    (Importing it appends onnxruntime/transformers to ``sys.path``, as that package's ``__init__`` does:
    appended, so it shadows nothing.)"""
    from onnx import numpy_helper
    from onnxruntime.transformers.float16 import convert_float_to_float16

    if "" in plan.block_nodes:
        raise Fp16GraphError("a node kept in fp32 has no name (node-level choices need names; the dynamo "
                             "exporter names every node)")
    plan.output_types = {o.name: o.type.tensor_type.elem_type for o in model.graph.output}
    peaks = {t.name: float(np.abs(numpy_helper.to_array(t)).max(initial=0.0))
             for t in model.graph.initializer if t.data_type == FLOAT}
    casts = sum(n.op_type == "Cast" for n in model.graph.node)
    model.CopyFrom(convert_float_to_float16(
        model, keep_io_types=True, op_block_list=sorted(plan.block_ops), node_block_list=sorted(plan.block_nodes),
        max_finite_val=FP16_MAX,
    ))
    clamped = [t.name for t in model.graph.initializer if t.data_type == FLOAT16 and peaks.get(t.name, 0.0) > FP16_MAX]
    if clamped:
        log.warning("weights %s exceed fp16's range and were clamped to +-65504; keep their ops in fp32",
                    ", ".join(clamped[:5]))
    meta = model.metadata_props.add()
    meta.key, meta.value = METADATA_KEY, ",".join(sorted(plan.block_ops))
    return sum(n.op_type == "Cast" for n in model.graph.node) - casts


def drop_value_info(model: Any, plan: Fp16Plan) -> int:
    """The converter's value_info is stale after its Casts; the types are inferred again from the nodes.
    Returns the annotations dropped."""
    n = len(model.graph.value_info)
    del model.graph.value_info[:]
    return n


def sort_topologically(model: Any, plan: Fp16Plan) -> int:
    """The converter appends its Casts at the end of the node list; ONNX wants producers before consumers.
    Kahn's order, ties in the current order. Returns the nodes that moved."""
    graph = model.graph
    nodes = list(graph.node)
    producer = {o: k for k, n in enumerate(nodes) for o in n.output if o}
    waiting = [{producer[i] for i in n.input if i in producer} for n in nodes]
    consumers: dict[int, list[int]] = {}
    for k, deps in enumerate(waiting):
        for d in deps:
            consumers.setdefault(d, []).append(k)
    ready = [k for k, deps in enumerate(waiting) if not deps]
    heapq.heapify(ready)
    order = []
    while ready:
        k = heapq.heappop(ready)
        order.append(k)
        for c in consumers.get(k, ()):
            waiting[c].discard(k)
            if not waiting[c]:
                heapq.heappush(ready, c)
    if len(order) != len(nodes):
        raise Fp16GraphError("the FP16 graph has a cycle")
    moved = sum(k != j for j, k in enumerate(order))
    if moved:
        del graph.node[:]
        graph.node.extend(nodes[k] for k in order)
    return moved


def remove_cast_round_trips(model: Any, plan: Fp16Plan) -> int:
    """Rewire ``Cast(to=fp32)(Cast(to=fp16)(x))`` with x fp32 to x itself (a graph output keeps its name,
    through an Identity). The converter puts such a round trip after a kept node whose output feeds another
    kept node or leaves the graph: it only loses precision (or overflows). Needs sorted nodes (types are
    inferred). Returns the round trips removed."""
    graph = model.graph
    types = elem_types(model)
    producers = {o: n for n in graph.node for o in n.output}
    outputs = {o.name for o in graph.output}
    removed = 0
    for node in list(graph.node):
        first = producers.get(node.input[0]) if cast_to(node) == FLOAT else None
        if first is None or cast_to(first) != FLOAT16 or types.get(first.input[0]) != FLOAT:
            continue
        src, dst = first.input[0], node.output[0]
        if dst in outputs:
            node.op_type, node.input[0] = "Identity", src
            del node.attribute[:]
        else:
            for n in graph.node:
                n.input[:] = [src if i == dst else i for i in n.input]
            graph.node.remove(node)
        removed += 1
    used = {i for n in graph.node for i in n.input} | outputs
    for node in list(graph.node):  # first halves left without a reader
        if node.op_type == "Cast" and node.output[0] not in used:
            graph.node.remove(node)
    return removed


PASSES: tuple[GraphPass, ...] = (
    GraphPass("keep_requested", keep_requested),
    GraphPass("keep_ops_without_fp16", keep_ops_without_fp16),
    GraphPass("keep_int_to_float_casts", keep_int_to_float_casts),
    GraphPass("convert", convert),
    GraphPass("drop_value_info", drop_value_info),
    GraphPass("sort_topologically", sort_topologically),
    GraphPass("remove_cast_round_trips", remove_cast_round_trips),
)


def passes_without(*names: str) -> tuple[GraphPass, ...]:
    """``PASSES`` less the named ones (to show what a pass is for); an unknown name is an error."""
    unknown = set(names) - {p.name for p in PASSES}
    if unknown:
        raise KeyError(f"no FP16 passes named {sorted(unknown)}; the passes are {[p.name for p in PASSES]}")
    return tuple(p for p in PASSES if p.name not in names)


# ----------------------------------------------------------------------------------------------- convert


def run_passes(model: Any, plan: Fp16Plan, passes: tuple[GraphPass, ...] = PASSES, where: str = "") -> Fp16Plan:
    """Run ``passes`` in order on ``model`` (in place), recording what each changed in ``plan.changes``.
    A pass that fails raises ``Fp16GraphError`` naming it."""
    for p in passes:
        try:
            plan.changes[p.name] = p.run(model, plan)
        except Fp16GraphError as exc:
            raise Fp16GraphError(f"{where}: fp16 pass {p.name!r}: {exc}") from exc
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise Fp16GraphError(f"{where}: fp16 pass {p.name!r} failed: {first}") from exc
        log.debug("%s: fp16 pass %s changed %d", where, p.name, plan.changes[p.name])
    return plan


def validate(model: Any, plan: Fp16Plan, where: str = "") -> Any:
    """Strict shape inference, the full ONNX check, kept nodes fp32, output dtypes as before. Returns the
    model with inferred value_info; raises ``Fp16GraphError``."""
    import onnx

    try:
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:
        raise Fp16GraphError(f"{where}: the FP16 graph is invalid: {str(exc).strip().splitlines()[0]}") from exc
    problems = kept_op_problems(model, plan.keep_fp32_ops, plan.keep_fp32_nodes)
    if problems:
        raise Fp16GraphError(f"{where}: ops meant to stay fp32 run in fp16: {'; '.join(problems[:3])}")
    wrong = [o.name for o in model.graph.output
             if o.name in plan.output_types and o.type.tensor_type.elem_type != plan.output_types[o.name]]
    if wrong:
        raise Fp16GraphError(f"{where}: FP16 graph outputs {wrong} changed dtype")
    return model


def convert_to_fp16(
    onnx_path: str | Path,
    out_path: str | Path,
    keep_fp32_ops: tuple[str, ...] = (),
    keep_fp32_nodes: tuple[str, ...] = (),
    *,
    passes: tuple[GraphPass, ...] = PASSES,
) -> Path:
    """Write an FP16 copy of an FP32 graph: fp32 inputs/outputs, ``keep_fp32_ops`` (op types) and
    ``keep_fp32_nodes`` (node names) computed in fp32. Validated; raises ``Fp16GraphError`` otherwise.
    ``passes``: what to run (tests leave one out to show what it is for)."""
    import onnx

    onnx_path, out_path = Path(onnx_path), Path(out_path)
    model = onnx.load(str(onnx_path))
    plan = run_passes(model, Fp16Plan(tuple(keep_fp32_ops), tuple(keep_fp32_nodes)), passes, str(onnx_path))
    model = validate(model, plan, str(onnx_path))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out_path))
    return out_path
