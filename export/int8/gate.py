"""The INT8 export gate: the fp32 torch model vs onnxruntime on the QDQ graphs, on real test images.

Every graph of a deployable is pre-processed, calibrated on training images and quantized with the model's
``Int8Choice`` (``export/int8/choices.json``) to ``training.layout.int8_onnx_path``; the graphs run as the spec
composes them, and the gate holds, on the test split,

- every output with an agreement rule (top-1 for class logits at any rank, per-pixel argmax for
  segmentation, the pointing game for saliency) to ``spec.checks.int8_agreement(output)`` (0.99), and
- the task's first metric (accuracy; mean IoU for segmentation) to at most ``int8_max_metric_drop`` (0.5
  points) below the fp32 model's on the same images.

``Int8GateError`` names the model and what missed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from export import manifest
from export.compare import Tolerance, compare
from export.fp16.gate import fp32_graph_paths, graph_paths_of, reference_outputs
from export.fp16.probe import graph_feeds
from export.int8.calibration import training_feeds
from export.int8.choices import Int8Choice, choice_for
from export.int8.quantize import preprocess, quantize
from export.parity import deployed_runner
from export.runners import infer_batched
from training import layout
from training.datasets import split_for
from training.feeds import sample_feeds
from training.registry import ModelSpec

BATCH = 64

__all__ = ["Int8GateError", "build_int8_graphs", "fp32_graph_paths", "gate_miss", "int8_gate", "measure",
           "remove_int8_graphs"]


class Int8GateError(RuntimeError):
    """An int8 deployable misses the spec's agreement or metric bar."""


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def prepared_graphs(spec: ModelSpec, fp32: dict[str, Path]) -> dict[str, Path]:
    """Graph name -> its pre-processed graph (made once per fp32 graph content)."""
    graphs = {g.name: g for g in spec.deploy_graphs()}
    out = {}
    for name, src in fp32.items():
        work = layout.int8_work_dir(spec.graph_model_name(graphs[name]))
        pre = work / f"pre-{_digest(src)}.onnx"
        out[name] = pre if pre.is_file() else preprocess(src, pre)
    return out


def calibration_cache(pre: Path, method: str, n: int, flavour: str = "cpu") -> Path:
    """Per (pre-processed graph content, method, image count, flavour: which tensors it calibrates): a stale
    cache can never be picked up."""
    return pre.parent / f"calib-{method}-n{n}-{flavour}-{pre.stem.removeprefix('pre-')}.json"


def per_graph_feeds(spec: ModelSpec, fp32: dict[str, Path], feeds: dict[str, np.ndarray]) -> dict[str, dict]:
    return graph_feeds(spec, fp32, feeds)


def build_int8_graphs(spec: ModelSpec, fp32: dict[str, Path], choice: Int8Choice, out_dir: Path | None = None,
                      calibration: dict[str, dict] | None = None, flavour: str = "cpu") -> dict[str, Path]:
    """Quantize every graph with ``choice`` to ``layout.int8_onnx_path`` (or ``out_dir/<model>.int8.<flavour>.onnx``).
    ``calibration``: graph name -> calibration feeds (default: ``choice.calibration_images`` training images)."""
    graphs = {g.name: g for g in spec.deploy_graphs()}
    pre = prepared_graphs(spec, fp32)
    n = choice.calibration_images
    if calibration is None:
        calibration = per_graph_feeds(spec, fp32, training_feeds(spec, n)[0])
    out = {}
    for name, p in pre.items():
        triton = spec.graph_model_name(graphs[name])
        dst = Path(out_dir) / f"{triton}.int8.{flavour}.onnx" if out_dir is not None else \
            layout.int8_onnx_path(triton, flavour)
        cache = calibration_cache(p, choice.calibration, len(next(iter(calibration[name].values()))), flavour)
        out[name] = quantize(p, dst, choice.calibration, cache=cache, feeds=calibration[name],
                             keep_fp32_ops=choice.keep_fp32_ops, keep_fp32_nodes=choice.kept(name), flavour=flavour)
    return out


def remove_int8_graphs(spec: ModelSpec) -> None:
    """Remove the served int8 models of ``spec`` (generated folders: graph, config, backend): a variant that
    missed its gate must not be served, and a config left without its graph would fail the server's load."""
    import shutil

    names = [spec.graph_model_name(g) for g in spec.deploy_graphs()] + ([spec.name] if spec.composition else [])
    for name in names:
        folder = layout.model_dir(f"{name}{layout.INT8_SUFFIX}")
        if folder.exists():
            shutil.rmtree(folder)


def task_metric(spec: ModelSpec, outputs: dict[str, np.ndarray], data: dict[str, np.ndarray]) -> tuple[str, float]:
    """The task's first metric (accuracy for classification, mean IoU for segmentation)."""
    metrics = spec.task.metrics(outputs, data)
    key = next(iter(metrics))
    return key, float(metrics[key])


def relative_errors(ref: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> dict[str, float]:
    """Per float output: ||got - ref|| / ||ref|| (a continuous measure under the agreement rules)."""
    out = {}
    for k, r in ref.items():
        if k in got and np.issubdtype(np.asarray(r).dtype, np.floating):
            r64, g64 = np.asarray(r, np.float64), np.asarray(got[k], np.float64)
            out[k] = float(np.linalg.norm(g64 - r64) / max(np.linalg.norm(r64), 1e-12))
    return out


def measure(spec: ModelSpec, reference: dict[str, np.ndarray], graphs: dict[str, Path], feeds: dict[str, np.ndarray],
            data: dict[str, np.ndarray], *, reference_metric: float | None = None, batch: int = BATCH,
            runner: Any = None) -> dict[str, Any]:
    """Run the int8 graphs (composed as the spec composes them) on ``feeds`` against ``reference`` (fp32
    outputs on the same feeds) and ``data`` (labels/masks). Returns ``n``, ``agreements``, ``agreement`` (their
    minimum), ``relative_error`` per output, ``metric`` name, ``fp32_metric``, ``int8_metric``, ``metric_drop``,
    ``failures`` and ``passed``."""
    got = infer_batched(runner or deployed_runner(spec, graphs), feeds, batch)
    bars = {t.name: Tolerance(max_abs=None, min_agreement=spec.checks.int8_agreement(t.name)) for t in spec.outputs}
    gate = compare(reference, got, spec.outputs, bars, where=f"model {spec.name!r} INT8")
    key, ref_metric = task_metric(spec, reference, data)
    ref_metric = ref_metric if reference_metric is None else reference_metric
    _, int8_metric = task_metric(spec, got, data)
    drop = ref_metric - int8_metric
    failures = list(gate.failures)
    if drop > spec.checks.int8_max_metric_drop + 1e-12:
        failures.append(f"model {spec.name!r} INT8: test {key} {int8_metric:.4f} is {100 * drop:.2f} points below "
                        f"fp32's {ref_metric:.4f} (at most {100 * spec.checks.int8_max_metric_drop:.2f})")
    agreements = gate.agreements()
    return {
        "n": len(next(iter(feeds.values()))),
        "agreements": agreements,
        "agreement": min(agreements.values(), default=None),
        "bars": {k: b.min_agreement for k, b in bars.items() if k in agreements},
        "relative_error": relative_errors(reference, got),
        "nonfinite": sum(int((~np.isfinite(v)).sum()) for v in got.values() if np.issubdtype(v.dtype, np.floating)),
        "metric": key,
        "fp32_metric": ref_metric,
        "int8_metric": int8_metric,
        "metric_drop": drop,
        "max_metric_drop": spec.checks.int8_max_metric_drop,
        "failures": failures,
        "passed": not failures,
    }


def gate_miss(spec: ModelSpec, result: dict[str, Any]) -> str:
    """One line naming the model and the criteria its int8 graph missed (``measure``'s dict)."""
    return (f"model {spec.name!r}: INT8 graph misses its gate on {result['n']} test images: "
            + "; ".join(f.split(": ", 1)[-1] for f in result["failures"][:3])
            + " (keep more nodes float: `python -m export.int8 " + spec.name + " --probe`)")


def require_gate(spec: ModelSpec, result: dict[str, Any]) -> None:
    if not result["passed"]:
        raise Int8GateError(gate_miss(spec, result))


def test_split(spec: ModelSpec, n: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(feeds, the split's arrays: labels, masks) of ``n`` test images, the same images ``sample_feeds`` gives."""
    return sample_feeds(spec, n, spec.train.canvas), split_for(spec, "test", n, seed=0)


def int8_gate(spec: ModelSpec, model: Any, fp32: dict[str, Path] | Path, n: int = 1000, *,
              choice: Int8Choice | None = None, raise_on_fail: bool = True) -> dict[str, Any]:
    """The export step: quantize every graph with the model's choice, measure the int8 deployable against the
    fp32 torch ``model`` on ``n`` test images, raise ``Int8GateError`` under a bar. Returns ``measure``'s dict
    plus ``choice``, ``int8_graphs`` and ``status`` (one line)."""
    fp32 = graph_paths_of(spec, fp32)
    choice = choice or choice_for(spec.name)
    graphs = build_int8_graphs(spec, fp32, choice)
    feeds, data = test_split(spec, n)
    result = measure(spec, reference_outputs(spec, model, feeds), graphs, feeds, data)
    result["choice"] = choice.as_dict()
    result["int8_graphs"] = {g: str(p) for g, p in graphs.items()}
    kept = sum(len(v) for v in choice.keep_fp32_nodes.values()) + len(choice.keep_fp32_ops)
    agreement = "no agreement rule" if result["agreement"] is None else f"agreement {result['agreement']:.4f}"
    result["status"] = (f"int8 ({choice.calibration}, {kept} kept float) {agreement}, {result['metric']} "
                        f"{result['fp32_metric']:.4f} -> {result['int8_metric']:.4f} on {result['n']} images "
                        f"({'pass' if result['passed'] else 'FAIL'})")
    if result["passed"]:  # the manifest names these very graphs as gated (the export step removes a failed one)
        manifest.set_variant(spec.name, "int8", graphs, manifest.verdict(result))
    if raise_on_fail:
        require_gate(spec, result)
    return result


