"""FP16 conversion: an FP32 graph -> an FP16-typed graph, as an ordered list of named graph passes.

TensorRT-RTX and TensorRT 11 are strongly typed: an FP16 engine is an FP16-typed ONNX graph. The graph
comes from the exported FP32 graph through onnxruntime's converter (``onnxruntime.transformers.float16``),
with fp32 inputs/outputs and chosen nodes left in fp32 behind Casts. ``convert_to_fp16`` runs ``PASSES``
in order on the ONNX ``ModelProto``; each pass returns how many things it changed, then the result is
validated (strict shape inference, ``onnx.checker`` full check, every kept node fp32, I/O dtypes unchanged).

Which converter (measured on this repo's graphs with onnxruntime 1.32 / onnxconverter-common 1.16):
onnxruntime's copy is a drop-in for onnxconverter-common's and makes four hand-written repairs unnecessary:

- its last step (``remove_unnecessary_cast_node``) raised "The downstream node of the second cast node
  should be graph output" when a kept op produces a graph output, and was monkeypatched away: onnxruntime's
  copy has no such step, so no patch;
- it rounded every initializer to fp16 and Cast it back for kept nodes ("kept in fp32" weights lost
  precision): onnxruntime's keeps an initializer that only fp32 nodes read in fp32 (the old
  kept-initializer save/restore repair);
- it left a graph output in fp16 when a kept op produced it (the old ``restore_output_types``) and pointed
  in-graph readers of an output at the fp32 Cast (the old ``fix_output_consumers``): onnxruntime's renames
  graph outputs up front, so both passes changed nothing on any graph (measured: 0 changes);
- it fed a constant shared by a kept and an fp16 node to the fp16 node uncast (the old
  ``unshare_constants``): onnxruntime's converts the shared constant and Casts it for the kept node.

What onnxruntime's converter still needs, each pass with a test (tests/test_fp16.py) that fails without it:

- ``keep_ops_without_fp16``: ops ONNX defines without fp16 (RA-CNN's Range) must stay fp32 whatever the
  keep-list says; else the checker refuses the graph;
- ``keep_shape_arithmetic``: values computed from tensor shapes stay fp32 up to their first use on image
  data: TensorRT evaluates shape-derived values on the host, in fp32 only, so an fp16 one fails the
  TensorRT-RTX build ("ShapeHostToDeviceCopy ... kFLOAT"), and fp16 would round RA-CNN's pixel coordinates;
- ``remove_cast_round_trips``: the converter puts ``Cast(fp32)(Cast(fp16)(x))`` after a kept node whose
  output leaves the graph or feeds another kept node: only precision lost (a kept-fp32 output rounded to
  fp16), and on shape-derived values TensorRT cannot build it;
- ``sort_topologically``: the converter appends its Casts at the end of the node list, and
  ``onnx.checker`` refuses a graph whose nodes are not topologically sorted.

``name_nodes`` gives unnamed nodes names (node-level choices and the converter's Cast names need them);
``drop_value_info`` drops the converter's stale value_info, which validation infers again from the nodes.
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
FLOAT, FLOAT16 = 1, 10  # onnx.TensorProto.FLOAT / FLOAT16 (onnx imported lazily)
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

    def kept(self, node: Any) -> bool:
        return node.op_type in self.block_ops or node.name in self.block_nodes


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


def _cast_to(node: Any) -> int | None:
    return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None


def _rename_input(model: Any, old: str, new: str) -> None:
    for n in model.graph.node:
        n.input[:] = [new if i == old else i for i in n.input]


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
    types = elem_types(model)
    float_host = {t for t in shape_derived if types.get(t) == FLOAT}
    boundary = {n.name for n in graph.node if n.name not in names and float_host.intersection(n.input)}
    return names | boundary


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


def name_nodes(model: Any, plan: Fp16Plan) -> int:
    """Node-level choices (and the converter's Cast names) need names: give unnamed nodes unique ones."""
    taken = {n.name for n in model.graph.node if n.name}
    named = 0
    for k, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{k}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)
            named += 1
    return named


def keep_requested(model: Any, plan: Fp16Plan) -> int:
    """The caller's keep-list (op types, chosen by measurement) and node names: nodes kept in fp32."""
    plan.block_ops |= set(plan.keep_fp32_ops)
    plan.block_nodes |= set(plan.keep_fp32_nodes)
    return sum(plan.kept(n) for n in model.graph.node)


def keep_ops_without_fp16(model: Any, plan: Fp16Plan) -> int:
    """Ops that ONNX defines without fp16 (Range) stay fp32: op types added."""
    new = set(ops_without_fp16(model)) - plan.block_ops
    plan.block_ops |= new
    return len(new)


def keep_shape_arithmetic(model: Any, plan: Fp16Plan) -> int:
    """Shape-derived arithmetic and its first use on image data stay fp32 (TensorRT computes it on the
    host, in fp32 only), and so do the graph's own Casts to fp32 (sizes turned into divisors or
    coordinates): nodes added."""
    casts = {n.name for n in model.graph.node if _cast_to(n) == FLOAT}
    new = (shape_subgraph_nodes(model) | casts) - plan.block_nodes
    plan.block_nodes |= new
    return len(new)


def convert(model: Any, plan: Fp16Plan) -> int:
    """onnxruntime's converter with the plan's block lists (replacing its default list: ML ops and ops
    some runtimes once lacked fp16 kernels for), fp32 I/O, and constants clamped at fp16's real range
    (65504; a weight beyond it is logged: the agreement gate shows the cost). Returns the Casts it added."""
    from onnx import numpy_helper
    from onnxruntime.transformers.float16 import convert_float_to_float16

    plan.output_types = {o.name: o.type.tensor_type.elem_type for o in model.graph.output}
    peaks = {t.name: float(np.abs(numpy_helper.to_array(t)).max(initial=0.0))
             for t in model.graph.initializer if t.data_type == FLOAT}
    before = sum(n.op_type == "Cast" for n in model.graph.node)
    converted = convert_float_to_float16(
        model, keep_io_types=True, op_block_list=sorted(plan.block_ops), node_block_list=sorted(plan.block_nodes),
        max_finite_val=FP16_MAX,
    )
    model.CopyFrom(converted)
    clamped = [t.name for t in model.graph.initializer if t.data_type == FLOAT16 and peaks.get(t.name, 0.0) > FP16_MAX]
    if clamped:
        log.warning("weights %s exceed fp16's range and were clamped to +-65504; keep their ops in fp32",
                    ", ".join(clamped[:5]))
    meta = model.metadata_props.add()
    meta.key, meta.value = METADATA_KEY, ",".join(sorted(plan.block_ops))
    return sum(n.op_type == "Cast" for n in model.graph.node) - before


def drop_value_info(model: Any, plan: Fp16Plan) -> int:
    """The converter's value_info annotations can be stale after its Casts; validation infers them again."""
    n = len(model.graph.value_info)
    del model.graph.value_info[:]
    return n


def remove_cast_round_trips(model: Any, plan: Fp16Plan) -> int:
    """Rewire ``Cast(to=fp32)(Cast(to=fp16)(x))`` with x fp32 to x itself.

    The converter puts such a round trip after a kept node whose output leaves the graph (the fp32 output
    goes through fp16) or feeds another kept node. It only loses precision, and on shape-derived values
    TensorRT cannot even build it (host tensors are fp32 only)."""
    graph = model.graph
    types = elem_types(model)
    producers = {o: n for n in graph.node for o in n.output}
    outputs = {o.name for o in graph.output}
    removed = 0
    for node in list(graph.node):
        first = producers.get(node.input[0]) if _cast_to(node) == FLOAT else None
        if first is None or _cast_to(first) != FLOAT16:
            continue
        src, dst = first.input[0], node.output[0]
        if types.get(src) != FLOAT:
            continue
        if dst in outputs:  # a graph output keeps its name: read the fp32 source through an Identity
            node.op_type, node.input[0] = "Identity", src
            del node.attribute[:]
        else:
            _rename_input(model, dst, src)
            graph.node.remove(node)
        removed += 1
    used = {i for n in graph.node for i in n.input} | outputs
    for node in list(graph.node):  # first halves left without a consumer
        if node.op_type == "Cast" and node.output[0] not in used:
            graph.node.remove(node)
    return removed


def sort_topologically(model: Any, plan: Fp16Plan) -> int:
    """The converter appends its Casts at the end of the node list; ONNX wants producers before
    consumers. Stable (Kahn's order, ties in the current order). Returns the nodes that moved."""
    graph = model.graph
    nodes = list(graph.node)
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    producer = {o: k for k, n in enumerate(nodes) for o in n.output}
    waiting = [{i for i in n.input if i not in available and i in producer} for n in nodes]
    consumers: dict[str, list[int]] = {}
    for k, deps in enumerate(waiting):
        for t in deps:
            consumers.setdefault(t, []).append(k)
    ready = [k for k, deps in enumerate(waiting) if not deps]
    heapq.heapify(ready)
    order = []
    while ready:
        k = heapq.heappop(ready)
        order.append(k)
        for t in nodes[k].output:
            for c in consumers.get(t, ()):
                waiting[c].discard(t)
                if not waiting[c]:
                    heapq.heappush(ready, c)
    if len(order) != len(nodes):
        raise Fp16GraphError("the FP16 graph has a cycle")
    moved = sum(k != j for j, k in enumerate(order))
    if moved:
        sorted_nodes = [nodes[k] for k in order]
        del graph.node[:]
        graph.node.extend(sorted_nodes)
    return moved


PASSES: tuple[GraphPass, ...] = (
    GraphPass("name_nodes", name_nodes),
    GraphPass("keep_requested", keep_requested),
    GraphPass("keep_ops_without_fp16", keep_ops_without_fp16),
    GraphPass("keep_shape_arithmetic", keep_shape_arithmetic),
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


def run_passes(model: Any, plan: Fp16Plan, passes: tuple[GraphPass, ...] = PASSES) -> Fp16Plan:
    """Run ``passes`` in order on ``model`` (in place), recording what each changed in ``plan.changes``."""
    for p in passes:
        plan.changes[p.name] = p.run(model, plan)
        log.debug("fp16 pass %s: %d", p.name, plan.changes[p.name])
    return plan


def validate(model: Any, plan: Fp16Plan, where: str) -> Any:
    """Strict shape inference, the full ONNX check, kept nodes fp32, I/O dtypes as before; returns the
    model with inferred value_info. Raises ``Fp16GraphError``."""
    import onnx

    try:
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:
        raise Fp16GraphError(f"{where}: the FP16 graph is invalid: {str(exc).strip().splitlines()[0]}") from exc
    problems = kept_op_problems(model, plan.keep_fp32_ops, plan.keep_fp32_nodes)
    if problems:
        raise Fp16GraphError(f"{where}: ops meant to stay fp32 run in fp16: {'; '.join(problems[:3])}")
    wrong_io = [o.name for o in model.graph.output
                if o.name in plan.output_types and o.type.tensor_type.elem_type != plan.output_types[o.name]]
    if wrong_io:
        raise Fp16GraphError(f"{where}: FP16 graph outputs {wrong_io} changed dtype")
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
    ``keep_fp32_nodes`` (node names) computed in fp32. Verified (``validate``); raises ``Fp16GraphError``
    otherwise. ``passes``: the passes to run (tests drop one to show what it is for)."""
    import onnx

    onnx_path, out_path = Path(onnx_path), Path(out_path)
    model = onnx.load(str(onnx_path))
    plan = run_passes(model, Fp16Plan(tuple(keep_fp32_ops), tuple(keep_fp32_nodes)), passes)
    model = validate(model, plan, str(onnx_path))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out_path))
    return out_path
