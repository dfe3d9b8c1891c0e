"""The CPU engines a served graph may run on, behind one small session interface for the python backend.

``export.host_choice`` picks the engine per model and host by measurement; the generic backend
(``serving/backend/model.py``) builds a ``ServedSession`` for whichever its config names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from export.openvino_runner import OpenVinoRunner
from export.runtime import ort_session

ENGINES = ("onnxruntime", "openvino")  # the CPU engines a served graph may run on (export.host_choice picks)


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
