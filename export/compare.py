"""The one comparator: reference outputs vs another runner's, per named output (Polygraphy's Comparator).

Every output is held to a max abs error tolerance and, where its kind has one, to an agreement rule
(``training.tasks``: top-1 for class logits at any rank, per-pixel argmax for segmentation logits). Parity,
the FP16 gate, the GPU check, ``export.verify`` and the serving tests all compare through here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import numpy as np

from training.registry import ModelSpec, TensorSpec
from training.tasks import output_kind


@dataclass(frozen=True)
class Tolerance:
    """``max_abs``: per-output bound on |ref - got| (None: not checked); ``min_agreement``: bound on the kind's
    agreement rule (None: not checked)."""

    max_abs: float | None = 1e-4
    min_agreement: float | None = 1.0


@dataclass
class OutputComparison:
    name: str
    max_abs: float | None = None
    agreement: float | None = None
    count: int = 0  # elements (max abs) compared
    failures: list[str] = field(default_factory=list)


@dataclass
class Comparison:
    """What one comparison found, output by output; ``ok`` when nothing failed."""

    outputs: dict[str, OutputComparison] = field(default_factory=dict)
    where: str = ""

    @property
    def failures(self) -> list[str]:
        pre = f"{self.where}: " if self.where else ""
        return [pre + f for o in self.outputs.values() for f in o.failures]

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def worst(self) -> float:
        return max((o.max_abs for o in self.outputs.values() if o.max_abs is not None), default=0.0)

    def max_abs(self) -> dict[str, float]:
        return {k: o.max_abs for k, o in self.outputs.items() if o.max_abs is not None}

    def agreements(self) -> dict[str, float]:
        return {k: o.agreement for k, o in self.outputs.items() if o.agreement is not None}

    def as_dict(self) -> dict:
        return {"where": self.where, "ok": self.ok, "outputs": {k: asdict(o) for k, o in self.outputs.items()}}


def spec_tolerance(spec: ModelSpec, min_agreement: float | None = 1.0) -> dict[str, Tolerance]:
    """The fp32 parity tolerance of every output of ``spec``: its max abs bound and the agreement required."""
    return {t.name: Tolerance(spec.checks.max_abs(t.name), min_agreement) for t in spec.outputs}


def compare(ref: dict[str, np.ndarray], got: dict[str, np.ndarray], outputs: Iterable[TensorSpec],
            tol: Tolerance | dict[str, Tolerance], where: str = "") -> Comparison:
    """Compare every output the spec declares; a missing output or a shape mismatch is a failure too.

    ``tol`` is one tolerance for every output, or one per output name."""
    result = Comparison(where=where)
    for t in outputs:
        oc = result.outputs.setdefault(t.name, OutputComparison(t.name))
        limit = tol[t.name] if isinstance(tol, dict) else tol
        if t.name not in ref or t.name not in got:
            side = "reference" if t.name not in ref else "runner"
            oc.failures.append(f"output {t.name!r}: missing from the {side}'s outputs")
            continue
        r, g = np.asarray(ref[t.name]), np.asarray(got[t.name])
        if r.shape != g.shape:
            oc.failures.append(f"output {t.name!r}: shape {list(g.shape)} != reference {list(r.shape)}")
            continue
        oc.count = int(r.size)
        if limit.max_abs is not None:
            err = float(np.max(np.abs(r.astype(np.float64) - g.astype(np.float64)))) if r.size else 0.0
            oc.max_abs = err
            if not np.isfinite(err) or err > limit.max_abs:
                oc.failures.append(f"output {t.name!r}: max abs error {err:.3g} > {limit.max_abs:g}")
        agree = output_kind(t.kind).agreement(r, g)
        oc.agreement = agree
        if agree is not None and limit.min_agreement is not None and agree < limit.min_agreement:
            oc.failures.append(f"output {t.name!r}: {output_kind(t.kind).name} agreement {agree:.4f} "
                               f"< {limit.min_agreement:g}")
    return result


def merge(results: Iterable[Comparison]) -> dict[str, dict[str, float]]:
    """Worst max abs and mean agreement per output over several comparisons (e.g. every batch and size)."""
    worst: dict[str, float] = {}
    agree: dict[str, list[float]] = {}
    for c in results:
        for k, o in c.outputs.items():
            if o.max_abs is not None:
                worst[k] = max(worst.get(k, 0.0), o.max_abs)
            if o.agreement is not None:
                agree.setdefault(k, []).append(o.agreement)
    return {"max_abs": worst, "agreement": {k: float(np.mean(v)) for k, v in agree.items()}}
