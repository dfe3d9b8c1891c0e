"""Runners: one interface, ``infer(feeds: dict[str, ndarray]) -> dict[str, ndarray]``, for every runtime.

Polygraphy's ``BaseRunner`` shape, kept small: torch (the reference), onnxruntime, a composed pipeline of
runners (what a Triton ensemble or BLS model computes), TensorRT (``export.tensorrt.runner``) and OpenVINO
(``export.openvino_runner.OpenVinoRunner``, a second CPU engine; ``export.host_choice.cpu_runner`` builds either
CPU engine for a spec's deployed graphs). Triton
over gRPC or HTTP is ``serving.client.Client``, which has the same ``infer``. Comparing any two is
``export.compare.compare(a.infer(feeds), b.infer(feeds), spec.outputs, tol)``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from training.registry import Composition, ModelSpec, TensorSpec


class Runner(Protocol):
    name: str

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class TorchRunner:
    """The torch model: named feeds in the spec's input order, outputs named by the spec."""

    def __init__(self, model: Any, input_names: tuple[str, ...], output_names: tuple[str, ...],
                 device: str = "cpu", autocast_fp16: bool = False, name: str = "torch",
                 optional: tuple[TensorSpec, ...] = (), float64: bool = False) -> None:
        import copy

        # float64: a copy of the model in double precision, float inputs cast up: the exact computation that
        # float32 runtimes are each measured against (results come back as float32 like the others').
        self.float64 = float64
        if float64:
            model = copy.deepcopy(model).double()
        self.model = model.eval() if device == "cpu" else copy.deepcopy(model).to(device).eval()
        self.input_names, self.output_names = input_names, output_names
        self.device, self.autocast_fp16, self.name = device, autocast_fp16, name
        self.optional = {t.name: t for t in optional}  # fed their default when left out, as the server does

    @classmethod
    def for_spec(cls, spec: ModelSpec, model: Any, **kw: Any) -> TorchRunner:
        return cls(model, spec.input_names, spec.output_names, optional=tuple(t for t in spec.inputs if t.optional),
                   **kw)

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        missing = [n for n in self.input_names if n not in feeds and n in self.optional]
        if missing:
            n = len(next(iter(feeds.values())))
            feeds = {**feeds, **{m: self.optional[m].default_batch(n) for m in missing}}

        args = [torch.from_numpy(np.ascontiguousarray(feeds[n])).to(self.device) for n in self.input_names]
        if self.float64:
            args = [a.double() if a.is_floating_point() else a for a in args]
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16,
                                                     enabled=self.autocast_fp16 and self.device == "cuda"):
            outs = self.model(*args)
        outs = outs if isinstance(outs, tuple | list) else (outs,)
        return {n: o.float().cpu().numpy() if o.is_floating_point() else o.cpu().numpy()
                for n, o in zip(self.output_names, outs, strict=True)}


class OnnxRuntimeRunner:
    """An onnxruntime session (built by ``export.runtime.ort_session``) on one graph."""

    def __init__(self, path: Path | str, name: str | None = None, **session_kw: Any) -> None:
        from export.runtime import ort_session

        self.path = Path(path)
        self.session = ort_session(path, **session_kw)
        self.input_names = tuple(i.name for i in self.session.get_inputs())
        self.output_names = tuple(o.name for o in self.session.get_outputs())
        self.name = name or f"onnxruntime {self.session.get_providers()[0].removesuffix('ExecutionProvider')}"

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise KeyError(f"{self.path}: missing inputs {missing}; the graph takes {list(self.input_names)}")
        outs = self.session.run(list(self.output_names), {n: feeds[n] for n in self.input_names})
        return dict(zip(self.output_names, outs, strict=True))


class ComposedRunner:
    """A pipeline of runners chained by a composition's steps: what Triton's ensemble scheduler (or the
    generic BLS model) computes, run in-process, so parity can compare the composed path with torch."""

    def __init__(self, composition: Composition, runners: dict[str, Runner], output_names: tuple[str, ...],
                 name: str = "composed") -> None:
        missing = [s.graph for s in composition.steps if s.graph not in runners]
        if missing:
            raise KeyError(f"no runner for graphs {missing}")
        self.composition, self.runners, self.output_names, self.name = composition, runners, output_names, name

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tensors = dict(feeds)
        for step in self.composition.steps:
            got = self.runners[step.graph].infer({g: tensors[p] for g, p in step.input_map.items()})
            tensors.update({p: got[g] for g, p in step.output_map.items()})
        return {n: tensors[n] for n in self.output_names}


def infer_batched(runner: Runner | Callable, feeds: dict[str, np.ndarray], batch: int = 64) -> dict[str, np.ndarray]:
    """Run ``feeds`` through ``runner`` ``batch`` samples at a time and concatenate the outputs."""
    infer = runner.infer if hasattr(runner, "infer") else runner
    n = len(next(iter(feeds.values())))
    chunks = [infer({k: np.ascontiguousarray(v[i : i + batch]) for k, v in feeds.items()}) for i in range(0, n, batch)]
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
