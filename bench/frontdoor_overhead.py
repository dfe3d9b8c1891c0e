"""The front door's added latency: the same request sent straight to Triton (HTTP, and gRPC) and through the front
door (``serving/frontdoor.py``), interleaved one by one on kept-alive connections (``bench.served`` writes it into
reports/bench.md; tests/test_frontdoor.py checks the numbers are sane)."""

from __future__ import annotations

import http.client
import json
import time
from typing import Any

import numpy as np

from export.timing import percentiles
from serving.frontdoor import HEADER_LENGTH, NUMPY_TYPES
from serving.server import http_json, probe_inputs


def _hostport(url: str) -> tuple[str, int]:
    host, _, port = url.removeprefix("http://").rstrip("/").rpartition(":")
    return host, int(port)


def _post(conn: http.client.HTTPConnection, path: str, body: bytes, headers: dict[str, str]) -> float:
    t0 = time.perf_counter()
    conn.request("POST", path, body, headers)
    resp = conn.getresponse()
    resp.read()
    dt = (time.perf_counter() - t0) * 1e3
    if resp.status != 200:
        raise RuntimeError(f"POST {conn.host}:{conn.port}{path} answered {resp.status}")
    return dt


def measure_overhead(direct_http: str, frontdoor_http: str, model: str, n: int = 200, *,
                     binary: bool = False, warmup: int = 10, direct_grpc: str | None = None) -> dict[str, Any]:
    """Latency of the same request sent straight to Triton's HTTP port, through the front door, and (with
    ``direct_grpc``) straight to Triton's gRPC port, interleaved one by one on kept-alive connections. The
    request is the model's own probe (zeros at the warm-up dims, batch 1). Returns {"direct": {p50, p95, p99,
    mean}, "frontdoor": {...}, "grpc": {...}, ...} in ms."""
    code, cfg = http_json("GET", f"http://{direct_http.removeprefix('http://')}/v2/models/{model}/config")
    if code != 200:
        raise RuntimeError(f"model '{model}': config not available from {direct_http} ({code})")
    inputs = probe_inputs(cfg)
    headers = {"Content-Type": "application/json"}
    if binary:
        tails = []
        for i in inputs:
            tails.append(np.asarray(i.pop("data"), dtype=NUMPY_TYPES[i["datatype"]]).tobytes())
            i["parameters"] = {"binary_data_size": len(tails[-1])}
        head = json.dumps({"inputs": inputs, "parameters": {"binary_data_output": True}}).encode()
        body, headers = b"".join([head, *tails]), {"Content-Type": "application/octet-stream",
                                                   HEADER_LENGTH: str(len(head))}
    else:
        body = json.dumps({"inputs": inputs}).encode()
    path = f"/v2/models/{model}/infer"
    conns = {k: http.client.HTTPConnection(*_hostport(u), timeout=30)
             for k, u in (("direct", direct_http), ("frontdoor", frontdoor_http))}
    samples: dict[str, list[float]] = {k: [] for k in (*conns, *(("grpc",) if direct_grpc else ()))}
    grpc_call = _grpc_caller(direct_grpc, model, cfg) if direct_grpc else None
    try:
        for i in range(warmup + n):
            for k, conn in conns.items():
                dt = _post(conn, path, body, headers)
                if i >= warmup:
                    samples[k].append(dt)
            if grpc_call is not None:
                dt = grpc_call()
                if i >= warmup:
                    samples["grpc"].append(dt)
    finally:
        for conn in conns.values():
            conn.close()
    out: dict[str, Any] = {"model": model, "n": n, "binary": binary, "request_bytes": len(body)}
    out.update({k: percentiles(v) for k, v in samples.items()})
    out["overhead_p50_ms"] = out["frontdoor"]["p50"] - out["direct"]["p50"]
    return out


def _grpc_caller(url: str, model: str, cfg: dict) -> Any:
    """A timed call (ms) of the model's probe request over Triton's gRPC port."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    inputs = []
    for i in probe_inputs(cfg):
        arr = np.asarray(i["data"], dtype=NUMPY_TYPES[i["datatype"]]).reshape(i["shape"])
        t = grpcclient.InferInput(i["name"], list(arr.shape), i["datatype"])
        t.set_data_from_numpy(arr)
        inputs.append(t)

    def call() -> float:
        t0 = time.perf_counter()
        client.infer(model, inputs)
        return (time.perf_counter() - t0) * 1e3

    return call


def format_overhead(r: dict[str, Any]) -> str:
    lines = [f"{r['model']} ({'binary' if r['binary'] else 'JSON'}, {r['request_bytes']} B, n={r['n']}):"
             f"   p50     p95     p99 (ms)"]
    for k, label in (("grpc", "triton grpc direct"), ("direct", "triton http direct"), ("frontdoor", "via front door")):
        if k not in r:
            continue
        p = r[k]
        lines.append(f"  {label:<20} {p['p50']:7.3f} {p['p95']:7.3f} {p['p99']:7.3f}")
    return "\n".join(lines)
