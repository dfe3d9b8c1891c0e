"""The front door: a small KServe v2 HTTP service for untrusted clients, in front of Triton's gRPC port.

tritonserver 2.51's HTTP JSON path allocates the claimed tensor size before it validates anything (a request
with shape [64, 1, 100000, 100000] and ``"data": []`` aborts the server with std::bad_alloc) and answers
malformed requests with 500. The front door speaks the same protocol (JSON bodies and the binary-tensor
extension, so ``tritonclient.http`` works against it unchanged), and before anything is allocated it:

- refuses a body over the limit from its Content-Length, and stops reading a streamed body at the limit (413);
- checks every input against the model's config, fetched from Triton over gRPC, with the one validator
  (``serving.validation``, which the client and the python backends run too, with the same messages): name,
  datatype, rank, fixed dims, batch within ``max_batch_size``, each dynamic axis within the config parameter
  ``input_bounds``, that the claimed element count matches the data sent, integer values within
  ``input_ranges``; refuses NaN/Inf, non-numbers, zero or negative dims (400 with ``{"error": "<one line>"}``;
  404 for an unknown model);
- forwards what passes to Triton over gRPC, which checks byte sizes before allocating, and maps Triton's
  INVALID_ARGUMENT to 400, NOT_FOUND to 404, UNAVAILABLE to 503; a model that exists but cannot answer now
  (being reloaded, its python stub dead) gets 503 with Retry-After, and is not ready (a real probe inference).

It also serves the attention explorer (``serving/explorer/``: static HTML/JS/CSS at ``/explorer/``), a page that
calls this same v2 API from the browser; its one extra resource, ``/explorer/models.json``, lists the repository's
``<name>_image`` models, the bundled samples and the mask palette (no inference happens there).

Request parameters other than ``binary_data_output`` (priority, timeout, sequences, custom ones) and shared
memory are not forwarded. Triton's own ports stay on 127.0.0.1; the front door's port is the one to expose.

    python -m serving.frontdoor [--host 127.0.0.1] [--port 8080] [--triton-grpc 127.0.0.1:8001] [--max-body-mib 64]
                                [--model-repository DIR] [--no-explorer]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import re
import signal
import struct
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from google.protobuf import json_format
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pbg

from serving import validation
from serving.cli import cli_error
from serving.contract import Contract, ContractError
from serving.server import RECONNECT_BACKOFF, TRITON_RELOADING
from serving.validation import NUMPY_TYPES, InputError, ModelRules, check_input, check_raw
from training.images import ImageError

DEFAULT_PORT = 8080
DEFAULT_TRITON_GRPC = "127.0.0.1:8001"
DEFAULT_BODY_LIMIT = 64 * 2**20
CONFIG_TTL_S = 5.0  # a reloaded model's new config is picked up within this
OFFLOAD_BYTES = 2**20  # bodies above this are parsed in a worker thread, off the event loop
MAX_ID = 256
MODEL_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")
HEADER_LENGTH = "Inference-Header-Content-Length"
GRPC_OPTIONS = [("grpc.max_send_message_length", 2**31 - 1), ("grpc.max_receive_message_length", 2**31 - 1),
                *RECONNECT_BACKOFF]

EXPLORER_DIR = Path(__file__).resolve().parent / "explorer"
EXPLORER_SAMPLE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# The page only talks to this origin; blob:/data: are the images it decodes and draws itself.
EXPLORER_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; "
                                               "object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
                    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
GRPC_STATUS = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.NOT_FOUND: 404,
               grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.RESOURCE_EXHAUSTED: 503,
               grpc.StatusCode.DEADLINE_EXCEEDED: 504}
# A request whose image files decode to more pixels than this is "large": large ones take turns, one per model at
# a time (the lane, shared by the HTTP and gRPC surfaces), so that a stream of them occupies one preprocessing
# instance and small requests keep the others. Waiting longer than LANE_WAIT_S for a turn gets 503 + Retry-After.
LARGE_REQUEST_PIXELS = 2_000_000
LANE_WAIT_S = 30.0
RETRY_AFTER_S = 1  # a model reload or a stub restart takes about a second here; Triton's restart a few
PROBE_TTL_S = 1.0  # /ready probes a model with a real inference at most this often


class RequestError(Exception):
    """A request refused with an HTTP status and a one-line message; ``retry_after`` (seconds) for a 503 that
    will pass (a model loading, a stub or Triton restarting)."""

    def __init__(self, status: int, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.retry_after = status, retry_after


def one_line(text: str, limit: int = 400) -> str:
    line = " ".join((text or "").split("\n\nAt:")[0].split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _error(status: int, message: str, retry_after: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse({"error": one_line(message)}, status_code=status, headers=headers)


def _bad(message: str) -> RequestError:
    return RequestError(400, message)


def _count(text: str) -> int | None:
    """A header's non-negative integer (ASCII digits only), else None."""
    text = text.strip()
    return int(text) if text.isascii() and text.isdigit() and len(text) < 20 else None


def _is_int(v: object) -> bool:
    return type(v) is int  # bool is not a dim


# ------------------------------------------------------------------------------------- model rules


def model_rules(cfg: mc.ModelConfig) -> ModelRules:
    """The rules the front door checks requests against (``serving.validation``, the one validator)."""
    try:
        contract = Contract.from_config(cfg)
    except ContractError:
        contract = Contract()  # a malformed parameter: the backend's own checks (and its load error) still apply
    return ModelRules.from_config(cfg, contract)


@contextlib.contextmanager
def refused_as_400() -> Iterator[None]:
    """The validator's refusals as the front door's 400 (one place for both surfaces)."""
    try:
        yield
    except InputError as e:
        raise _bad(str(e)) from None


@dataclass
class Tensor:
    name: str
    datatype: str
    shape: list[int]
    raw: bytes


@dataclass
class Output:
    name: str
    binary: bool | None = None  # None: the request's binary_data_output
    class_count: int = 0


@dataclass
class Parsed:
    inputs: list[Tensor]
    outputs: list[Output] = field(default_factory=list)
    binary_output: bool = False
    request_id: str = ""
    decode_pixels: int = 0  # what the request's image files will cost to decode (0: no image files)


# ---------------------------------------------------------------------------------- request parsing


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number JSON allows")


def split_body(body: bytes, header_length: str | None) -> tuple[dict, bytes]:
    """The JSON header and the binary tail (binary-tensor extension)."""
    if header_length is None:
        head, tail = body, b""
    else:
        n = _count(header_length)
        if n is None or n > len(body):
            raise _bad(f"{HEADER_LENGTH} {header_length[:40]!r} is not a length within the {len(body)}-byte body")
        head, tail = body[:n], body[n:]
    try:
        request = json.loads(head, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise _bad(f"request body is not valid JSON: {one_line(str(e), 120)}") from None
    if not isinstance(request, dict):
        raise _bad("request body must be a JSON object with 'inputs'")
    return request, tail


def _flatten(data: list, rank: int, where: str) -> list:
    for _ in range(rank):
        if not data or type(data[0]) is not list:
            break
        if not all(type(x) is list for x in data):
            raise _bad(f"{where}: 'data' mixes nested lists and values")
        data = list(itertools.chain.from_iterable(data))
    return data


def values_raw(flat: list, datatype: str, where: str) -> bytes:
    kinds = set(map(type, flat))
    if datatype == "BYTES":
        if not kinds <= {str}:
            raise _bad(f"{where} (BYTES): 'data' must hold strings")
        return b"".join(struct.pack("<I", len(b)) + b for b in (s.encode() for s in flat))
    if datatype == "BF16":
        raise _bad(f"{where}: BF16 must be sent as binary data")
    np_type = NUMPY_TYPES[datatype]
    allowed = {bool} if datatype == "BOOL" else {int, float} if datatype.startswith("FP") else {int}
    if not kinds <= allowed:
        found = ", ".join(sorted(k.__name__ for k in kinds - allowed))
        want = "true/false" if datatype == "BOOL" else "numbers" if datatype.startswith("FP") else "integers"
        raise _bad(f"{where} ({datatype}): 'data' holds {found} values; send {want}")
    try:
        with np.errstate(all="ignore"):
            if datatype.startswith(("INT", "UINT")):
                wide = np.asarray(flat, dtype=np.int64 if datatype != "UINT64" else np.uint64)
                info = np.iinfo(np_type)
                if wide.size and (wide.min() < info.min or wide.max() > info.max):
                    raise _bad(f"{where} ({datatype}): values outside {info.min}..{info.max}")
                arr = wide.astype(np_type)
            else:
                arr = np.asarray(flat, dtype=np_type)
    except (OverflowError, ValueError, TypeError) as e:
        raise _bad(f"{where} ({datatype}): {one_line(str(e), 120)}") from None
    return arr.tobytes()  # its values are checked with the binary ones (check_raw)


def binary_raw(tail: memoryview, offset: int, size: int, count: int, datatype: str, where: str) -> bytes:
    """An input's bytes from the binary tail; BYTES elements framed. Fixed-size types' byte count and values are
    the validator's (``check_raw``)."""
    if offset + size > len(tail):
        raise _bad(f"{where}: binary_data_size {size} runs past the {len(tail)} bytes of binary data sent")
    raw = tail[offset:offset + size]
    if datatype == "BYTES":
        pos = 0
        for _ in range(count):
            if pos + 4 > size or pos + 4 + struct.unpack_from("<I", raw, pos)[0] > size:
                raise _bad(f"{where} (BYTES): binary data holds fewer than {count} length-prefixed strings")
            pos += 4 + struct.unpack_from("<I", raw, pos)[0]
        if pos != size:
            raise _bad(f"{where} (BYTES): {size - pos} bytes after the {count} strings")
    return bytes(raw)


def _parse_outputs(request: dict, rules: ModelRules) -> tuple[list[Output], bool]:
    params = request.get("parameters", {})
    if not isinstance(params, dict):
        raise _bad("request 'parameters' must be an object")
    binary_all = params.get("binary_data_output", False)
    if type(binary_all) is not bool:
        raise _bad("parameter 'binary_data_output' must be true or false")
    items = request.get("outputs", [])
    if not isinstance(items, list):
        raise _bad("'outputs' must be a list")
    outputs: list[Output] = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise _bad(f"model '{rules.name}': each requested output must be an object with a 'name'")
        name, p = item["name"], item.get("parameters", {})
        if name not in rules.outputs:
            raise _bad(f"model '{rules.name}' has no output {name[:80]!r} (outputs: {', '.join(rules.outputs)})")
        if name in {o.name for o in outputs}:
            raise _bad(f"model '{rules.name}': output '{name}' requested twice")
        if not isinstance(p, dict):
            raise _bad(f"model '{rules.name}': output '{name}' parameters must be an object")
        if any(k.startswith("shared_memory") for k in p):
            raise _bad(f"model '{rules.name}': output '{name}': shared memory is not offered here")
        binary, k = p.get("binary_data"), p.get("classification", 0)
        if binary is not None and type(binary) is not bool:
            raise _bad(f"model '{rules.name}': output '{name}' binary_data must be true or false")
        if not _is_int(k) or not 0 <= k <= 2**31 - 1:
            raise _bad(f"model '{rules.name}': output '{name}' classification must be a count >= 0")
        outputs.append(Output(name, binary, k))
    return outputs, binary_all


def parse_request(request: dict, tail: bytes, rules: ModelRules) -> Parsed:
    """Validate a decoded v2 request against the model's rules; nothing sized by the claim is allocated
    before the claim is checked against the data actually sent."""
    with refused_as_400():
        return _parse_request(request, tail, rules)


def _parse_request(request: dict, tail: bytes, rules: ModelRules) -> Parsed:
    m = rules.name
    rid = request.get("id", "")
    if not isinstance(rid, str) or len(rid) > MAX_ID:
        raise _bad(f"model '{m}': 'id' must be a string of at most {MAX_ID} characters")
    items = request.get("inputs")
    if not isinstance(items, list) or not items:
        raise _bad(f"model '{m}': 'inputs' must be a non-empty list (inputs: {', '.join(rules.inputs)})")
    outputs, binary_all = _parse_outputs(request, rules)
    view, offset, tensors = memoryview(tail), 0, []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise _bad(f"model '{m}': each input must be an object with a 'name'")
        where, shape, count = check_input(rules, item["name"], item.get("datatype"), item.get("shape"),
                                          {t.name for t in tensors})
        datatype = item["datatype"]
        params = item.get("parameters", {})
        if not isinstance(params, dict):
            raise _bad(f"{where}: 'parameters' must be an object")
        if any(k.startswith("shared_memory") for k in params):
            raise _bad(f"{where}: shared memory is not offered here")
        size = params.get("binary_data_size")
        if size is not None:
            if not _is_int(size) or size < 0:
                raise _bad(f"{where}: binary_data_size must be a byte count")
            if "data" in item:
                raise _bad(f"{where}: send either 'data' or binary_data_size, not both")
            raw = binary_raw(view, offset, size, count, datatype, f"{where} shape {shape}")
            offset += size
        else:
            data = item.get("data")
            if not isinstance(data, list):
                raise _bad(f"{where}: 'data' must be a list (or send binary data with binary_data_size)")
            flat = _flatten(data, len(shape), where)
            if len(flat) != count:
                raise _bad(f"{where} shape {shape} ({datatype}): needs {count} values, 'data' holds {len(flat)}")
            raw = values_raw(flat, datatype, f"{where} shape {shape}")
        check_raw(rules, item["name"], datatype, shape, raw)
        tensors.append(Tensor(item["name"], datatype, shape, raw))
    pixels = check_complete(rules, tensors)
    if offset != len(tail):
        raise _bad(f"model '{m}': {len(tail) - offset} bytes of binary data beyond the inputs' binary_data_size")
    return Parsed(tensors, outputs, binary_all, rid, pixels)


def check_complete(rules: ModelRules, tensors: list[Tensor]) -> int:
    """Every required input sent, all with one batch size (``serving.validation``), image files within their decode
    budget (read from their headers; nothing is decoded). Returns the pixels the image files will cost to decode
    (0: none)."""
    validation.check_complete(rules, {t.name: t.shape for t in tensors})
    if rules.preprocess is None:
        return 0
    pixels = 0
    for t in tensors:
        if t.datatype == "BYTES":
            try:
                pixels += rules.preprocess.check_request(bytes_elements(t.raw),
                                                         source=f"model '{rules.name}': input '{t.name}'")
            except ImageError as e:
                raise _bad(str(e)) from None
    return pixels


def bytes_elements(raw: bytes) -> list[bytes]:
    """A BYTES tensor's elements (4-byte little-endian length, then the bytes; checked by binary_raw)."""
    out, pos = [], 0
    while pos + 4 <= len(raw):
        n = struct.unpack_from("<I", raw, pos)[0]
        out.append(raw[pos + 4:pos + 4 + n])
        pos += 4 + n
    return out


def decode_body(body: bytes, encoding: str | None, limit: int) -> bytes:
    """Undo a gzip/deflate Content-Encoding (tritonclient's request_compression_algorithm), bounded."""
    enc = (encoding or "identity").strip().lower()
    if enc == "identity":
        return body
    if enc not in ("gzip", "deflate"):
        raise RequestError(415, f"Content-Encoding {enc[:20]!r} is not supported (gzip, deflate)")
    d = zlib.decompressobj(zlib.MAX_WBITS | (16 if enc == "gzip" else 0))
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error as e:
        raise _bad(f"request body is not valid {enc}: {e}") from None
    if len(out) > limit or d.unconsumed_tail:
        raise RequestError(413, f"decompressed request body exceeds the {limit}-byte limit")
    return out


# ---------------------------------------------------------------------------------------- responses


def json_values(raw: bytes, datatype: str) -> list:
    if datatype == "BYTES":
        return [b.decode(errors="replace") for b in bytes_elements(raw)]
    if datatype == "BF16":
        return (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32).tolist()
    return np.frombuffer(raw, NUMPY_TYPES[datatype]).tolist()


def infer_response(resp: Any, parsed: Parsed) -> Response:
    """Triton's gRPC answer as the v2 HTTP answer: JSON, or JSON + binary tail where asked."""
    wanted = {o.name: o for o in parsed.outputs}
    outputs, tail = [], []
    for i, o in enumerate(resp.outputs):
        raw = resp.raw_output_contents[i] if i < len(resp.raw_output_contents) else b""
        ask = wanted.get(o.name)
        binary = parsed.binary_output if ask is None or ask.binary is None else ask.binary
        item: dict[str, Any] = {"name": o.name, "datatype": o.datatype, "shape": list(o.shape)}
        if binary:
            item["parameters"] = {"binary_data_size": len(raw)}
            tail.append(raw)
        else:
            item["data"] = json_values(raw, o.datatype)
        outputs.append(item)
    body: dict[str, Any] = {"id": resp.id} if resp.id else {}
    body.update(model_name=resp.model_name, model_version=resp.model_version, outputs=outputs)
    head = json.dumps(body, separators=(",", ":")).encode()
    if not tail:
        return Response(head, media_type="application/json")
    return Response(b"".join([head, *tail]), media_type="application/octet-stream",
                    headers={HEADER_LENGTH: str(len(head))})


def _dims_to_int(node: Any) -> Any:
    """MessageToDict writes int64 fields as strings; Triton's HTTP config has numbers for dims."""
    if isinstance(node, dict):
        return {k: ([int(d) for d in v] if k in ("dims", "shape") and isinstance(v, list) else _dims_to_int(v))
                for k, v in node.items()}
    if isinstance(node, list):
        return [_dims_to_int(v) for v in node]
    return node


# -------------------------------------------------------------------------------------- Triton (gRPC)


_LANES: dict[str, threading.Semaphore] = {}
_LANES_LOCK = threading.Lock()


@contextlib.asynccontextmanager
async def large_request_lane(model: str) -> Any:
    """One large-image request per model at a time, across event loops (a thread semaphore, waited for off the
    loop); 503 + Retry-After when the turn does not come within LANE_WAIT_S."""
    with _LANES_LOCK:
        lane = _LANES.setdefault(model, threading.Semaphore(1))
    if not await asyncio.to_thread(lane.acquire, True, LANE_WAIT_S):
        raise RequestError(503, f"model '{model}': busy with large-image requests (over {LARGE_REQUEST_PIXELS} "
                                "decoded pixels each, one at a time); retry", RETRY_AFTER_S)
    try:
        yield
    finally:
        lane.release()


class Triton:
    """Triton's gRPC API and a short-lived cache of model rules; create inside the serving event loop.

    A model that exists (in ``repository``, or served before) but cannot answer right now (being reloaded,
    its python stub dead) is refused with 503 + Retry-After, never 404, and is counted in ``broken`` until
    it answers again."""

    def __init__(self, url: str, timeout: float = 30.0, repository: Path | None = None,
                 large_request_pixels: int | None = LARGE_REQUEST_PIXELS) -> None:
        self.url, self.timeout, self.repository = url, timeout, repository
        self.large_request_pixels = large_request_pixels  # None: no lane (every request decodes at once)
        self.channel = grpc.aio.insecure_channel(url, options=GRPC_OPTIONS)
        self.stub = pbg.GRPCInferenceServiceStub(self.channel)
        self._rules: dict[tuple[str, str], tuple[float, ModelRules]] = {}
        self._probes: dict[tuple[str, str], tuple[float, str | None]] = {}
        self.seen: set[str] = set()  # models Triton has served to us
        self.broken: set[str] = set()  # models that exist but failed to answer, until they answer again

    async def call(self, method: str, request: Any, model: str = "", version: str = "") -> Any:
        """One gRPC call; ``model``/``version``: what it is about (its refusals may be retryable)."""
        try:
            return await getattr(self.stub, method)(request, timeout=self.timeout)
        except grpc.aio.AioRpcError as e:
            raise self._refusal(e.code(), e.details() or str(e.code()), model, version) from None

    def known(self, model: str) -> bool:
        """The model exists though Triton may not serve it now: served before, or in the model repository."""
        if model in self.seen:
            return True
        return (self.repository is not None and not model.startswith(".")
                and (self.repository / model / "config.pbtxt").is_file())

    def _refusal(self, code: grpc.StatusCode, msg: str, model: str, version: str) -> RequestError:
        if code == grpc.StatusCode.UNAVAILABLE and "connect" in msg.lower():
            return RequestError(503, f"triton at {self.url} is unavailable (restarting?): {msg}", RETRY_AFTER_S)
        transient = code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INTERNAL) \
            and bool(TRITON_RELOADING.search(msg))
        # A version asked for by number that Triton does not have is unknown, the model's existence aside.
        if model and (transient or (code == grpc.StatusCode.NOT_FOUND and not version and self.known(model))):
            self.broken.add(model)
            return RequestError(503, f"model '{model}' exists but is not available right now (loading, or its "
                                     f"process restarting): {msg}; retry", RETRY_AFTER_S)
        return RequestError(GRPC_STATUS.get(code, 502), msg)

    async def rules(self, model: str, version: str = "") -> ModelRules:
        if not MODEL_NAME.fullmatch(model) or not (version == "" or (version.isascii() and version.isdigit()
                                                                      and len(version) < 19)):
            raise RequestError(404, f"unknown model {model[:80]!r}" + (f" version {version[:20]!r}" if version else ""))
        key, now = (model, version), time.monotonic()
        hit = self._rules.get(key)
        if hit and hit[0] > now:
            return hit[1]
        request = pb.ModelConfigRequest(name=model, version=version)
        cfg = (await self.call("ModelConfig", request, model, version)).config
        rules = model_rules(cfg)
        self.seen.add(model)
        if len(self._rules) >= 256:  # only served models get here, but versions ("1", "01", ...) are many
            self._rules.clear()
        self._rules[key] = (now + CONFIG_TTL_S, rules)
        return rules

    async def infer(self, model: str, version: str, parsed: Parsed) -> Any:
        if self.large_request_pixels is not None and parsed.decode_pixels > self.large_request_pixels:
            async with large_request_lane(model):
                return await self._infer(model, version, parsed)
        return await self._infer(model, version, parsed)

    async def _infer(self, model: str, version: str, parsed: Parsed) -> Any:
        req = pb.ModelInferRequest(model_name=model, model_version=version, id=parsed.request_id)
        for t in parsed.inputs:
            req.inputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
            req.raw_input_contents.append(t.raw)
        for o in parsed.outputs:
            out = req.outputs.add(name=o.name)
            if o.class_count:
                out.parameters["classification"].int64_param = o.class_count
        resp = await self.call("ModelInfer", req, model, version)
        self.broken.discard(model)
        return resp

    async def probe(self, model: str, version: str = "") -> str | None:
        """None if the model answers a real inference (its own probe request), else why not; at most one
        probe per model every PROBE_TTL_S. (Triton keeps a model whose python stub died READY.)"""
        from serving.server import probe_inputs

        key, now = (model, version), time.monotonic()
        hit = self._probes.get(key)
        if hit and hit[0] > now:
            return hit[1]
        try:
            rules = await self.rules(model, version)
            cfg = await self.call("ModelConfig", pb.ModelConfigRequest(name=model, version=version), model, version)
            inputs = probe_inputs(_dims_to_int(json_format.MessageToDict(cfg.config, preserving_proto_field_name=True)))
            await self.infer(model, version, parse_request({"inputs": inputs}, b"", rules))
            why = None
        except RequestError as e:
            why = str(e)
        if len(self._probes) >= 256:
            self._probes.clear()
        self._probes[key] = (time.monotonic() + PROBE_TTL_S, why)
        return why

    async def close(self) -> None:
        await self.channel.close()


# -------------------------------------------------------------------------------------------- the app


class ErrorBody(BaseModel):
    error: str


_TENSOR = {"type": "object", "required": ["name", "shape", "datatype"], "properties": {
    "name": {"type": "string"}, "shape": {"type": "array", "items": {"type": "integer", "minimum": 1}},
    "datatype": {"type": "string", "enum": [*NUMPY_TYPES, "BF16", "BYTES"]},
    "parameters": {"type": "object", "properties": {"binary_data_size": {"type": "integer", "minimum": 0}}},
    "data": {"type": "array"}}}
_INFER_REQUEST = {"type": "object", "required": ["inputs"], "properties": {
    "id": {"type": "string", "maxLength": MAX_ID},
    "parameters": {"type": "object", "properties": {"binary_data_output": {"type": "boolean"}}},
    "inputs": {"type": "array", "minItems": 1, "items": _TENSOR},
    "outputs": {"type": "array", "items": {"type": "object", "required": ["name"], "properties": {
        "name": {"type": "string"}, "parameters": {"type": "object", "properties": {
            "binary_data": {"type": "boolean"}, "classification": {"type": "integer", "minimum": 0}}}}}}}}
_INFER_OPENAPI = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": _INFER_REQUEST},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary",
                                            "description": f"JSON header ({HEADER_LENGTH} bytes), then the "
                                                           "inputs' binary data in order"}}}},
    "parameters": [{"name": HEADER_LENGTH, "in": "header", "required": False, "schema": {"type": "integer"}}]}
_INFER_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "v2 inference response (JSON, or JSON header + binary outputs)",
          "content": {"application/json": {"schema": {"type": "object"}}}},
    **{code: {"model": ErrorBody, "description": what} for code, what in (
        (400, "invalid request"), (404, "unknown model"), (413, "body over the limit"),
        (415, "unsupported Content-Encoding"),
        (503, "Triton, or the model (loading, restarting), unavailable right now: see Retry-After"))}}


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) from its Content-Length, or once a streamed body passes the limit."""
    length = request.headers.get("content-length")
    if length is not None:
        n = _count(length)
        if n is None:
            raise _bad("Content-Length is not a number")
        if n > limit:
            raise RequestError(413, f"request body of {n} bytes exceeds the {limit}-byte limit")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"request body exceeds the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(triton_grpc: str = DEFAULT_TRITON_GRPC, body_limit: int = DEFAULT_BODY_LIMIT,
               timeout: float = 30.0, *, explorer: bool = True,
               model_repository: str | Path | None = None,
               status: Callable[[], dict[str, Any]] | None = None,
               large_request_pixels: int | None = LARGE_REQUEST_PIXELS) -> FastAPI:
    """The front door; with ``explorer`` also the explorer page at /explorer/, listing the ``<name>_image``
    models of ``model_repository`` (default: ``training.layout.repository_root()``). ``status``: the supervisor's
    (``serving.server.Supervisor.status``), shown at ``GET /status`` and making /v2/health/ready 503 with its reason
    while Triton is down or restarting."""
    state: dict[str, Triton] = {}

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> Any:
        from training import layout

        state["triton"] = Triton(triton_grpc, timeout, layout.repository_root(model_repository), large_request_pixels)
        yield
        await state["triton"].close()

    app = FastAPI(title="attention-zoo front door", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="KServe v2 HTTP inference in front of Triton's gRPC port; validates before forwarding.")

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, e: RequestError) -> JSONResponse:
        return _error(e.status, str(e), e.retry_after)

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, e: HTTPException) -> JSONResponse:
        return _error(e.status_code, str(e.detail))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception) -> JSONResponse:
        return _error(500, f"internal error in the front door: {type(e).__name__}")

    @app.get("/v2/health/live", responses={503: {"model": ErrorBody}})
    async def live() -> Response:
        ok = (await state["triton"].call("ServerLive", pb.ServerLiveRequest())).live
        return Response(status_code=200) if ok else _error(503, "triton is not live")

    if status is not None:
        app.add_api_route("/status", status, methods=["GET"])

    @app.get("/v2/health/ready", responses={503: {"model": ErrorBody}})
    async def ready() -> Response:
        why = await not_ready(state["triton"], status)
        return Response(status_code=200) if why is None else _error(503, why, RETRY_AFTER_S)

    @app.get("/v2")
    async def server_metadata() -> dict:
        md = await state["triton"].call("ServerMetadata", pb.ServerMetadataRequest())
        return {"name": "frontdoor", "version": md.version, "extensions": ["binary_tensor_data", "classification"]}

    async def metadata(model: str, request: Request) -> dict:
        version = request.path_params.get("version", "")
        await state["triton"].rules(model, version)  # name check, 404 for an unknown model
        request_md = pb.ModelMetadataRequest(name=model, version=version)
        md = await state["triton"].call("ModelMetadata", request_md, model, version)

        def tensors(ts: Any) -> list[dict]:
            return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in ts]

        return {"name": md.name, "versions": list(md.versions), "platform": md.platform,
                "inputs": tensors(md.inputs), "outputs": tensors(md.outputs)}

    async def config(model: str, request: Request) -> dict:
        version = request.path_params.get("version", "")
        await state["triton"].rules(model, version)
        cfg = await state["triton"].call("ModelConfig", pb.ModelConfigRequest(name=model, version=version),
                                          model, version)
        return _dims_to_int(json_format.MessageToDict(cfg.config, preserving_proto_field_name=True))

    async def model_ready(model: str, request: Request) -> Response:
        version = request.path_params.get("version", "")
        await state["triton"].rules(model, version)
        triton = state["triton"]
        ok = (await triton.call("ModelReady", pb.ModelReadyRequest(name=model, version=version), model, version)).ready
        why = await triton.probe(model, version) if ok else "not loaded"  # READY is not answering
        if why is None:
            return Response(status_code=200)
        triton.broken.add(model)
        return _error(503, f"model '{model}' is not ready: {why}", RETRY_AFTER_S)

    async def infer(model: str, request: Request) -> Response:
        version, triton = request.path_params.get("version", ""), state["triton"]
        rules = await triton.rules(model, version)
        body = decode_body(await read_body(request, body_limit), request.headers.get("content-encoding"),
                           body_limit)
        header_length = request.headers.get(HEADER_LENGTH.lower())

        def parse() -> Parsed:
            return parse_request(*split_body(body, header_length), rules)

        parsed = await asyncio.to_thread(parse) if len(body) > OFFLOAD_BYTES else parse()
        return infer_response(await triton.infer(model, version, parsed), parsed)

    errors = {404: {"model": ErrorBody}, 503: {"model": ErrorBody}}
    version_param = {"name": "version", "in": "path", "required": True, "schema": {"type": "string"}}
    for prefix, extra in (("/v2/models/{model}", []), ("/v2/models/{model}/versions/{version}", [version_param])):
        for path, handler in (("", metadata), ("/config", config), ("/ready", model_ready)):
            app.add_api_route(prefix + path, handler, methods=["GET"], responses=errors,
                              openapi_extra={"parameters": extra} if extra else None)
        app.add_api_route(prefix + "/infer", infer, methods=["POST"], response_class=Response,
                          responses=_INFER_RESPONSES,
                          openapi_extra={**_INFER_OPENAPI, "parameters": [*extra, *_INFER_OPENAPI["parameters"]]})
    if explorer and EXPLORER_DIR.is_dir():
        _mount_explorer(app, model_repository, body_limit)
    return app


async def not_ready(triton: Triton, status: Callable[[], dict[str, Any]] | None = None) -> str | None:
    """None when Triton is ready and every model that failed to answer answers again (a probe at most every
    second); else why not (the supervisor's state first, where there is one)."""
    st = status() if status is not None else {"state": "serving"}
    if st["state"] != "serving":
        return (f"tritonserver is {st['state']} (restarts {st.get('restarts')}, crashes in a row "
                f"{st.get('crashes_in_a_row')}, last: {st.get('last_reason')})")
    if not (await triton.call("ServerReady", pb.ServerReadyRequest())).ready:
        return "triton is not ready"
    for model in sorted(triton.broken):
        if await triton.probe(model) is not None:
            return f"model '{model}' is not answering (loading or restarting)"
    return None


class _ExplorerFiles(StaticFiles):
    """The explorer's static files with a strict Content-Security-Policy (the page runs only its own script)."""

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers.update(EXPLORER_HEADERS)
        return response


def explorer_index(model_repository: str | Path | None, body_limit: int) -> dict[str, Any]:
    """What the explorer page offers: the repository's ``<name>_image`` models (the page reads each one's config
    over v2, so one that is not loaded shows as such), the bundled samples, the segmentation palette (the
    client's, ``training.tasks.PALETTE``) and the body limit (to refuse a too-large file before sending it)."""
    from training import layout
    from training.tasks import PALETTE

    root = layout.repository_root(model_repository)
    models = sorted(p.parent.name for p in root.glob(f"*{layout.IMAGE_SUFFIX}/{layout.CONFIG_FILE}"))
    samples = sorted(p.name for p in (EXPLORER_DIR / "samples").glob("*")
                     if p.suffix.lower() in EXPLORER_SAMPLE_SUFFIXES)
    return {"models": models, "samples": samples, "palette": PALETTE.tolist(), "body_limit": body_limit}


def _mount_explorer(app: FastAPI, model_repository: str | Path | None, body_limit: int) -> None:
    @app.get("/explorer", include_in_schema=False)
    async def explorer_root() -> Response:
        return RedirectResponse("/explorer/")

    @app.get("/explorer/models.json", include_in_schema=False)
    async def explorer_models() -> JSONResponse:
        index = await asyncio.to_thread(explorer_index, model_repository, body_limit)
        return JSONResponse(index, headers={"Cache-Control": "no-store"})

    # Mounted after the routes above, so /explorer/models.json is the route and everything else a file.
    app.mount("/explorer", _ExplorerFiles(directory=EXPLORER_DIR, html=True), name="explorer")


# ------------------------------------------------------------------------------------------- running


@contextlib.contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                    timeout: float = 15.0) -> Iterator[str]:
    """Run ``app`` on uvicorn in a background thread (tests, benchmarks); yields ``host:port``."""
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                           lifespan="on"))
    thread = threading.Thread(target=server.run, name="frontdoor", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"front door did not start on {host}:{port}")
        time.sleep(0.02)
    try:
        yield f"{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serving.frontdoor", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 to expose it)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--triton-grpc", default=DEFAULT_TRITON_GRPC, metavar="URL", help="Triton's gRPC host:port")
    p.add_argument("--max-body-mib", type=float, default=DEFAULT_BODY_LIMIT / 2**20, help="request body limit")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per call to Triton")
    p.add_argument("--max-connections", type=int, default=64, help="concurrent connections before 503")
    p.add_argument("--model-repository", type=Path, default=None, metavar="DIR",
                   help="where the explorer page finds the <name>_image models to offer (default: model_repository/)")
    p.add_argument("--no-explorer", action="store_true", help="do not serve the explorer page at /explorer/")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    try:
        limit = int(args.max_body_mib * 2**20)
        app = create_app(args.triton_grpc, limit, args.timeout, explorer=not args.no_explorer,
                         model_repository=args.model_repository)
        server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                               access_log=False, limit_concurrency=args.max_connections))
        startup = server.startup

        async def announce(sockets: Any = None) -> None:
            await startup(sockets)
            if server.started:
                print(f"front door on http://{args.host}:{args.port} -> triton grpc {args.triton_grpc} "
                      f"(body limit {limit / 2**20:g} MiB)" + ("" if args.no_explorer else
                      f"; explorer at http://{args.host}:{args.port}/explorer/"), flush=True)

        server.startup = announce  # type: ignore[method-assign]
        # uvicorn shuts down gracefully on SIGTERM/SIGINT, then re-raises the signal: make that a clean exit.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        server.run()
        return 0 if server.started else 1
    except KeyboardInterrupt:
        return 0
    except Exception as e:
        return cli_error(e, args.debug)


if __name__ == "__main__":
    sys.exit(main())
