"""The generic BLS (business logic scripting) model: runs a spec's graphs as a pipeline inside Triton.

Copied unchanged into the composing model's version folder by ``serving.repository``. Its config's
``steps`` parameter lists, in order, the Triton model of each step with its ``input_map`` (the graph's input
-> a pipeline tensor) and ``output_map`` (the graph's output -> a pipeline tensor), exactly as an ensemble
would. Each request is run through the steps with ``pb_utils.InferenceRequest(...).exec()``; a step's error
becomes this request's error, naming the step. This is the place for steps that depend on data (a step
whose inputs are chosen from an earlier step's outputs), which Triton's ensemble scheduler cannot express.
"""

from __future__ import annotations

import json

import triton_python_backend_utils as pb_utils

from serving.validation import ModelRules, check_arrays


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        cfg = json.loads(args["model_config"])
        self.name = cfg["name"]
        params = {k: v.get("string_value", "") for k, v in cfg.get("parameters", {}).items()}
        self.steps = json.loads(params.get("steps") or "[]")
        if not self.steps:
            raise pb_utils.TritonModelException(f"model '{self.name}': no pipeline steps in its config")
        self.inputs = [i["name"] for i in cfg["input"]]
        self.rules = ModelRules.from_config(cfg)  # the one validator's (client, front door, here)
        self.outputs = [o["name"] for o in cfg["output"]]

    def _run(self, request) -> pb_utils.InferenceResponse:
        # the validator's InputError is a ValueError: refused below with its one-line message
        tensors = check_arrays(self.rules, {t.name(): t.as_numpy() for t in request.inputs()})
        for step in self.steps:
            sub = pb_utils.InferenceRequest(
                model_name=step["model"],
                requested_output_names=list(step["output_map"]),
                inputs=[pb_utils.Tensor(g, tensors[p]) for g, p in step["input_map"].items()],
            )
            resp = sub.exec()
            if resp.has_error():
                raise ValueError(f"model '{self.name}': step '{step['model']}' failed: {resp.error().message()}")
            for g, p in step["output_map"].items():
                tensors[p] = pb_utils.get_output_tensor_by_name(resp, g).as_numpy()
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(n, tensors[n]) for n in self.outputs])

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            try:
                responses.append(self._run(request))
            except ValueError as e:  # the client's request: say what was wrong with it
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(str(e), pb_utils.TritonError.INVALID_ARG)))
        return responses
