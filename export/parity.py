"""The parity gate: the torch reference vs the deployed graphs, on real test images.

Runs at every batch size and input side the spec lists (a second side catches sizes frozen into the graph
at export) and compares every output through the one comparator: max abs error within the spec's fp32
tolerance and each output kind's agreement rule exact. A multi-graph deployable is compared as composed
(its graphs chained as Triton chains them) against the whole torch model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from export.compare import Tolerance, compare, merge, spec_tolerance
from export.runners import ComposedRunner, OnnxRuntimeRunner, Runner, TorchRunner
from training.feeds import sample_feeds
from training.registry import ModelSpec


class ParityError(AssertionError):
    pass


@dataclass
class ParityResult:
    model: str
    paths: list[str]
    max_abs: dict[str, float] = field(default_factory=dict)  # per output, over every case
    # With ``Checks.float64_reference``: per output, vs the float64 torch model (held to ``fp32_max_abs``).
    max_abs_vs_float64: dict[str, float] = field(default_factory=dict)
    agreement: dict[str, float] = field(default_factory=dict)  # per output with an agreement rule, mean
    cases: list[dict] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def worst(self) -> float:
        return max(self.max_abs.values(), default=0.0)

    @property
    def min_agreement(self) -> float | None:
        return min(self.agreement.values(), default=None)

    def as_dict(self) -> dict:
        return asdict(self) | {"worst_max_abs": self.worst, "passed": not self.failures}


def deployed_runner(spec: ModelSpec, graph_paths: dict[str, Path], **session_kw: Any) -> Runner:
    """onnxruntime on the deployed graphs, composed as the spec composes them (one graph: that graph)."""
    runners = {g: OnnxRuntimeRunner(p, **session_kw) for g, p in graph_paths.items()}
    if spec.composition is None:
        return next(iter(runners.values()))
    return ComposedRunner(spec.composition, runners, spec.output_names, name=f"onnxruntime {spec.composition.kind}")


def check_parity(spec: ModelSpec, model: Any, graph_paths: dict[str, Path] | Path, custom_ops: bool = False,
                 tol: Tolerance | None = None, raise_on_fail: bool = True,
                 runner: Runner | None = None) -> ParityResult:
    """``graph_paths``: graph name -> ONNX file (a single path for a one-graph model). ``runner``: the engine to
    gate on those graphs (default onnxruntime, as served by default; ``export.host_choice`` gates OpenVINO)."""
    if not isinstance(graph_paths, dict):
        graph_paths = {spec.deploy_graphs()[0].name: Path(graph_paths)}
    tol = tol or spec_tolerance(spec)
    reference = TorchRunner.for_spec(spec, model)
    exact = TorchRunner.for_spec(spec, model, float64=True, name="torch float64") \
        if spec.checks.float64_reference else None
    strict = Tolerance(spec.checks.fp32_max_abs, None)  # every output, no per-output loosening
    runner = runner or deployed_runner(spec, graph_paths, custom_ops=custom_ops)
    result = ParityResult(spec.name, [str(p) for p in graph_paths.values()])
    comparisons, exact_comparisons = [], []
    for side in spec.checks.parity_sides:
        feeds = sample_feeds(spec, max(spec.checks.parity_batches), side)
        for b in spec.checks.parity_batches:
            x = {k: v[:b] for k, v in feeds.items()}
            got = runner.infer(x)
            c = compare(reference.infer(x), got, spec.outputs, tol,
                        where=f"{spec.name} at batch {b}, {side}x{side}")
            comparisons.append(c)
            case = {"batch": b, "side": side, "max_abs": c.max_abs(), "agreement": c.agreements()}
            result.failures += c.failures
            if exact is not None:
                e = compare(exact.infer(x), got, spec.outputs, strict,
                            where=f"{spec.name} vs torch float64 at batch {b}, {side}x{side}")
                exact_comparisons.append(e)
                case["max_abs_vs_float64"] = e.max_abs()
                result.failures += e.failures
            result.cases.append(case)
    summary = merge(comparisons)
    result.max_abs, result.agreement = summary["max_abs"], summary["agreement"]
    if exact_comparisons:
        result.max_abs_vs_float64 = merge(exact_comparisons)["max_abs"]
    if raise_on_fail and result.failures:
        raise ParityError(f"parity gate failed for {', '.join(result.paths)}: " + "; ".join(result.failures[:3]))
    return result
