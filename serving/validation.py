"""The one input validator: a model's rules (its config's inputs plus the serving contract) and the checks every
surface that takes a request runs, each kind of bad input with ONE message.

Used by the client before it sends (``serving.client``), the front door's HTTP and gRPC surfaces before they forward
(``serving.frontdoor``, ``serving.frontdoor_grpc``) and the python backends inside Triton
(``serving/backend/model.py``, ``preprocess.py``, ``pipeline.py``), so a bad input gets the same one-line answer
whichever door it comes through. Triton itself refuses some kinds before a backend sees them (a wrong datatype,
rank or fixed dim, an unknown input, a batch over the maximum, a byte count that does not match the shape): those
messages are Triton's own; ``tests/test_validation.py`` records which kinds reach which surface.

The checks, in the order every surface runs them (the first failure is the answer):

- per input, in request order (``check_input``): a name the model has, sent once, its datatype, then its shape
  (``check_shape``: a list of integers, the rank, every dim >= 1, the batch within ``max_batch_size``, fixed dims,
  each dynamic axis within the contract's ``input_bounds``); then its data: the byte count the shape needs
  (``check_byte_size``, for surfaces that see raw bytes) and its values (``check_values``: finite floats, integers
  within the contract's ``input_ranges``);
- then the request as a whole (``check_complete``): every required input sent, all with one batch size.

stdlib + numpy + ``serving.contract``: Triton's python stubs import it (no torch, no tritonclient, no protobuf).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from serving.contract import Contract
from training.images import ImagePreprocess

MAX_RANK = 16  # a claimed shape is echoed in messages up to this many dims
NAME_CHARS = 80  # a client-chosen name is echoed up to this many characters

# Triton's datatype names (the KServe v2 protocol's) and their numpy types; BYTES are length-prefixed strings.
NUMPY_TYPES: dict[str, Any] = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
}
ITEM_SIZE = {**{k: np.dtype(v).itemsize for k, v in NUMPY_TYPES.items()}, "BF16": 2}
_DATATYPE_OF = {np.dtype(v): k for k, v in NUMPY_TYPES.items()}


class InputError(ValueError):
    """A request's input refused: one line naming the model, the input, its shape and what is allowed."""


def _bad(message: str) -> InputError:
    return InputError(message)


def datatype_of(a: np.ndarray) -> str:
    """An array's Triton datatype name (object / bytes arrays are BYTES)."""
    if a.dtype.kind in "OSU":
        return "BYTES"
    return _DATATYPE_OF.get(a.dtype, a.dtype.name)


def _config_datatype(t: Any) -> str:
    """A config tensor's datatype as the protocol names it: from Triton's JSON form ("TYPE_FP32") or the protobuf
    (an enum number, named through the message's own descriptor, so no generated module is imported here)."""
    if isinstance(t, dict):
        name = str(t["data_type"])
    else:
        name = type(t).DESCRIPTOR.fields_by_name["data_type"].enum_type.values_by_number[t.data_type].name
    name = name.removeprefix("TYPE_")
    return "BYTES" if name == "STRING" else name


# ------------------------------------------------------------------------------------------------- the rules


@dataclass(frozen=True)
class InputRule:
    name: str
    datatype: str  # the protocol's name: FP32, INT64, BYTES, ...
    dims: tuple[int, ...]  # per sample; -1 dynamic
    bounds: dict[int, tuple[int, int]]  # per-sample axis -> [min, max] (the contract's input_bounds)
    optional: bool = False
    value_range: tuple[float, float] | None = None  # the contract's input_ranges
    default: Any = None  # the contract's input_defaults: fed when a request leaves an optional input out

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(NUMPY_TYPES.get(self.datatype, np.object_))


@dataclass(frozen=True)
class ModelRules:
    name: str
    max_batch_size: int
    inputs: dict[str, InputRule]
    outputs: tuple[str, ...]
    preprocess: ImagePreprocess | None = None  # a model of encoded image files: its decode limits

    @property
    def batched(self) -> bool:
        return self.max_batch_size > 0

    @classmethod
    def from_config(cls, cfg: Any, contract: Contract | None = None) -> ModelRules:
        """From a config as Triton's JSON (a dict: the python stubs' ``model_config``, the clients' config) or as the
        ``ModelConfig`` protobuf (the front door's). ``contract``: already parsed (else read here, and a malformed
        parameter raises ``serving.contract.ContractError``)."""
        c = contract if contract is not None else Contract.from_config(cfg)
        js = isinstance(cfg, dict)
        name = str(cfg["name"] if js else cfg.name)
        bounds, ranges, defaults = c.input_bounds or {}, c.input_ranges or {}, c.input_defaults or {}
        inputs = {}
        for t in cfg.get("input", []) if js else cfg.input:
            n = str(t["name"] if js else t.name)
            dims = tuple(int(d) for d in (t.get("dims", []) if js else t.dims))
            optional = bool(t.get("optional", False) if js else t.optional)
            inputs[n] = InputRule(n, _config_datatype(t), dims, bounds.get(n, {}), optional, ranges.get(n),
                                  defaults.get(n))
        outputs = tuple(str(o["name"] if js else o.name) for o in (cfg.get("output", []) if js else cfg.output))
        mbs = int(cfg.get("max_batch_size", 0) if js else cfg.max_batch_size)
        return cls(name, mbs, inputs, outputs, c.preprocess)

    def with_required(self, name: str) -> ModelRules:
        """These rules with input ``name`` required (where no default can stand in for it)."""
        return replace(self, inputs={**self.inputs, name: replace(self.inputs[name], optional=False)})

    def where(self, name: str) -> str:
        return f"model '{self.name}': input '{name[:NAME_CHARS]}'"

    def shape_text(self, rule: InputRule) -> str:
        dims = (["batch"] if self.batched else []) + ["?" if d < 0 else str(d) for d in rule.dims]
        return "[" + ", ".join(dims) + "]"


# ------------------------------------------------------------------------------------------------ the checks


def check_input(rules: ModelRules, name: str, datatype: object, shape: object,
                seen: Iterable[str] = ()) -> tuple[str, list[int], int]:
    """One input's name, datatype and shape, before any of its data is looked at; returns (how to name it, its
    shape, its element count)."""
    m = rules.name
    rule = rules.inputs.get(name)
    if rule is None:
        raise _bad(f"model '{m}' has no input {name[:NAME_CHARS]!r} (inputs: {', '.join(rules.inputs)})")
    where = rules.where(name)
    if name in seen:
        raise _bad(f"{where} sent twice")
    if datatype != rule.datatype:
        raise _bad(f"{where}: datatype {str(datatype)[:20]!r}, the model takes {rule.datatype}")
    shape = check_shape(rules, rule, shape)
    return where, shape, math.prod(shape)


def check_shape(rules: ModelRules, rule: InputRule, shape: object, where: str | None = None) -> list[int]:
    where = where or rules.where(rule.name)
    batched = rules.batched
    want = len(rule.dims) + batched
    if not isinstance(shape, list) or not all(type(d) is int for d in shape):  # bool is not a dim
        raise _bad(f"{where}: 'shape' must be a list of integers")
    if len(shape) != want:
        raise _bad(f"{where} shape {shape[:MAX_RANK]}: rank {len(shape)}, the model takes rank {want} "
                   f"{rules.shape_text(rule)}")
    if any(d <= 0 for d in shape):
        raise _bad(f"{where} shape {shape}: every dim must be >= 1")
    if batched and shape[0] > rules.max_batch_size:
        raise _bad(f"{where} shape {shape}: batch {shape[0]} exceeds max_batch_size {rules.max_batch_size}")
    for axis, (got, dim) in enumerate(zip(shape[batched:], rule.dims, strict=True)):
        if dim >= 0 and got != dim:
            raise _bad(f"{where} shape {shape}: axis {axis + batched} is {got}, the model takes {dim}")
        lo, hi = rule.bounds.get(axis, (1, None))
        if got < lo or (hi is not None and got > hi):
            raise _bad(f"{where} shape {shape}: axis {axis + batched} is {got}, must be in {lo}..{hi} "
                       "(the model's allowed range)")
    return shape


def check_byte_size(rules: ModelRules, name: str, datatype: str, shape: list[int], size: int) -> None:
    """A fixed-size datatype's data against the bytes its (checked) shape needs."""
    count, item = math.prod(shape), ITEM_SIZE[datatype]
    if size != count * item:
        raise _bad(f"{rules.where(name)} shape {shape} ({datatype}): {size} bytes of data, the shape needs "
                   f"{count} x {item} = {count * item}")


def check_raw(rules: ModelRules, name: str, datatype: str, shape: list[int], raw: bytes | memoryview) -> None:
    """An input's raw little-endian bytes (the HTTP binary extension, gRPC's raw_input_contents): the byte count,
    then the values. BYTES elements are framed by the transport (and checked there)."""
    if datatype == "BYTES":
        return
    check_byte_size(rules, name, datatype, shape, len(raw))
    check_values(rules, name, datatype, shape,
                 np.frombuffer(raw, dtype=np.uint16 if datatype == "BF16" else NUMPY_TYPES[datatype]))


def check_values(rules: ModelRules, name: str, datatype: str, shape: list[int], values: np.ndarray) -> None:
    """Finite floats (BF16 given as its raw uint16 words), integers within the contract's ``input_ranges``."""
    at = f"{rules.where(name)} shape {shape} ({datatype})"
    if datatype == "BF16":
        bad = int(np.count_nonzero((values.view(np.uint16) & 0x7F80) == 0x7F80))
    elif datatype.startswith("FP"):
        bad = int(values.size - np.count_nonzero(np.isfinite(values)))
    else:
        bad = 0
    if bad:
        raise _bad(f"{at}: {bad} NaN/Inf value(s) of {values.size}; send finite values")
    rule = rules.inputs.get(name)
    if rule is not None and rule.value_range is not None and values.size and datatype != "BYTES":
        lo, hi = rule.value_range
        if values.min() < lo or values.max() > hi:
            raise _bad(f"{at}: values must be in {lo:g}..{hi:g}, got {values.min()}..{values.max()}")


def check_complete(rules: ModelRules, shapes: Mapping[str, list[int]]) -> None:
    """The request as a whole ({input name: shape}, in request order): every required input, one batch size."""
    m = rules.name
    missing = [n for n, r in rules.inputs.items() if not r.optional and n not in shapes]
    if missing:
        required = [n for n, r in rules.inputs.items() if not r.optional]
        raise _bad(f"model '{m}': missing input(s) {', '.join(missing)} (required: {', '.join(required)})")
    if rules.batched and len({s[0] for s in shapes.values()}) > 1:
        sizes = ", ".join(f"{n} {s[0]}" for n, s in shapes.items())
        raise _bad(f"model '{m}': inputs disagree on the batch size ({sizes})")


def check_arrays(rules: ModelRules, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every check on a request given as numpy arrays ({input name: array}, in request order): the client's before
    it sends, the python backends' on what Triton hands them. Returns the arrays (``np.asarray``)."""
    out: dict[str, np.ndarray] = {}
    for name, a in arrays.items():
        a = np.asarray(a)
        datatype = datatype_of(a)
        _, shape, _ = check_input(rules, name, datatype, list(a.shape), out)
        check_values(rules, name, datatype, shape, a)
        out[name] = a
    check_complete(rules, {n: list(a.shape) for n, a in out.items()})
    return out


def with_defaults(rules: ModelRules, arrays: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Checked arrays in the config's input order, each optional input left out filled with its default (a backend
    that runs a graph needs every input: an optional one without a default is missing there)."""
    batch = next((a.shape[0] for a in arrays.values() if a.ndim), None) if rules.batched else None
    out = []
    for name, rule in rules.inputs.items():
        a = arrays.get(name)
        if a is None:
            if rule.default is None:
                check_complete(rules.with_required(name), {n: list(x.shape) for n, x in arrays.items()})
            a = np.full(((batch,) if batch else ()) + rule.dims, rule.default, dtype=rule.dtype)
        out.append(a)
    return out
