"""One model through the export stage: checkpoint -> ONNX -> checks -> parity -> TensorRT parse -> FP16."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from export.onnx_export import export_onnx
from export.parity import check_parity
from training import paths
from training.checkpoints import load_metrics, load_trained
from training.registry import get_spec
from training.train import ensure_trained

_PLAIN_METRICS = {"accuracy", "steps", "recipe", "train_seconds", "params", "bar_failures"}


@dataclass
class ExportSummary:
    name: str
    accuracy: float | None = None
    bar_failures: list[str] = field(default_factory=list)
    onnx: str | None = None
    export_seconds: float | None = None
    parity_max_abs: float | None = None
    parity_top1: float | None = None
    tensorrt: str = "not run"
    fp16_top1: float | None = None
    fp16: str = "not run"
    error: str | None = None
    metrics: dict = field(default_factory=dict)  # the model's own test metrics (RA-CNN: scales, boxes)
    parity: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None and not self.bar_failures

    def as_dict(self) -> dict:
        return asdict(self)


def onnx_path(name: str, custom_ops: bool = False) -> Path:
    """Served graphs live in the repository; custom-op graphs (need kernels) stay in artifacts/."""
    if custom_ops:
        return paths.ARTIFACTS_DIR / "onnx" / f"{name}.custom_ops.onnx"
    return paths.REPOSITORY_DIR / name / "1" / "model.onnx"


def export_model(name: str, custom_ops: bool = False, slim: bool = True, train: bool = True,
                 tensorrt: bool = True, fp16: bool = True) -> ExportSummary:
    spec = get_spec(name)
    metrics = ensure_trained(name) if train else load_metrics(name)
    model = load_trained(name)  # raises a one-line error when the checkpoint is missing
    s = ExportSummary(name=name, accuracy=metrics.get("accuracy"), bar_failures=metrics.get("bar_failures", []),
                      metrics={k: v for k, v in metrics.items() if k not in _PLAIN_METRICS})
    start = time.perf_counter()
    path = export_onnx(spec, model, onnx_path(name, custom_ops), custom_ops=custom_ops, slim=slim)
    s.export_seconds = round(time.perf_counter() - start, 2)
    s.onnx = str(path.relative_to(paths.REPO_ROOT)) if path.is_relative_to(paths.REPO_ROOT) else str(path)
    parity = check_parity(spec, model, path, custom_ops=custom_ops)  # raises ParityError on failure
    s.parity_max_abs, s.parity_top1, s.parity = parity.worst, parity.top1_agreement, parity.as_dict()
    if tensorrt and not custom_ops:
        s.tensorrt = _tensorrt_parse(path)
    if fp16 and not custom_ops:
        s.fp16, s.fp16_top1 = _fp16_gate(spec, model, path)
    return s


def _tensorrt_parse(path: Path) -> str:
    try:
        from export.tensorrt import TensorRTUnavailableError, parse_onnx
    except ImportError as e:
        return f"skipped ({e})"
    try:
        report = parse_onnx(path)  # raises TensorRTParseError naming the node
    except TensorRTUnavailableError as e:
        return f"skipped ({e})"
    return f"parsed ({report.flavour} {report.version})"


def _fp16_gate(spec, model, path: Path) -> tuple[str, float | None]:
    try:
        from export.fp16 import fp16_gate
    except ImportError as e:
        return f"skipped ({e})", None
    result = fp16_gate(spec, model, path)  # raises when agreement is under the spec's minimum
    return result["status"], result["top1_agreement"]


def print_summary(rows: list[ExportSummary]) -> None:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    header = (f"{'model':<20} {'test acc':>8} {'parity max|err|':>15} {'top1':>6} {'export s':>8} "
              f"{'fp16 top1':>9}  tensorrt")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r.name:<20} {f(r.accuracy, '.4f'):>8} {f(r.parity_max_abs, '.2e'):>15} {f(r.parity_top1, '.3f'):>6} "
              f"{f(r.export_seconds, '.1f'):>8} {f(r.fp16_top1, '.4f'):>9}  {r.tensorrt}"
              + (f"  FAILED: {r.error}" if r.error else "")
              + (f"  BAR MISSED: {'; '.join(r.bar_failures)}" if r.bar_failures else ""))
        if r.metrics:  # model-specific bars (e.g. RA-CNN's per-scale accuracy and box error) on their own line
            print(" " * 21 + ", ".join(f"{k} {v:.4f}" for k, v in r.metrics.items() if isinstance(v, float)))
