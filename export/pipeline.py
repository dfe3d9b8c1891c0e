"""One model through the export stage: checkpoint -> ONNX graphs -> checks -> parity -> TensorRT parse -> FP16
-> INT8."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from export import manifest
from export.onnx_export import export_onnx
from export.parity import check_parity
from training import layout, paths
from training.checkpoints import load_record, load_trained
from training.registry import ModelSpec, get_spec
from training.train import is_current, train_model


@dataclass
class ExportSummary:
    name: str
    metrics: dict = field(default_factory=dict)  # the model's test metrics (accuracy, IoU, per-scale, boxes)
    bar_failures: list[str] = field(default_factory=list)
    trained: str = "shipped"  # shipped | trained now
    graphs: dict[str, str] = field(default_factory=dict)  # graph -> ONNX path
    export_seconds: float | None = None
    parity_max_abs: float | None = None
    parity_agreement: float | None = None
    tensorrt: str = "not run"
    fp16_agreement: float | None = None
    fp16: str = "not run"
    int8_agreement: float | None = None
    int8: str = "not run"
    # A model recorded to ship int8 (export/int8/choices.json) whose int8 graph missed its gate here: what
    # missed, in one line. The fp32 (and fp16) graphs stand; the int8 graph is removed, never served.
    int8_failure: str | None = None
    error: str | None = None
    parity: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None and self.int8_failure is None and not self.bar_failures

    @property
    def failure(self) -> str | None:
        """One line saying what failed (None when ``ok``)."""
        if self.error:
            return self.error
        if self.int8_failure:
            return self.int8_failure
        return "; ".join(self.bar_failures) or None

    def as_dict(self) -> dict:
        return asdict(self)


def graph_paths(spec: ModelSpec, custom_ops: bool = False, repo_dir: str | Path | None = None) -> dict[str, Path]:
    """Where each graph of ``spec`` is written: served graphs in the repository, custom-op ones in artifacts/."""
    out = {}
    for g in spec.deploy_graphs():
        triton = spec.graph_model_name(g)
        out[g.name] = layout.custom_ops_onnx_path(triton) if custom_ops else layout.onnx_path(triton, repo_dir)
    return out


def _rel(p: Path) -> str:
    return str(p.relative_to(paths.REPO_ROOT)) if p.is_relative_to(paths.REPO_ROOT) else str(p)


def export_model(name: str, custom_ops: bool = False, slim: bool = True, train: bool = True,
                 tensorrt: bool = True, fp16: bool = True, int8: bool = True) -> ExportSummary:
    spec = get_spec(name)
    fresh = train and not is_current(name)  # one fingerprint check decides, and the summary reports it
    record = train_model(name) if fresh else load_record(name)
    model = load_trained(name)  # raises a one-line error when the checkpoint is missing
    s = ExportSummary(name=name, metrics=record.get("metrics", {}), bar_failures=record.get("bar_failures", []),
                      trained="trained now" if fresh else "shipped")
    start = time.perf_counter()
    files = graph_paths(spec, custom_ops)
    for g in spec.deploy_graphs():
        export_onnx(spec, model, files[g.name], custom_ops=custom_ops, slim=slim, graph=g)
    s.graphs = {g: _rel(p) for g, p in files.items()}
    s.export_seconds = round(time.perf_counter() - start, 2)
    parity = check_parity(spec, model, files, custom_ops=custom_ops)  # raises ParityError on failure
    s.parity_max_abs, s.parity_agreement, s.parity = parity.worst, parity.min_agreement, parity.as_dict()
    if tensorrt and not custom_ops:
        s.tensorrt = "; ".join(tensorrt_parse(p) for p in files.values())
    if not custom_ops:  # the served graphs' manifest: what later stages read (export.manifest)
        manifest.write(spec, files, {"passed": True, "max_abs": parity.worst, "agreement": parity.min_agreement},
                       tensorrt=s.tensorrt)
    if fp16 and not custom_ops:
        s.fp16, s.fp16_agreement = _fp16_gate(spec, model, files)
    if int8 and not custom_ops:
        s.int8, s.int8_agreement, s.int8_failure = _int8_gate(spec, model, files)
    return s


def tensorrt_parse(path: Path) -> str:
    """A one-line status of TensorRT's parse of ``path``; a node it cannot import raises, naming the node."""
    try:
        from export.tensorrt import TensorRTUnavailableError, parse_onnx
    except ImportError as e:
        return f"skipped ({e})"
    try:
        report = parse_onnx(path)  # raises TensorRTParseError naming the node
    except TensorRTUnavailableError as e:
        return f"skipped ({e})"
    return f"parsed ({report.flavour} {report.version})"


def _fp16_gate(spec: ModelSpec, model: Any, files: dict[str, Path]) -> tuple[str, float | None]:
    from export.fp16 import fp16_gate

    try:
        result = fp16_gate(spec, model, files)  # raises when agreement is under the spec's minimum
    except Exception:
        manifest.set_variant(spec.name, "fp16", None, {})
        raise
    manifest.set_variant(spec.name, "fp16", result["fp16_graphs"], manifest.verdict(result))
    return result["status"], result["agreement"]


INT8_GATE_IMAGES = 1000
INT8_NOT_SHIPPED = "int8 not shipped"


def _int8_gate(spec: ModelSpec, model: Any, files: dict[str, Path],
               n: int = INT8_GATE_IMAGES) -> tuple[str, float | None, str | None]:
    """(status, agreement, failure). A model recorded ``ship: false`` (measured to miss its gate) is skipped:
    no int8 variant is built or served, and that is no failure. A model recorded to ship whose int8 graph
    misses its gate now is a failure (one line naming the model and what missed); its int8 graph is removed,
    so it is never served."""
    from export.int8 import choice_for, gate_miss, int8_gate, remove_int8_graphs

    choice = choice_for(spec.name)
    if not choice.ship:  # measured to miss its gate: no int8 variant is built or served
        remove_int8_graphs(spec)
        manifest.set_variant(spec.name, "int8", None, {})
        return f"{INT8_NOT_SHIPPED} ({choice.not_shipped})", None, None
    result = int8_gate(spec, model, files, n, choice=choice, raise_on_fail=False)
    if result["passed"]:  # int8_gate recorded the graphs and the verdict in the manifest
        return result["status"], result["agreement"], None
    remove_int8_graphs(spec)
    manifest.set_variant(spec.name, "int8", None, {})
    return result["status"], result["agreement"], gate_miss(spec, result) + " (its int8 graph is not served)"


def _metric_text(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float) and not k.startswith("iou_"))


def print_summary(rows: list[ExportSummary]) -> None:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    header = (f"{'model':<20} {'weights':<11} {'parity max|err|':>15} {'agree':>6} {'export s':>8} "
              f"{'fp16 agree':>10} {'int8 agree':>10}  tensorrt")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r.name:<20} {r.trained:<11} {f(r.parity_max_abs, '.2e'):>15} {f(r.parity_agreement, '.3f'):>6} "
              f"{f(r.export_seconds, '.1f'):>8} {f(r.fp16_agreement, '.4f'):>10} {f(r.int8_agreement, '.4f'):>10}  "
              f"{r.tensorrt}"
              + (f"  FAILED: {r.error}" if r.error else "")
              + (f"  INT8 GATE MISSED: {r.int8_failure}" if r.int8_failure else "")
              + (f"  BAR MISSED: {'; '.join(r.bar_failures)}" if r.bar_failures else ""))
        if r.metrics:  # the task's and the model's own test metrics on their own line
            print(" " * 21 + _metric_text(r.metrics))
        if r.int8.startswith(INT8_NOT_SHIPPED):  # recorded not to ship: a note, not a failure
            print(" " * 21 + r.int8)
