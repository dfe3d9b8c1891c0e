"""The generic Triton python-backend preprocessing model: encoded image files -> a model's image input.

Served as ``<name>_preprocess``, the first step of the ``<name>_image`` ensemble (``serving.repository``). Its
input is a BYTES tensor, one encoded file (JPEG, PNG, WebP, BMP; any size) per batch element; its output is
the model's image input through the eval transform of training (``training.images.ImagePreprocess``, read
from the config's ``preprocess`` parameter): the same code, so the served input equals training's.

A request whose payload is empty, is no image, is truncated, is above the pixel limit, or whose files together
would decode to more than the per-request budget (``max_request_pixels``, read from the headers before anything
is decoded) gets its own INVALID_ARG error naming the element or the budget; the other requests of the batch are
answered.
"""

from __future__ import annotations

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from serving.contract import Contract
from serving.validation import InputError, ModelRules, check_arrays
from training.images import ImageError


def _error(message: str):
    return pb_utils.InferenceResponse(
        output_tensors=[], error=pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG)
    )


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        cfg = json.loads(args["model_config"])
        self.name = cfg["name"]
        pre = Contract.from_config(cfg).preprocess
        if pre is None:
            raise pb_utils.TritonModelException(f"model '{self.name}': its config has no 'preprocess' parameter")
        self.pre = pre
        self.rules = ModelRules.from_config(cfg)  # the one validator's (client, front door, here)
        self.input = cfg["input"][0]["name"]
        self.output = cfg["output"][0]["name"]

    def _one(self, request) -> object:
        # name, datatype, shape (a batch of >= 1 files) as everywhere else; then the files themselves
        files = check_arrays(self.rules, {t.name(): t.as_numpy() for t in request.inputs()})[self.input].reshape(-1)
        files = [data if isinstance(data, bytes) else bytes(data) for data in files]
        self.pre.check_request(files, source=f"model '{self.name}': input '{self.input}'")  # before any decoding
        out = np.empty((len(files), self.pre.channels, self.pre.size, self.pre.size), np.float32)
        for k, raw in enumerate(files):
            try:
                out[k] = self.pre(raw, source=f"model '{self.name}': input '{self.input}' element {k}")
            except ImageError:
                raise
            except Exception as e:  # Pillow raises many types for malformed files; name the element
                raise ImageError(f"model '{self.name}': input '{self.input}' element {k}: cannot decode image: "
                                 f"{e}") from None
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(self.output, out)])

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            try:
                responses.append(self._one(request))
            except (InputError, ImageError) as e:
                responses.append(_error(str(e)))
        return responses
