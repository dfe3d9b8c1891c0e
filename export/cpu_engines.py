"""The CPU engines a served graph may run on, behind one small session interface for the python backend.

``export.host_choice`` picks the engine per model and host by measurement; the generic backend
(``serving/backend/model.py``) builds a ``ServedSession`` for whichever its config names.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from export.openvino_runner import OpenVinoRunner, batch_buckets
from export.runtime import ort_session

ENGINES = ("onnxruntime", "openvino")  # the CPU engines a served graph may run on (export.host_choice picks)


@dataclass(frozen=True)
class Route:
    """Which engine and setting (``export.host_choice.settings``) serves batches of up to ``up_to`` samples; the
    last route of a list has ``up_to=None``: every larger batch. Engines trade places with the batch size on some
    graphs (OpenVINO's static shapes ahead at batch 1, onnxruntime at 32: ``export.host_choice.routed``)."""

    up_to: int | None
    engine: str
    setting: str

    @staticmethod
    def from_list(items: Sequence[dict[str, Any]]) -> tuple[Route, ...]:
        """Routes from ``[{up_to, engine, setting}, ...]``, checked: known engines, ascending limits, the last
        one open-ended (``up_to`` None)."""
        routes = tuple(Route(r["up_to"], r["engine"], r["setting"]) for r in items)
        limits = [r.up_to for r in routes]
        if not routes or limits[-1] is not None or any(
                u is None or u < 1 for u in limits[:-1]) or limits[:-1] != sorted(set(limits[:-1])):
            raise ValueError(f"routes {Route.dump(routes)}: limits must ascend, each >= 1, and the last be null "
                             f"(any batch)")
        unknown = sorted({r.engine for r in routes} - set(ENGINES))
        if unknown:
            raise ValueError(f"routes {Route.dump(routes)}: unknown engine(s) {unknown}; known: {', '.join(ENGINES)}")
        return routes

    @staticmethod
    def parse(text: str) -> tuple[Route, ...]:
        """Routes from their JSON list (a config's ``parameters.routes``), checked as ``from_list`` checks."""
        return Route.from_list(json.loads(text))

    @staticmethod
    def from_parameters(params: dict[str, str]) -> tuple[Route, ...]:
        """A served config's routes (``serving.repository`` writes them): ``routes`` where the engines trade
        places with the batch size, else one route from ``engine`` (default onnxruntime) with
        ``allow_spinning`` (onnxruntime) or ``shapes`` (OpenVINO; default dynamic)."""
        if params.get("routes"):
            return Route.parse(params["routes"])
        engine = params.get("engine") or "onnxruntime"
        if engine == "openvino":
            return (Route(None, engine, params.get("shapes") or "dynamic"),)
        return (Route(None, engine, "spin on" if params.get("allow_spinning") == "1" else "spin off"),)

    @staticmethod
    def dump(routes: Sequence[Route]) -> str:
        return json.dumps([asdict(r) for r in routes])


class BatchRouted:
    """Each batch on the target routed for its size: ``routes`` is ``((up_to, target), ...)`` with ascending
    limits and the last ``None``; a batch of n samples goes to the first route with ``n <= up_to``. Delegates
    both interfaces: a runner's ``infer(feeds)`` and a served session's ``run(outputs, feeds)``."""

    def __init__(self, routes: Sequence[tuple[int | None, Any]], name: str | None = None) -> None:
        self.routes = tuple(routes)
        first = self.routes[0][1]
        self.input_names = getattr(first, "input_names", ())
        self.output_names = getattr(first, "output_names", ())
        self.name = name or " | ".join(f"{getattr(t, 'name', type(t).__name__)} <= {u or 'any'}"
                                       for u, t in self.routes)

    @classmethod
    def build(cls, routes: Sequence[Route], make: Any, name: str | None = None) -> Any:
        """``make(route)`` for the one route, or a ``BatchRouted`` over ``make`` of each route."""
        if len(routes) == 1:
            return make(routes[0])
        return cls([(r.up_to, make(r)) for r in routes], name=name)

    def target(self, n: int) -> Any:
        return next(t for u, t in self.routes if u is None or n <= u)

    @staticmethod
    def _batch(feeds: dict[str, Any]) -> int:
        return len(next(iter(feeds.values()))) if feeds else 0

    def infer(self, feeds: dict[str, Any]) -> dict[str, Any]:
        return self.target(self._batch(feeds)).infer(feeds)

    def run(self, outputs: list[str], feeds: dict[str, Any]) -> list[Any]:
        return self.target(self._batch(feeds)).run(outputs, feeds)


class ServedSession:
    """One graph on one CPU engine, as the python backend runs it: ``run(output names, feeds) -> arrays``.

    onnxruntime as ``ort_session`` builds it; OpenVINO (``export.openvino_runner``) compiled once for the graph's
    dynamic shapes, or with ``batch_buckets`` per static shape, each batch padded up to its bucket (a served
    model sees every batch size up to its maximum). A missing, corrupt or uncompilable graph raises one line
    naming the file and the engine."""

    def __init__(self, path: Path | str, engine: str = "onnxruntime", threads: int | None = None, *,
                 spinning: bool = False, batch_buckets: tuple[int, ...] = ()) -> None:
        if engine not in ENGINES:
            raise ValueError(f"unknown engine {engine!r}; known: {', '.join(ENGINES)}")
        self.engine = engine
        if engine == "onnxruntime":
            self._ort = ort_session(path, threads=threads, spinning=spinning)
            self.input_names = tuple(i.name for i in self._ort.get_inputs())
            self.output_names = tuple(o.name for o in self._ort.get_outputs())
        else:
            self._ov = OpenVinoRunner(path, threads=threads, static=bool(batch_buckets), batch_buckets=batch_buckets)
            self.input_names, self.output_names = self._ov.input_names, self._ov.output_names

    def run(self, outputs: list[str], feeds: dict[str, Any]) -> list[Any]:
        if self.engine == "onnxruntime":
            return self._ort.run(outputs, feeds)
        result = self._ov.infer(feeds)
        return [result[n] for n in outputs]


def served_session(path: Path | str, routes: Sequence[Route], threads: int | None = None,
                   max_batch: int = 1) -> ServedSession | BatchRouted:
    """The session a served model runs: one engine, or several routed by batch size. OpenVINO's static shapes
    compile the batch buckets of their own route only (up to its limit, or ``max_batch`` for the last)."""
    def one(r: Route) -> ServedSession:
        buckets = batch_buckets(r.up_to or max_batch) if r.setting == "static" else ()
        return ServedSession(path, r.engine, threads, spinning=r.setting == "spin on", batch_buckets=buckets)

    return BatchRouted.build(routes, one)
