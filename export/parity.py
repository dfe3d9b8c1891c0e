"""The parity gate: torch reference vs an exported graph on real test images.

Runs at every batch size and input side the spec lists (a second side catches sizes frozen into
the graph at export), and compares every output, not only the logits.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from export.runtime import ort_session, run
from training.data import test_images
from training.registry import ModelSpec


class ParityError(AssertionError):
    pass


@dataclass
class ParityResult:
    model: str
    path: str
    max_abs: dict[str, float] = field(default_factory=dict)  # per output, over every case
    top1_agreement: float = 1.0
    cases: list[dict] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def worst(self) -> float:
        return max(self.max_abs.values(), default=0.0)

    def as_dict(self) -> dict:
        return asdict(self) | {"worst_max_abs": self.worst, "passed": not self.failures}


def compare(spec: ModelSpec, ref: list[np.ndarray], got: list[np.ndarray], tol: float | None = None
            ) -> tuple[dict, float, list]:
    """Per-output max abs error, top-1 agreement on the logits output, and failure messages.

    ``tol`` applies to every output; None: the spec's fp32 tolerance."""
    errors, failures = {}, []
    for name, r, g in zip(spec.output_names, ref, got, strict=True):
        if r.shape != g.shape:
            failures.append(f"output {name!r}: shape {g.shape} != torch {r.shape}")
            continue
        err = float(np.max(np.abs(r.astype(np.float64) - g.astype(np.float64)))) if r.size else 0.0
        errors[name] = err
        limit = spec.checks.fp32_max_abs if tol is None else tol
        if not np.isfinite(err) or err > limit:
            failures.append(f"output {name!r}: max abs error {err:.3g} > {limit:g}")
    k = spec.output_names.index(spec.logits_output())
    agree = float(np.mean(ref[k].argmax(-1) == got[k].argmax(-1)))
    if agree < 1.0:
        failures.append(f"top-1 agreement {agree:.4f} < 1")
    return errors, agree, failures


def check_parity(spec: ModelSpec, model: torch.nn.Module, onnx_path: Path, custom_ops: bool = False,
                 tol: float | None = None, raise_on_fail: bool = True) -> ParityResult:
    session = ort_session(onnx_path, custom_ops=custom_ops)
    result = ParityResult(spec.name, str(onnx_path))
    agreements = []
    for side in spec.checks.parity_sides:
        images, _ = test_images(max(spec.checks.parity_batches), canvas=side)
        for b in spec.checks.parity_batches:
            x = images[:b]
            with torch.no_grad():
                ref = [t.numpy() for t in model.eval()(torch.from_numpy(x))]
            got = run(session, x)
            errors, agree, failures = compare(spec, ref, got, tol)
            agreements.append(agree)
            result.cases.append({"batch": b, "side": side, "max_abs": errors, "top1_agreement": agree})
            for name, e in errors.items():
                result.max_abs[name] = max(result.max_abs.get(name, 0.0), e)
            result.failures += [f"{spec.name} at batch {b}, {side}x{side}: {f}" for f in failures]
    result.top1_agreement = float(np.mean(agreements))
    if raise_on_fail and result.failures:
        raise ParityError(f"parity gate failed for {onnx_path}: " + "; ".join(result.failures[:3]))
    return result
