"""The serving contract: what a model's ``config.pbtxt`` says beside Triton's own fields, written in one place and
read in one place, so that the repository generator, the python backends, the front door and the client agree.

Parameters (string values; JSON where structured):

- ``description``: one line about the model;
- ``output_kinds``: {output: kind} (``logits``, ``segmentation``, ``boxes``, ``map``, ...): how to compare and show it;
- ``input_bounds``: {input: {per-sample axis: [min, max]}} for each dynamic axis (the TensorRT profile's range);
- ``input_ranges``: {integer input: [min, max]}: the values it may take (an index outside would gather out of range);
- ``input_defaults``: {optional input: value} fed when a request leaves it out;
- ``preprocess``: the eval transform and decode limits of a model of encoded image files
  (``training.images.ImagePreprocess``).

A field left as None is not written (a preprocessing model carries only ``description`` and ``preprocess``); a
reader sees an absent one as empty. stdlib + ``training.images`` (numpy, Pillow): Triton's python stubs import it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from training.images import ImagePreprocess

JSON_FIELDS = ("output_kinds", "input_bounds", "input_ranges", "input_defaults")


class ContractError(ValueError):
    """A config parameter that does not parse: names the model and the parameter."""


@dataclass(frozen=True)
class Contract:
    description: str | None = None
    output_kinds: dict[str, str] | None = None
    input_bounds: dict[str, dict[int, tuple[int, int]]] | None = None
    input_ranges: dict[str, tuple[float, float]] | None = None
    input_defaults: dict[str, Any] | None = None
    preprocess: ImagePreprocess | None = None

    # ------------------------------------------------------------------------------------------ the writer

    def parameters(self) -> dict[str, str]:
        """The config's parameters (``serving.modelconfig.set_parameters`` puts them into a config)."""
        out: dict[str, str] = {}
        if self.description is not None:
            out["description"] = self.description
        if self.output_kinds is not None:
            out["output_kinds"] = json.dumps(self.output_kinds)
        if self.input_bounds is not None:
            out["input_bounds"] = json.dumps({k: {str(a): list(r) for a, r in v.items()}
                                              for k, v in self.input_bounds.items()})
        if self.input_ranges is not None:
            out["input_ranges"] = json.dumps({k: list(r) for k, r in self.input_ranges.items()})
        if self.input_defaults is not None:
            out["input_defaults"] = json.dumps(self.input_defaults)
        if self.preprocess is not None:
            out["preprocess"] = self.preprocess.to_json()
        return out

    # ------------------------------------------------------------------------------------------ the reader

    @classmethod
    def from_parameters(cls, params: Mapping[str, str], model: str = "model") -> Contract:
        def load(key: str) -> Any:
            try:
                return json.loads(params.get(key) or "{}")
            except ValueError as e:
                raise ContractError(f"model '{model}': config parameter {key!r} is not JSON ({e})") from None

        try:
            bounds = {k: {int(a): (int(r[0]), int(r[1])) for a, r in v.items()}
                      for k, v in load("input_bounds").items()}
            ranges = {k: (float(v[0]), float(v[1])) for k, v in load("input_ranges").items()}
            pre = ImagePreprocess.from_json(params["preprocess"]) if params.get("preprocess") else None
        except ContractError:
            raise
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
            raise ContractError(f"model '{model}': malformed config parameter ({type(e).__name__}: {e})") from None
        return cls(params.get("description", ""), dict(load("output_kinds")), bounds, ranges,
                   dict(load("input_defaults")), pre)

    @classmethod
    def from_config(cls, cfg: Any) -> Contract:
        """From a config as Triton's JSON (a dict, ``{"parameters": {k: {"string_value": v}}}``) or as the
        ``ModelConfig`` protobuf."""
        return cls.from_parameters(parameters_of(cfg), str(cfg.get("name") if isinstance(cfg, dict) else cfg.name))


def parameters_of(cfg: Any) -> dict[str, str]:
    """A config's parameters as {key: string value}, from Triton's JSON form or the protobuf."""
    if isinstance(cfg, dict):
        return {k: v.get("string_value", "") for k, v in cfg.get("parameters", {}).items()}
    return {k: v.string_value for k, v in cfg.parameters.items()}
