"""The one generic Triton python-backend model: an onnxruntime session on ``<model dir>/<version>/model.onnx``.

Copied unchanged into every model's version folder by ``serving.repository``; everything model-specific
(input/output names and dtypes, the ONNX file, thread count) comes from the model's own config.pbtxt.

Per ``execute`` call Triton hands over the requests the dynamic batcher gathered. They are grouped by
per-sample shape (H, W are dynamic, and only equal shapes concatenate), each group runs as ONE onnxruntime
batch, and the outputs are split back: exactly one response per request, in order. A bad request (NaN/Inf,
empty batch, a dynamic axis outside the spec's range in the config's ``input_bounds``) gets its own error
response naming what is wrong; it never fails the others in the batch.

The session and its thread rule come from ``export.runtime`` (the one place sessions are built): the
server runs this file in the project's venv, where the package is installed.
"""

from __future__ import annotations

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils

from export.runtime import intra_op_threads, ort_session
from serving.contract import Contract, ContractError


class BadRequest(ValueError):
    pass


def _error(message: str):
    return pb_utils.InferenceResponse(
        output_tensors=[], error=pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG)
    )


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        cfg = json.loads(args["model_config"])
        self.name = cfg["name"]
        params = {k: v.get("string_value", "") for k, v in cfg.get("parameters", {}).items()}
        path = os.path.join(args["model_repository"], args["model_version"], params.get("onnx_file") or "model.onnx")
        if not os.path.isfile(path):
            raise pb_utils.TritonModelException(f"model '{self.name}': missing ONNX file {path}")

        # Instances are separate processes sharing the host's cores: split the cores among them.
        instances = sum(int(g.get("count", 1)) for g in cfg.get("instance_group", [])) or 1
        threads = intra_op_threads(int(params.get("intra_op_threads") or 0), instances)
        try:
            self.session = ort_session(path, threads=threads, spinning=params.get("allow_spinning") == "1")
        except Exception as e:  # onnxruntime raises its own types for corrupt/unreadable graphs
            raise pb_utils.TritonModelException(f"model '{self.name}': cannot load ONNX file {path} ({e})") from None
        try:
            contract = Contract.from_parameters(params, self.name)
        except ContractError as e:
            raise pb_utils.TritonModelException(str(e)) from None
        # {input: {per-sample axis: (min, max)}}: the dynamic axes' allowed sizes (the TensorRT profile's range)
        self.bounds = contract.input_bounds
        # Optional inputs a request may leave out ({name: default}) and integer inputs' allowed values.
        self.defaults, self.ranges = contract.input_defaults, contract.input_ranges
        self.in_specs = {i["name"]: (pb_utils.triton_string_to_numpy(i["data_type"]), [int(d) for d in i["dims"]])
                         for i in cfg["input"]}
        self.inputs = [i["name"] for i in cfg["input"]]
        self.outputs = [o["name"] for o in cfg["output"]]
        self.out_dtypes = {o["name"]: pb_utils.triton_string_to_numpy(o["data_type"]) for o in cfg["output"]}
        graph_in = {i.name for i in self.session.get_inputs()}
        graph_out = {o.name for o in self.session.get_outputs()}
        if set(self.inputs) != graph_in or not set(self.outputs) <= graph_out:
            raise pb_utils.TritonModelException(
                f"model '{self.name}': config inputs {self.inputs} / outputs {self.outputs} do not match "
                f"{path} (inputs {sorted(graph_in)}, outputs {sorted(graph_out)})"
            )

    def _read(self, request) -> list[np.ndarray]:
        given = {name: pb_utils.get_input_tensor_by_name(request, name) for name in self.inputs}
        batch = next((t.as_numpy().shape[0] for t in given.values() if t is not None and t.as_numpy().ndim), None)
        arrays = []
        for name in self.inputs:
            t = given[name]
            if t is None and name in self.defaults and batch:
                dtype, dims = self.in_specs[name]
                arrays.append(np.full((batch, *dims), self.defaults[name], dtype=dtype))
                continue
            if t is None:
                raise BadRequest(f"model '{self.name}': missing input '{name}'")
            a = t.as_numpy()
            if a.ndim == 0 or a.shape[0] == 0:
                raise BadRequest(f"model '{self.name}': input '{name}' is an empty batch (shape {list(a.shape)})")
            for axis, (lo, hi) in self.bounds.get(name, {}).items():
                size = a.shape[axis + 1] if axis + 1 < a.ndim else None
                if size is None or not lo <= size <= hi:
                    raise BadRequest(f"model '{self.name}': input '{name}' axis {axis + 1} of shape {list(a.shape)} "
                                     f"must be in {lo}..{hi} (the model's allowed range)")
            if name in self.ranges and a.size:
                lo, hi = self.ranges[name]
                if a.min() < lo or a.max() > hi:
                    raise BadRequest(f"model '{self.name}': input '{name}' values must be in {lo:g}..{hi:g}, got "
                                     f"{a.min()}..{a.max()}")
            if batch is not None and a.shape[0] != batch:
                raise BadRequest(f"model '{self.name}': input '{name}' has batch {a.shape[0]}, the other inputs "
                                 f"{batch}")
            if a.dtype.kind == "f" and not np.isfinite(a).all():
                bad = int(a.size - np.isfinite(a).sum())
                raise BadRequest(
                    f"model '{self.name}': input '{name}' has {bad} NaN/Inf value(s) of {a.size}; "
                    "send finite values"
                )
            arrays.append(a)
        return arrays

    def _run(self, batch: list[np.ndarray]) -> list[np.ndarray]:
        outs = self.session.run(self.outputs, dict(zip(self.inputs, batch, strict=True)))
        return [np.ascontiguousarray(o, dtype=self.out_dtypes[n]) for n, o in zip(self.outputs, outs, strict=True)]

    def _respond(self, arrays_per_request: list[list[np.ndarray]]) -> list:
        sizes = [a[0].shape[0] for a in arrays_per_request]
        if len(arrays_per_request) == 1:
            batch = arrays_per_request[0]
        else:
            batch = [np.concatenate(parts, axis=0) for parts in zip(*arrays_per_request, strict=True)]
        outs = self._run(batch)
        responses, start = [], 0
        for n in sizes:
            tensors = [pb_utils.Tensor(name, o[start:start + n]) for name, o in zip(self.outputs, outs, strict=True)]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += n
        return responses

    def execute(self, requests: list) -> list:
        responses: list = [None] * len(requests)
        groups: dict[tuple, list[tuple[int, list[np.ndarray]]]] = {}
        for i, request in enumerate(requests):
            try:
                arrays = self._read(request)
            except BadRequest as e:
                responses[i] = _error(str(e))
                continue
            key = tuple((a.shape[1:], a.dtype.str) for a in arrays)
            groups.setdefault(key, []).append((i, arrays))

        for members in groups.values():
            try:
                for (i, _), r in zip(members, self._respond([a for _, a in members]), strict=True):
                    responses[i] = r
            except Exception:
                # One batch failed: run each request alone so only the offending ones get the error.
                for i, arrays in members:
                    try:
                        responses[i] = self._respond([arrays])[0]
                    except Exception as e:
                        shapes = [list(a.shape) for a in arrays]
                        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                        responses[i] = _error(f"model '{self.name}': inference failed for input shape(s) "
                                              f"{shapes}: {first}")
        return responses

    def finalize(self) -> None:
        self.session = None
