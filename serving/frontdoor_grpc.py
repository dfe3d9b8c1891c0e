"""The front door's gRPC surface: KServe v2 ``GRPCInferenceService`` for untrusted clients, in front of Triton.

The same checks as the HTTP front door (``serving.validation``, the one validator, behind both surfaces),
applied to the protobuf request before anything is forwarded: every input named by the model, its datatype, rank,
fixed dims, dims >= 1 (a negative or int64-overflowing claim is refused by name, never passed to Triton, whose
python stub dies on it), batch and dynamic-axis bounds, exactly one ``raw_input_contents`` per input (Triton
2.51 ignores extra ones) or typed ``contents`` of the claimed count, finite floats; requests over the message
limit are refused by gRPC itself (also after decompression). Unknown models are NOT_FOUND, a model that exists but
cannot answer now (reloading, its stub restarting) UNAVAILABLE, which clients may retry.

Health, metadata, config, statistics and inference are offered; model control, shared memory, logging and
tracing are not (PERMISSION_DENIED): they stay with the server's owner, on Triton's private socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pbg

from serving.frontdoor import (
    DEFAULT_BODY_LIMIT,
    MAX_ID,
    ModelRules,
    Output,
    Parsed,
    RequestError,
    Tensor,
    Triton,
    binary_raw,
    check_complete,
    check_input,
    check_raw,
    not_ready,
    one_line,
    refused_as_400,
    values_raw,
)

HTTP_TO_GRPC = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND,
                413: grpc.StatusCode.RESOURCE_EXHAUSTED, 415: grpc.StatusCode.INVALID_ARGUMENT,
                503: grpc.StatusCode.UNAVAILABLE, 504: grpc.StatusCode.DEADLINE_EXCEEDED}
# InferTensorContents' field for each datatype (the typed alternative to raw_input_contents).
CONTENTS_FIELD = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
                  "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
                  "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
                  "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents"}


def _bad(message: str) -> RequestError:
    return RequestError(400, message)


def _raw_from_contents(tensor: Any, count: int, where: str) -> bytes:
    field = CONTENTS_FIELD.get(tensor.datatype)
    if field is None:
        raise _bad(f"{where} ({tensor.datatype}): send it in raw_input_contents (no typed contents for it)")
    values = list(getattr(tensor.contents, field))
    if len(values) != count:
        raise _bad(f"{where} ({tensor.datatype}): needs {count} values, contents.{field} holds {len(values)}")
    if tensor.datatype == "BYTES":
        return b"".join(len(v).to_bytes(4, "little") + v for v in values)
    return values_raw(values, tensor.datatype, where)


def parse_infer(request: Any, rules: ModelRules) -> Parsed:
    """Validate a ``ModelInferRequest`` against the model's rules (nothing sized by a claim is allocated before
    the claim is checked against the bytes actually sent)."""
    with refused_as_400():
        return _parse_infer(request, rules)


def _parse_infer(request: Any, rules: ModelRules) -> Parsed:
    m = rules.name
    if len(request.id) > MAX_ID:
        raise _bad(f"model '{m}': 'id' must be a string of at most {MAX_ID} characters")
    if not request.inputs:
        raise _bad(f"model '{m}': no inputs (inputs: {', '.join(rules.inputs)})")
    raws = request.raw_input_contents
    if raws and len(raws) != len(request.inputs):
        raise _bad(f"model '{m}': {len(raws)} raw_input_contents for {len(request.inputs)} input(s); send exactly "
                   "one per input, in the inputs' order")
    tensors: list[Tensor] = []
    for i, t in enumerate(request.inputs):
        where, shape, count = check_input(rules, t.name, t.datatype, list(t.shape), {x.name for x in tensors})
        if any(k.startswith("shared_memory") for k in t.parameters):
            raise _bad(f"{where}: shared memory is not offered here")
        if raws:
            if t.HasField("contents"):
                raise _bad(f"{where}: send either contents or raw_input_contents, not both")
            raw = raws[i]
            raw = binary_raw(memoryview(raw), 0, len(raw), count, t.datatype, f"{where} shape {shape}")
        else:
            raw = _raw_from_contents(t, count, f"{where} shape {shape}")
        check_raw(rules, t.name, t.datatype, shape, raw)
        tensors.append(Tensor(t.name, t.datatype, shape, raw))
    pixels = check_complete(rules, tensors)
    outputs: list[Output] = []
    for o in request.outputs:
        if o.name not in rules.outputs:
            raise _bad(f"model '{m}' has no output {o.name[:80]!r} (outputs: {', '.join(rules.outputs)})")
        if o.name in {x.name for x in outputs}:
            raise _bad(f"model '{m}': output '{o.name}' requested twice")
        if any(k.startswith("shared_memory") for k in o.parameters):
            raise _bad(f"model '{m}': output '{o.name}': shared memory is not offered here")
        k = o.parameters["classification"].int64_param if "classification" in o.parameters else 0
        if not 0 <= k <= 2**31 - 1:
            raise _bad(f"model '{m}': output '{o.name}' classification must be a count >= 0")
        outputs.append(Output(o.name, None, k))
    return Parsed(tensors, outputs, True, request.id, pixels)


class FrontDoorServicer(pbg.GRPCInferenceServiceServicer):
    """``GRPCInferenceService`` with the front door's checks; everything else is refused."""

    def __init__(self, triton_grpc: str, timeout: float = 30.0, repository: Any = None,
                 status: Callable[[], dict[str, Any]] | None = None) -> None:
        self.args, self.status = (triton_grpc, timeout, repository), status
        self._triton: Triton | None = None

    @property
    def triton(self) -> Triton:  # made inside the serving event loop (grpc.aio channels belong to one)
        if self._triton is None:
            self._triton = Triton(*self.args)
        return self._triton

    async def _guard(self, context: Any, work: Any) -> Any:
        try:
            return await work
        except RequestError as e:
            if e.retry_after is not None:
                context.set_trailing_metadata((("retry-after", str(e.retry_after)),))
            await context.abort(HTTP_TO_GRPC.get(e.status, grpc.StatusCode.INTERNAL), one_line(str(e)))

    async def ServerLive(self, request: Any, context: Any) -> Any:
        return await self._guard(context, self.triton.call("ServerLive", pb.ServerLiveRequest()))

    async def ServerReady(self, request: Any, context: Any) -> Any:
        async def ready() -> Any:
            return pb.ServerReadyResponse(ready=await not_ready(self.triton, self.status) is None)

        return await self._guard(context, ready())

    async def ModelReady(self, request: Any, context: Any) -> Any:
        async def ready() -> Any:
            await self.triton.rules(request.name, request.version)
            ok = (await self.triton.call("ModelReady", request, request.name, request.version)).ready
            return pb.ModelReadyResponse(ready=ok and await self.triton.probe(request.name, request.version) is None)

        return await self._guard(context, ready())

    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        async def metadata() -> Any:
            md = await self.triton.call("ServerMetadata", pb.ServerMetadataRequest())
            return pb.ServerMetadataResponse(name="frontdoor", version=md.version,
                                             extensions=["classification"])

        return await self._guard(context, metadata())

    async def _model_call(self, method: str, request: Any, context: Any) -> Any:
        async def call() -> Any:
            await self.triton.rules(request.name, request.version)  # 404 for an unknown model
            return await self.triton.call(method, request, request.name, request.version)

        return await self._guard(context, call())

    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        return await self._model_call("ModelMetadata", request, context)

    async def ModelConfig(self, request: Any, context: Any) -> Any:
        return await self._model_call("ModelConfig", request, context)

    async def ModelStatistics(self, request: Any, context: Any) -> Any:
        if not request.name:
            return await self._guard(context, self.triton.call("ModelStatistics", request))
        return await self._model_call("ModelStatistics", request, context)

    async def ModelInfer(self, request: Any, context: Any) -> Any:
        async def infer() -> Any:
            rules = await self.triton.rules(request.model_name, request.model_version)
            size = sum(map(len, request.raw_input_contents))
            parsed = await asyncio.to_thread(parse_infer, request, rules) if size > 2**20 \
                else parse_infer(request, rules)
            return await self.triton.infer(request.model_name, request.model_version, parsed)

        return await self._guard(context, infer())

    async def ModelStreamInfer(self, request_iterator: Any, context: Any) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "streaming inference is not offered by the front door")


def _refuse(name: str) -> Any:
    async def refused(self: Any, request: Any, context: Any) -> Any:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                            f"{name} is not offered by the front door (model control, shared memory, logging and "
                            "tracing stay with the server's owner)")
    return refused


for _name in ("RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload", "SystemSharedMemoryStatus",
              "SystemSharedMemoryRegister", "SystemSharedMemoryUnregister", "CudaSharedMemoryStatus",
              "CudaSharedMemoryRegister", "CudaSharedMemoryUnregister", "TraceSetting", "LogSettings"):
    setattr(FrontDoorServicer, _name, _refuse(_name))


def grpc_options(body_limit: int) -> list[tuple[str, int]]:
    """The message limit (checked by gRPC itself, also on a compressed message's decompressed size)."""
    return [("grpc.max_receive_message_length", body_limit), ("grpc.max_send_message_length", 2**31 - 1),
            ("grpc.so_reuseport", 0)]


async def serve(host: str, port: int, triton_grpc: str, body_limit: int = DEFAULT_BODY_LIMIT,
                timeout: float = 30.0, repository: Any = None, started: threading.Event | None = None,
                stop: asyncio.Event | None = None, status: Callable[[], dict[str, Any]] | None = None) -> None:
    """Serve until ``stop`` is set (or forever)."""
    server = grpc.aio.server(options=grpc_options(body_limit))
    servicer = FrontDoorServicer(triton_grpc, timeout, repository, status)
    pbg.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    if server.add_insecure_port(f"{host}:{port}") == 0:
        raise RuntimeError(f"front door (gRPC) could not bind {host}:{port}")
    await server.start()
    if started is not None:
        started.set()
    try:
        await (stop.wait() if stop is not None else server.wait_for_termination())
    finally:
        await server.stop(grace=1)


@contextlib.contextmanager
def serve_in_thread(triton_grpc: str, host: str = "127.0.0.1", port: int = 8001,
                    body_limit: int = DEFAULT_BODY_LIMIT, timeout: float = 30.0, repository: Any = None,
                    status: Callable[[], dict[str, Any]] | None = None, start_timeout: float = 15.0) -> Iterator[str]:
    """The gRPC front door on its own event loop in a background thread; yields ``host:port``."""
    loop = asyncio.new_event_loop()
    started, stop, failed = threading.Event(), asyncio.Event(), []

    def run() -> None:
        try:
            loop.run_until_complete(serve(host, port, triton_grpc, body_limit, timeout, repository, started, stop,
                                          status))
        except Exception as e:  # reported to the caller below
            failed.append(e)
            started.set()

    thread = threading.Thread(target=run, name="frontdoor-grpc", daemon=True)
    thread.start()
    if not started.wait(start_timeout) or failed:
        raise RuntimeError(f"front door (gRPC) did not start on {host}:{port}: {failed[0] if failed else 'timeout'}")
    try:
        yield f"{host}:{port}"
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(start_timeout)

