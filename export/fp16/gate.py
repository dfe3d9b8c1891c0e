"""The FP16 export gate: the fp32 torch model vs onnxruntime on the FP16 graphs, on real test images.

Every graph of a deployable is converted with ``spec.export.fp16_keep_fp32_ops`` to
``training.layout.fp16_onnx_path`` (a build product: the served FP16 form is the TensorRT engine), the
graphs are run as the spec composes them (``export.parity.deployed_runner``), and every output is compared
through the one comparator with its kind's agreement rule (top-1 for class logits at any rank, so RA-CNN's
``scale_logits`` [N, 3, 10] too; per-pixel argmax for segmentation) held to ``spec.checks.fp16_min_agreement``.
Max abs errors and non-finite counts are measured and reported, not gated: fp16 logits differ by design.

onnxruntime's CPU kernels compute most ops in fp32 between fp16 tensors (it inserts Casts), so this catches
fp16 storage effects (overflow, rounding between ops), the main risk; ``make gpu-check`` confirms with real
fp16 kernels.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from export.compare import Tolerance, compare
from export.fp16.passes import convert_to_fp16
from export.parity import deployed_runner
from export.runners import TorchRunner, infer_batched
from training import layout
from training.feeds import sample_feeds
from training.registry import ModelSpec

BATCH = 64


class Fp16AgreementError(RuntimeError):
    """An FP16 graph's predictions disagree with the fp32 model more than the spec allows."""


def graph_paths_of(spec: ModelSpec, graph_paths: dict[str, Path] | Path | str) -> dict[str, Path]:
    """Graph name -> ONNX file; a single path is the one graph of a one-graph model."""
    if not isinstance(graph_paths, dict):
        return {spec.deploy_graphs()[0].name: Path(graph_paths)}
    known = {g.name for g in spec.deploy_graphs()}
    unknown = [g for g in graph_paths if g not in known]
    if unknown:
        raise KeyError(f"model {spec.name!r} has no graphs {unknown}; its graphs are {sorted(known)}")
    return {g: Path(p) for g, p in graph_paths.items()}


def fp32_graph_paths(spec: ModelSpec, repo_dir: str | Path | None = None) -> dict[str, Path]:
    """Where the exported FP32 graphs of ``spec`` live (``training.layout.onnx_path`` of each Triton model)."""
    return {g.name: layout.onnx_path(spec.graph_model_name(g), repo_dir) for g in spec.deploy_graphs()}


def convert_graphs(spec: ModelSpec, graph_paths: dict[str, Path] | Path, keep: tuple[str, ...] | None = None,
                   out_dir: str | Path | None = None) -> dict[str, Path]:
    """Each FP32 graph converted with ``keep`` (default: the spec's keep-list), to ``layout.fp16_onnx_path``
    of its Triton model (or ``out_dir/<triton model>.fp16.onnx``). Returns graph name -> FP16 file."""
    keep = tuple(spec.export.fp16_keep_fp32_ops if keep is None else keep)
    graphs = {g.name: g for g in spec.deploy_graphs()}
    out = {}
    for name, src in graph_paths_of(spec, graph_paths).items():
        triton = spec.graph_model_name(graphs[name])
        dst = Path(out_dir) / f"{triton}.fp16.onnx" if out_dir is not None else layout.fp16_onnx_path(triton)
        out[name] = convert_to_fp16(src, dst, keep)
    return out


def reference_outputs(spec: ModelSpec, model: Any, feeds: dict[str, np.ndarray], batch: int = BATCH) -> dict:
    """The fp32 torch model's outputs on ``feeds``, by name."""
    return infer_batched(TorchRunner.for_spec(spec, model), feeds, batch)


def measure(spec: ModelSpec, reference: dict[str, np.ndarray], fp16_graphs: dict[str, Path],
            feeds: dict[str, np.ndarray], batch: int = BATCH) -> dict[str, Any]:
    """Run the FP16 graphs (onnxruntime, CPU, composed as the spec composes them) on ``feeds`` and compare
    them with ``reference`` (the fp32 outputs).

    Returns ``n``, ``min_agreement`` (the bar), ``agreements`` (per output with an agreement rule),
    ``agreement`` (their minimum; None when no output has a rule), ``max_abs`` and ``nonfinite`` (per
    output), ``failures`` and ``passed``."""
    got = infer_batched(deployed_runner(spec, fp16_graphs), feeds, batch)
    bar = spec.checks.fp16_min_agreement
    bars = {t.name: Tolerance(max_abs=None, min_agreement=spec.checks.fp16_agreement(t.name)) for t in spec.outputs}
    gate = compare(reference, got, spec.outputs, bars, where=f"model {spec.name!r} FP16")
    errors = compare(reference, got, spec.outputs, Tolerance(max_abs=math.inf, min_agreement=None))
    agreements = gate.agreements()
    return {
        "n": len(next(iter(feeds.values()))),
        "min_agreement": bar,
        "agreements": agreements,
        "agreement": min(agreements.values(), default=None),
        "max_abs": errors.max_abs(),
        "nonfinite": {k: int((~np.isfinite(v)).sum()) for k, v in got.items() if np.issubdtype(v.dtype, np.floating)},
        "failures": gate.failures,
        "passed": gate.ok,
    }


def require_agreement(spec: ModelSpec, result: dict[str, Any]) -> None:
    """Raise ``Fp16AgreementError`` naming the model and the outputs under the bar."""
    if result["passed"]:
        return
    worst = min(result["agreements"].items(), key=lambda kv: kv[1], default=None)
    where = f"output {worst[0]!r}: agreement {worst[1]:.4f}" if worst else "; ".join(result["failures"][:2])
    bar = spec.checks.fp16_agreement(worst[0]) if worst else result["min_agreement"]
    raise Fp16AgreementError(
        f"model {spec.name!r}: FP16 {where} < {bar} on {result['n']} test images "
        f"({'; '.join(result['failures'][:3])}); keep more ops in fp32 "
        "(spec.export.fp16_keep_fp32_ops; `python -m export.fp16 <model> --probe --sweep` finds them)"
    )


def fp16_gate(spec: ModelSpec, model: Any, graph_paths: dict[str, Path] | Path, n: int = 1000, *,
              raise_on_fail: bool = True) -> dict[str, Any]:
    """The export pipeline's step: convert every graph in ``graph_paths`` (graph name -> FP32 ONNX file, or
    one path for a one-graph model) with the spec's keep-list, measure the FP16 deployable against the fp32
    torch ``model`` on ``n`` real test images, raise ``Fp16AgreementError`` under the bar.

    Returns ``measure``'s dict plus ``keep_fp32_ops``, ``fp16_graphs`` (graph name -> file) and ``status``
    (one line for the summary)."""
    keep = tuple(spec.export.fp16_keep_fp32_ops)
    fp16 = convert_graphs(spec, graph_paths, keep)
    feeds = sample_feeds(spec, n, spec.train.canvas)
    result = measure(spec, reference_outputs(spec, model, feeds), fp16, feeds)
    result["keep_fp32_ops"] = list(keep)
    result["fp16_graphs"] = {g: str(p) for g, p in fp16.items()}
    agreement = "no agreement rule" if result["agreement"] is None else f"agreement {result['agreement']:.4f}"
    result["status"] = (f"fp16 {agreement} on {result['n']} images ({'pass' if result['passed'] else 'FAIL'}; "
                        f"kept fp32: {', '.join(keep) or 'none'})")
    if raise_on_fail:
        require_agreement(spec, result)
    return result
