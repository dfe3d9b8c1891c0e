"""TensorRT optimization profiles from the spec: one (min, opt, max) shape per NAMED input.

The batch axis takes ``spec.export.profile_batch``; every other axis is the input's own: a fixed size, or a
``Dim(name, min, opt, max)``. Nothing here knows which input is "the image": a graph of an image and a
per-sample class id gets a profile for each, and a dynamic axis without a range is refused up front
(TensorRT would refuse the build later, less clearly).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from training.registry import Dim, TensorSpec

Shape = tuple[int, ...]
ProfileShapes = dict[str, tuple[Shape, Shape, Shape]]


class ProfileError(ValueError):
    """A profile cannot be made from the spec, or does not fit the parsed network."""


def _tensors(inputs: Any) -> tuple[list[TensorSpec], str]:
    """(the input TensorSpecs, a label for messages) of a GraphSpec/ModelSpec or an iterable of TensorSpecs."""
    if hasattr(inputs, "inputs"):
        name = getattr(inputs, "name", "")
        return list(inputs.inputs), f"graph {name!r}: " if name else ""
    return list(inputs), ""


def _batch(batch_range: Sequence[int], where: str) -> tuple[int, int, int]:
    batch = tuple(int(b) for b in batch_range)
    if len(batch) != 3 or not 1 <= batch[0] <= batch[1] <= batch[2]:
        raise ProfileError(f"{where}the batch range must be ordered 1 <= min <= opt <= max, got {list(batch_range)}")
    return batch  # type: ignore[return-value]


def _axis_range(t: TensorSpec, axis: int, a: Any, where: str) -> tuple[int, int, int]:
    if isinstance(a, Dim):
        return a.min, a.opt, a.max
    if isinstance(a, int) and not isinstance(a, bool) and a >= 0:
        return a, a, a
    raise ProfileError(
        f"{where}input {t.name!r} axis {axis + 1} (per-sample axis {axis}) of {list(t.shape)} is dynamic but has "
        f"no range: declare it as Dim(name, min, opt, max) in the spec"
    )


def profile_shapes(inputs: Any, batch_range: Sequence[int],
                   network_shapes: Mapping[str, Sequence[int]] | None = None) -> ProfileShapes:
    """``{input name: (min, opt, max)}`` for every named input of ``inputs`` (a ``GraphSpec``, a ``ModelSpec``,
    or an iterable of ``TensorSpec``): the batch axis ranges over ``batch_range``, each ``Dim`` over its own
    min/opt/max, fixed axes stay fixed.

    With ``network_shapes`` (the parsed graph's input shapes, -1 where dynamic) the profile is also checked
    against the graph: a dynamic axis the spec gives no range for (a fixed size in the spec) is refused, and so
    is everything ``check_network_inputs`` refuses."""
    tensors, where = _tensors(inputs)
    batch = _batch(batch_range, where)
    names = [t.name for t in tensors]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ProfileError(f"{where}inputs {dupes} are named more than once")
    profiles: ProfileShapes = {}
    for t in tensors:
        ranges = [batch, *(_axis_range(t, i, a, where) for i, a in enumerate(t.axes))]
        profiles[t.name] = tuple(tuple(r[k] for r in ranges) for k in range(3))  # type: ignore[assignment]
    if network_shapes is not None:
        for t in tensors:
            shape = list(network_shapes.get(t.name, ()))
            for axis, d in enumerate(shape[1 : len(t.axes) + 1], start=1):
                if d < 0 and not isinstance(t.axes[axis - 1], Dim):
                    raise ProfileError(
                        f"{where}input {t.name!r} axis {axis} is dynamic in the graph {shape} but the spec gives it "
                        f"no range (it fixes it to {t.axes[axis - 1]}): declare it as Dim(name, min, opt, max), "
                        "or export it fixed"
                    )
        check_network_inputs(profiles, network_shapes, where)
    return profiles


def check_network_inputs(profiles: ProfileShapes, network_shapes: Mapping[str, Sequence[int]], where: str = "") -> None:
    """Refuse, in one line, a profile that does not fit the parsed network: an input either side lacks, another
    rank, or a range over an axis the graph has fixed (an export that froze a size the spec says is dynamic)."""
    missing = [n for n in network_shapes if n not in profiles]
    extra = [n for n in profiles if n not in network_shapes]
    if missing or extra:
        raise ProfileError(
            f"{where}the graph's inputs {list(network_shapes)} do not match the spec's {list(profiles)}"
            + (f" (the spec lacks {missing})" if missing else "") + (f" (the graph lacks {extra})" if extra else "")
        )
    for name, shape in network_shapes.items():
        lo, opt, hi = profiles[name]
        if len(shape) != len(lo):
            raise ProfileError(f"{where}input {name!r}: the graph has rank {len(shape)} {list(shape)}, the spec's "
                               f"profile rank {len(lo)} {list(lo)}")
        for axis, d in enumerate(shape):
            if d >= 0 and not lo[axis] == opt[axis] == hi[axis] == d:
                raise ProfileError(
                    f"{where}input {name!r} axis {axis} is fixed to {d} in the graph {list(shape)}, but the spec "
                    f"ranges it {lo[axis]}..{hi[axis]} (the export froze a dynamic axis)"
                )


def profile_dict(profiles: ProfileShapes) -> dict[str, dict[str, list[int]]]:
    """The JSON form the engine sidecar keeps: ``{name: {"min": [...], "opt": [...], "max": [...]}}``."""
    return {n: {"min": list(s[0]), "opt": list(s[1]), "max": list(s[2])} for n, s in profiles.items()}


def outside_profile(profile: Mapping[str, Mapping[str, Sequence[int]]],
                    shapes: Mapping[str, Sequence[int]]) -> list[str]:
    """One message per input shape the profile (``profile_dict`` form) does not cover; empty when all fit."""
    problems = [f"input {n!r} is not an input of the engine (it takes {list(profile)})"
                for n in shapes if n not in profile]
    for name, p in profile.items():
        if name not in shapes:
            problems.append(f"input {name!r} is missing")
            continue
        shape = [int(d) for d in shapes[name]]
        lo, hi = list(p["min"]), list(p["max"])
        if len(shape) != len(lo):
            problems.append(f"input {name!r} has shape {shape}, rank {len(shape)}; the engine takes rank {len(lo)}")
            continue
        bad = [f"axis {i} is {d}, outside {lo[i]}..{hi[i]}" for i, d in enumerate(shape) if not lo[i] <= d <= hi[i]]
        if bad:
            problems.append(f"input {name!r} shape {shape}: " + ", ".join(bad) + " (the engine's profile)")
    return problems


def as_shapes(feeds: Mapping[str, Any]) -> dict[str, Shape]:
    """Input name -> shape of arrays (or of anything with ``.shape``)."""
    return {n: tuple(int(d) for d in v.shape) for n, v in feeds.items()}

