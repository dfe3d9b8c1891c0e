"""Measuring what to keep in fp32: the drift probe, its suspects, and the keep-list sweep.

``spec.export.fp16_keep_fp32_ops`` is chosen by measurement:

- ``probe_drift`` runs an FP32 graph and its FP16 twin with every intermediate tensor exposed and names the
  nodes whose output overflows fp16 (|x| > 65504) or whose relative error jumps well above its inputs';
- ``suspects`` keeps the op types worth keeping in fp32;
- ``keep_list_sweep`` converts with candidate keep-lists and measures each deployable's agreement and error
  against the fp32 torch model (through ``export.fp16.gate.measure``, i.e. the one comparator).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from export.fp16.gate import convert_graphs, graph_paths_of, measure, reference_outputs
from export.fp16.passes import FLOAT, FLOAT16, FP16_MAX, convert_to_fp16, elem_types
from export.runners import ComposedRunner, OnnxRuntimeRunner
from training.registry import ModelSpec

# Op types worth trying in fp32 when they are in a graph: numerically touchy ones (ranges, exp/log,
# reductions, attention-style products, sampling coordinates).
CANDIDATE_OPS = (
    "MatMul", "Gemm", "Softmax", "GridSample", "Exp", "Log", "Pow", "Sqrt", "Div", "ReduceSum",
    "ReduceMean", "Resize", "LayerNormalization", "Sigmoid", "Einsum",
)
PROBE_SAMPLES = 64


def expose_all(model: Any, types: dict[str, int]) -> Any:
    """A copy of ``model`` with every float node output added as a graph output."""
    import onnx
    from onnx import helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    have = {o.name for o in model.graph.output}
    for node in model.graph.node:
        for t in node.output:
            if t and t not in have and types.get(t) in (FLOAT, FLOAT16):
                model.graph.output.append(helper.make_tensor_value_info(t, types[t], None))
                have.add(t)
    return model


def all_tensors(path: str | Path, feeds: dict[str, np.ndarray]) -> tuple[Any, dict[str, int], dict[str, np.ndarray]]:
    """The graph at ``path``, its tensor types, and every float tensor it computes on ``feeds`` (onnxruntime
    with graph optimizations off, so that every node's output exists)."""
    import onnx

    model = onnx.load(str(path))
    types = elem_types(model)
    with tempfile.TemporaryDirectory() as tmp:
        exposed = Path(tmp) / "exposed.onnx"
        onnx.save(expose_all(model, types), str(exposed))
        values = OnnxRuntimeRunner(exposed, disable_optimizations=True).infer(feeds)
    return model, types, {k: np.asarray(v, dtype=np.float32) for k, v in values.items()}


def probe_drift(fp32_onnx_path: str | Path, fp16_onnx_path: str | Path,
                feeds: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """Compare every intermediate tensor of the FP16 graph with the FP32 graph's on ``feeds``.

    One row per float output of an FP32-graph node that has a twin (same node name) in the FP16 graph: op,
    name, the dtype it has there, the fp32 output's max |x| (``overflow`` when it is > 65504 and the FP16
    graph holds it in fp16), non-finite values in the FP16 graph, the output's relative error, the worst
    relative error among its float inputs, and ``gain`` = out/in error: a node with a large gain is where
    fp16 drift starts (not where it merely propagates). Sorted worst first."""
    m32, _, v32 = all_tensors(fp32_onnx_path, feeds)
    m16, t16, v16 = all_tensors(fp16_onnx_path, feeds)
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
        scale = max(float(np.abs(r).max(initial=0.0)), 1e-6)
        with np.errstate(invalid="ignore", over="ignore"):
            d = np.abs(g - r)
        return float("inf") if not np.all(np.isfinite(d)) else float(d.max(initial=0.0) / scale)

    rows = []
    for node in m32.graph.node:
        for out in node.output:
            err = rel_err(out)
            if err is None:
                continue
            in_errs = [e for e in (rel_err(i) for i in node.input if i) if e is not None]
            in_err = max(in_errs) if in_errs else 0.0
            peak = float(np.abs(v32[out]).max(initial=0.0))
            in_fp16 = t16.get(alias[out]) == FLOAT16
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


def graph_feeds(spec: ModelSpec, graph_paths: dict[str, Path], feeds: dict[str, np.ndarray]) -> dict[str, dict]:
    """Graph name -> the feeds that graph sees in the deployable: the spec's inputs for one graph, the fp32
    pipeline's tensors (its graphs composed on onnxruntime) for a composition."""
    if spec.composition is None:
        return {name: feeds for name in graph_paths}
    runners = {g: OnnxRuntimeRunner(p) for g, p in graph_paths.items()}
    tensors = set(feeds) | {p for s in spec.composition.steps for p in s.output_map.values()}
    values = ComposedRunner(spec.composition, runners, tuple(sorted(tensors))).infer(feeds)
    return {s.graph: {g: values[p] for g, p in s.input_map.items()} for s in spec.composition.steps}


def probe_model(spec: ModelSpec, graph_paths: dict[str, Path] | Path, feeds: dict[str, np.ndarray],
                limit: int = 40) -> dict[str, dict[str, Any]]:
    """Per graph: the drift probe with everything in fp16 (``rows``, the worst ``limit``), its ``suspects``,
    and how the suspects fare in the graph the spec's keep-list makes (``suspects_in_spec_graph``)."""
    graph_paths = graph_paths_of(spec, graph_paths)
    per_graph = graph_feeds(spec, graph_paths, {k: v[:PROBE_SAMPLES] for k, v in feeds.items()})
    keep = tuple(spec.export.fp16_keep_fp32_ops)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, fp32 in graph_paths.items():
            x = per_graph[name]
            rows = probe_drift(fp32, convert_to_fp16(fp32, Path(tmp) / f"{name}.all.onnx", ()), x)
            kept = {r["node"]: r for r in probe_drift(fp32, convert_to_fp16(fp32, Path(tmp) / f"{name}.onnx", keep), x)}
            found = suspects(rows)
            first = {r["node"]: r for r in reversed(rows)}
            out[name] = {
                "rows": rows[:limit],
                "suspects": found,
                "suspects_in_spec_graph": {
                    node: {"rel_err_all_fp16": first[node]["rel_err"],
                           "rel_err_spec_graph": kept[node]["rel_err"] if node in kept else None,
                           "dtype_spec_graph": kept[node]["dtype"] if node in kept else None}
                    for nodes in found.values() for node in nodes
                },
            }
    return out


def keep_list_sweep(spec: ModelSpec, model: Any, graph_paths: dict[str, Path] | Path, feeds: dict[str, np.ndarray],
                    candidates: list[tuple[str, ...]] | None = None) -> list[dict[str, Any]]:
    """Convert with each candidate keep-list and measure the deployable against the fp32 torch ``model``:
    by default ``()`` (everything fp16), each touchy op type in the graphs alone, the spec's own list, and
    all of them together."""
    import onnx

    graph_paths = graph_paths_of(spec, graph_paths)
    present = {n.op_type for p in graph_paths.values() for n in onnx.load(str(p), load_external_data=False).graph.node}
    touchy = tuple(op for op in CANDIDATE_OPS if op in present)
    spec_keep = tuple(spec.export.fp16_keep_fp32_ops)
    if candidates is None:
        candidates = [(), *((op,) for op in touchy), spec_keep, touchy]
    reference = reference_outputs(spec, model, feeds)
    rows, seen = [], set()
    with tempfile.TemporaryDirectory() as tmp:
        for keep in candidates:
            keep = tuple(keep)
            if keep in seen:
                continue
            seen.add(keep)
            fp16 = convert_graphs(spec, graph_paths, keep, Path(tmp) / f"k{len(seen)}")
            res = measure(spec, reference, fp16, feeds)
            rows.append({
                "keep_fp32_ops": list(keep),
                "agreement": res["agreement"],
                "agreements": res["agreements"],
                "max_abs": res["max_abs"],
                "nonfinite": sum(res["nonfinite"].values()),
                "passed": res["passed"],
                "is_spec": keep == spec_keep,
            })
    return rows
