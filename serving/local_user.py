"""What another local user can do to a running stack (`make serve`): run as that user (uid 65534 in
``make reliability`` and the tests), it tries every way in that issue #27 lists, and prints one JSON report.

- **secrets**: any process's command line or environment holding an admin key (``admin-key=``,
  ``ATTNZOO_TRITON_ADMIN_KEY``);
- **the private sockets**: every unix socket of a tritonserver or of Envoy (``/proc/net/unix``), connected to;
- **files**: the python backend's shared-memory regions (in the shared ``/dev/shm`` or, through
  ``/proc/<pid>/root``, the server's private one) and the server's logs, opened for reading;
- **requests** to every port it can reach (the front door's HTTP and gRPC ports, Triton's metrics port): the
  requests that abort tritonserver 2.51 or kill a stub when sent to Triton's own ports (a claimed huge shape, an
  int64-overflowing shape, negative dims, extra raw contents, a 1 GiB gzip bomb over HTTP and over gRPC) and
  an attempt at model control (a load with an uploaded ``model.py``): each answer's status and first line.

Nothing here decides pass or fail: the caller compares the server before and after (same pid, same stubs,
memory) and reads the report. stdlib + grpcio + tritonclient's protobufs (importable by any user).

    python -m serving.local_user --http 127.0.0.1:8000 --grpc 127.0.0.1:8001 --metrics 127.0.0.1:8002 [--model cnn]
"""

from __future__ import annotations

import argparse
import glob
import gzip
import http.client
import json
import os
import re
import socket
import sys
from pathlib import Path
from typing import Any

HUGE_SHAPE = [64, 1, 100000, 100000]
OVERFLOW_SHAPE = [1, 1, 4611686018427387904, 4]
BOMB_BYTES = 2**30


def _first(text: str, n: int = 160) -> str:
    return " ".join(str(text).split())[:n]


def find_secrets() -> list[str]:
    """Processes whose command line or environment (where readable) holds an admin key."""
    found = []
    for d in glob.glob("/proc/[0-9]*"):
        for part in ("cmdline", "environ"):
            try:
                raw = Path(d, part).read_bytes()
            except OSError:
                continue
            if b"admin-key=" in raw or b"ATTNZOO_TRITON_ADMIN_KEY=" in raw:
                found.append(f"{d}/{part}")
    return found


def _tritonserver_pids() -> list[int]:
    pids = []
    for d in glob.glob("/proc/[0-9]*"):
        try:
            if Path(d, "comm").read_text().strip() == "tritonserver":
                pids.append(int(Path(d).name))
        except OSError:
            continue
    return pids


def try_private_sockets() -> list[dict[str, str]]:
    """Connect to every unix socket path that belongs to the stack (listed world-readably in /proc/net/unix)."""
    out, seen = [], set()
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        path = line.split()[-1] if len(line.split()) >= 8 else ""
        if not re.search(r"/attnzoo-(triton|envoy)-", path) or path in seen:  # listener + connections: one path
            continue
        seen.add(path)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            out.append({"socket": path, "result": "CONNECTED"})
        except OSError as e:
            out.append({"socket": path, "result": f"refused: {e.strerror}"})
        finally:
            s.close()
    return out


def try_files() -> list[dict[str, str]]:
    """Read the server's shared-memory regions and logs, in the shared /dev/shm and through /proc/<pid>/root."""
    out = []
    candidates = glob.glob("/dev/shm/attnzoo_*") + glob.glob("/tmp/tritonserver-*.log")
    for pid in _tritonserver_pids():
        root = f"/proc/{pid}/root/dev/shm"
        try:
            candidates += [os.path.join(root, n) for n in os.listdir(root) if n.startswith("attnzoo_")]
        except OSError as e:
            out.append({"file": root, "result": f"refused: {e.strerror}"})
    for path in candidates:
        try:
            with open(path, "rb") as f:
                f.read(16)
            out.append({"file": path, "result": "READ"})
        except OSError as e:
            out.append({"file": path, "result": f"refused: {e.strerror}"})
    return out


def _http(hostport: str, path: str, body: bytes, headers: dict[str, str]) -> str:
    host, port = hostport.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    try:
        conn.request("POST", path, body, headers)
        r = conn.getresponse()
        return f"{r.status} {_first(r.read().decode(errors='replace'))}"
    except OSError as e:
        return f"connection error: {_first(e)}"
    finally:
        conn.close()


def http_requests(url: str, model: str, bombs: bool = True) -> dict[str, str]:
    js = {"Content-Type": "application/json"}
    path = f"/v2/models/{model}/infer"

    def req(shape: list[int]) -> bytes:
        return json.dumps({"inputs": [{"name": "image", "shape": shape, "datatype": "FP32", "data": []}]}).encode()

    out = {
        "huge shape": _http(url, path, req(HUGE_SHAPE), js),
        "int64-overflowing shape": _http(url, path, req(OVERFLOW_SHAPE), js),
        "negative dims": _http(url, path, req([1, 1, -64, 64]), js),
        "model load with an uploaded model.py": _http(
            url, f"/v2/repository/models/{model}/load",
            json.dumps({"parameters": {"config": "{}", "file:1/model.py": "aW1wb3J0IG9z"}}).encode(), js),
    }
    if bombs:
        bomb = gzip.compress(b"\0" * BOMB_BYTES, compresslevel=9)
        out[f"gzip bomb ({len(bomb) // 1000} kB -> 1 GiB)"] = _http(url, path, bomb,
                                                                 {**js, "Content-Encoding": "gzip"})
    return out


def grpc_requests(url: str, model: str, bombs: bool = True) -> dict[str, str]:
    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pbg

    channel = grpc.insecure_channel(url, options=[("grpc.max_send_message_length", 2**31 - 1)])
    stub = pbg.GRPCInferenceServiceStub(channel)

    def infer(shape: list[int], raws: list[bytes], **kw: Any) -> str:
        req = pb.ModelInferRequest(model_name=model)
        req.inputs.add(name="image", datatype="FP32", shape=shape)
        req.raw_input_contents.extend(raws)
        return call(stub.ModelInfer, req, **kw)

    def call(method: Any, req: Any, **kw: Any) -> str:
        try:
            method(req, timeout=120, **kw)
            return "OK (answered)"
        except grpc.RpcError as e:
            return f"{e.code().name} {_first(e.details())}"

    load = pb.RepositoryModelLoadRequest(model_name=model)
    load.parameters["config"].string_param = "{}"
    load.parameters["file:1/model.py"].bytes_param = b"import os\n"
    out = {
        "huge shape": infer(HUGE_SHAPE, [b""]),
        "int64-overflowing shape": infer(OVERFLOW_SHAPE, [b""]),
        "negative dims": infer([1, 1, -64, 64], [b""]),
        "extra raw_input_contents": infer([1, 1, 64, 64], [bytes(4 * 64 * 64), b"extra"]),
        "model load with an uploaded model.py": call(stub.RepositoryModelLoad, load),
    }
    if bombs:
        out["gzip bomb (1 GiB message, gRPC compression)"] = infer([1, 1, 64, 64], [bytes(BOMB_BYTES)],
                                                                   compression=grpc.Compression.Gzip)
    channel.close()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serving.local_user", description=__doc__.split("\n\n")[0])
    p.add_argument("--http", required=True, help="the front door's HTTP host:port")
    p.add_argument("--grpc", required=True, help="the front door's gRPC host:port")
    p.add_argument("--metrics", default=None, help="Triton's metrics host:port (sent the HTTP requests too)")
    p.add_argument("--model", default="cnn")
    p.add_argument("--repeat", type=int, default=1, help="send the requests this many times (the bombs once)")
    a = p.parse_args(argv)
    report: dict[str, Any] = {"uid": os.getuid(), "secrets": find_secrets(), "sockets": try_private_sockets(),
                              "files": try_files(), "requests": []}
    for i in range(a.repeat):
        for name, result in http_requests(a.http, a.model, bombs=i == 0).items():
            report["requests"].append({"port": f"front door HTTP {a.http}", "request": name, "answer": result})
        for name, result in grpc_requests(a.grpc, a.model, bombs=i == 0).items():
            report["requests"].append({"port": f"front door gRPC {a.grpc}", "request": name, "answer": result})
        if a.metrics:
            for name, result in http_requests(a.metrics, a.model, bombs=i == 0).items():
                report["requests"].append({"port": f"Triton metrics {a.metrics}", "request": name, "answer": result})
    json.dump(report, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
