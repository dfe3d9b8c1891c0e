"""The one generic Triton python-backend model: one CPU engine's session on ``<model dir>/<version>/model.onnx``.

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

from export.cpu_engines import Route, served_session
from export.runtime import intra_op_threads
from serving.contract import Contract, ContractError
from serving.validation import InputError, ModelRules, check_arrays, with_defaults

BadRequest = InputError  # a request's own fault: its own error response (serving.validation's one-line message)


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
        # The CPU engine and its threading, as chosen for this host by measurement (export.host_choice; written
        # into the config by serving.repository): onnxruntime by default, OpenVINO where it measured faster, or
        # one of them per batch size ("routes") where they trade places with it. OpenVINO with static shapes
        # compiles one shape per batch bucket (powers of two up to its route's limit).
        engine = params.get("engine") or "onnxruntime"
        try:
            routes = Route.from_parameters(params)
            engine = ", ".join(dict.fromkeys(r.engine for r in routes))
            self.session = served_session(path, routes, threads, int(cfg.get("max_batch_size") or 1))
        except Exception as e:  # the engines raise their own types for corrupt/unreadable graphs
            raise pb_utils.TritonModelException(
                f"model '{self.name}': cannot load ONNX file {path} on {engine} ({e})") from None
        try:
            contract = Contract.from_parameters(params, self.name)
        except ContractError as e:
            raise pb_utils.TritonModelException(str(e)) from None
        # Bounds of the dynamic axes, integer ranges and optional inputs' defaults: the one validator's rules
        # (the client's and the front doors' too)
        self.rules = ModelRules.from_config(cfg, contract)
        self.inputs = [i["name"] for i in cfg["input"]]
        self.outputs = [o["name"] for o in cfg["output"]]
        self.out_dtypes = {o["name"]: pb_utils.triton_string_to_numpy(o["data_type"]) for o in cfg["output"]}
        graph_in, graph_out = set(self.session.input_names), set(self.session.output_names)
        if set(self.inputs) != graph_in or not set(self.outputs) <= graph_out:
            raise pb_utils.TritonModelException(
                f"model '{self.name}': config inputs {self.inputs} / outputs {self.outputs} do not match "
                f"{path} (inputs {sorted(graph_in)}, outputs {sorted(graph_out)})"
            )

    def _read(self, request) -> list[np.ndarray]:
        """The request's inputs in the config's order, optional ones left out filled with their defaults; refused
        (BadRequest) with the same message the client and the front door give (``serving.validation``)."""
        arrays = check_arrays(self.rules, {t.name(): t.as_numpy() for t in request.inputs()})
        return with_defaults(self.rules, arrays)

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
