"""One validator (serving/validation.py), four surfaces, one message per kind of bad input.

The same bad inputs go to (a) the client's check before it sends, (b) the HTTP front door, (c) the gRPC front door
and (d) Triton's python backend directly (Triton's own gRPC port, no front door): each surface that sees a kind
answers with the same one-line message. A real tritonserver serves the ``feedback`` model (an image with dynamic
H, W bounded by ``input_bounds``; an optional INT64 ``target`` with an ``input_ranges`` entry and a default), with
the backend file of this working tree, and both front doors run in threads in front of it.

Not every kind reaches every surface, and the table ``KINDS`` says so per kind rather than skipping:
- the client holds numpy arrays: a negative dim or data shorter than the shape cannot be expressed there;
- Triton itself refuses several kinds before the backend sees them (its own message, asserted as Triton's);
- a negative dim is never sent to Triton directly: tritonserver 2.51 hands it to the python stub, which dies
  (the reason the front door checks it, ``serving/frontdoor_grpc.py``).
"""

from __future__ import annotations

import http.client
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from serving.server import TritonServer, free_ports
from serving.validation import InputError, ModelRules, check_arrays, datatype_of
from tests.conftest import stop_in_background
from training import layout

pytestmark = [pytest.mark.server, pytest.mark.filterwarnings("ignore::DeprecationWarning")]
ROOT = Path(__file__).resolve().parent.parent
MODEL = "feedback"
BACKEND = ROOT / "serving" / "backend" / "model.py"

# Where each surface's answer carries the message: the client raises it, the HTTP front door sends
# {"error": message}, gRPC (front door and Triton) puts it in the status details. Triton prefixes nothing to a
# python backend's error, so no surface's answer is rewritten: ``_answer`` is the one place that would strip a
# transport's prefix if one appeared.
CLIENT, HTTP, GRPC, BACKEND_DIRECT = "client", "http front door", "grpc front door", "triton python backend"


# ----------------------------------------------------------------------------------------------- the cases

Wire = list[tuple[str, str, list[int], bytes]]  # (name, datatype, shape, raw bytes) per input, in order


def _img(batch: int = 1, h: int = 64, w: int = 64, fill: float = 0.5) -> np.ndarray:
    return np.full((batch, 1, h, w), fill, np.float32)


def _target(batch: int = 1, value: int = 3) -> np.ndarray:
    return np.full((batch, 1), value, np.int64)


def _nan() -> np.ndarray:
    a = _img()
    a[0, 0, 5, 7] = np.nan
    return a


def _inf() -> np.ndarray:
    a = _img(2)
    a[1, 0, 0, 0], a[0, 0, 3, 3] = np.inf, -np.inf
    return a


# kind: (inputs as arrays (None: the client cannot express it), raw wire override (None: from the arrays),
#        a piece the message must hold, who answers when sent to Triton directly: "backend" (the same message),
#        "triton" (Triton's own refusal, with a piece of it) or None (not sent to Triton directly, see above))
KINDS: dict[str, tuple[dict | None, Wire | None, str, tuple[str, str] | str | None]] = {
    "wrong datatype": ({"image": _img().astype(np.float64)}, None, "datatype 'FP64', the model takes FP32",
                       ("triton", "data-type is 'FP64'")),
    "wrong rank": ({"image": _img()[0]}, None, "rank 3, the model takes rank 4 [batch, 1, ?, ?]",
                   ("triton", "unexpected shape")),
    "wrong fixed dim": ({"image": np.zeros((1, 3, 64, 64), np.float32)}, None, "axis 1 is 3, the model takes 1",
                        ("triton", "unexpected shape")),
    "zero dim": ({"image": _img()[:0]}, None, "every dim must be >= 1",
                 ("triton", "input byte size mismatch")),
    "negative dim": (None, [("image", "FP32", [1, 1, -64, 64], b"")], "every dim must be >= 1", None),
    "unknown input": ({"img": _img()}, None, "has no input 'img' (inputs: image, target)",
                      ("triton", "unexpected inference input 'img'")),
    "missing input": ({"target": _target()}, None, "missing input(s) image (required: image)", "backend"),
    "batch over max": ({"image": _img(65)}, None, "batch 65 exceeds max_batch_size 64",
                       ("triton", "batch-size must be <= 64")),
    "axis outside its bounds": ({"image": _img(1, 200, 64)}, None, "axis 2 is 200, must be in 48..96", "backend"),
    "short data": (None, [("image", "FP32", [1, 1, 64, 64], _img().tobytes()[:-4])],
                   "16380 bytes of data, the shape needs 4096 x 4 = 16384", ("triton", "input byte size mismatch")),
    "NaN": ({"image": _nan()}, None, "1 NaN/Inf value(s) of 4096", "backend"),
    "Inf": ({"image": _inf()}, None, "2 NaN/Inf value(s) of 8192", "backend"),
    "integer outside input_ranges": ({"image": _img(2), "target": np.array([[3], [42]])}, None,
                                     "input 'target' shape [2, 1] (INT64): values must be in -1..9, got 3..42",
                                     "backend"),
    "batch mismatch": ({"image": _img(2), "target": _target(1)}, None,
                       "inputs disagree on the batch size (image 2, target 1)",
                       ("triton", "batch size does not match other inputs")),
}


def _wire(kind: str) -> Wire:
    arrays, wire, _, _ = KINDS[kind]
    return wire if wire is not None else [(n, datatype_of(a), list(a.shape), a.tobytes()) for n, a in arrays.items()]


# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """tritonserver with ``feedback`` alone (its exported graph and config, this tree's backend), and both front
    doors in threads in front of it: {"triton": grpc url, "http": ..., "grpc": ...}."""
    from serving import frontdoor, frontdoor_grpc

    src = layout.repository_root() / MODEL
    if not (src / layout.CONFIG_FILE).is_file() or not (src / "1" / "model.onnx").is_file():
        pytest.skip(f"{src} is not exported: run `make export` first")
    repo = tmp_path_factory.mktemp("repo")
    (repo / MODEL / "1").mkdir(parents=True)
    shutil.copy(src / layout.CONFIG_FILE, repo / MODEL / layout.CONFIG_FILE)
    (repo / MODEL / "1" / "model.onnx").symlink_to(src / "1" / "model.onnx")
    shutil.copy(BACKEND, repo / MODEL / "1" / "model.py")  # the backend under test, not the generated copy
    http_port, grpc_port, metrics_port, door_http, door_grpc = free_ports(5)
    triton = TritonServer(repo, [MODEL], http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                          require_all=True).start()
    try:
        with frontdoor.serve_in_thread(frontdoor.create_app(triton.grpc_url, model_repository=repo),
                                       port=door_http) as http_url, \
                frontdoor_grpc.serve_in_thread(triton.grpc_url, port=door_grpc) as grpc_url:
            yield {"triton": triton.grpc_url, "http": http_url, "grpc": grpc_url, "server": triton}
    finally:
        stop_in_background(triton, "test_validation.py served", clean=True)


# ------------------------------------------------------------------------------------------------ surfaces


def _answer(surface: str, answer: str) -> str:
    """The one place a transport's prefix would be stripped (none carries one today: see the module's top)."""
    assert answer and "\n" not in answer, (surface, answer)
    return answer


def _via_client(served: dict, arrays: dict[str, np.ndarray]) -> str:
    from serving.client import Client, ClientError

    with Client(MODEL, "grpc", served["triton"], retries=0) as c, pytest.raises(ClientError) as e:
        c.infer(arrays)  # validate=True: refused before anything is sent
    return _answer(CLIENT, str(e.value))


def _via_http(url: str, wire: Wire) -> str:
    head = json.dumps({"inputs": [{"name": n, "datatype": d, "shape": s, "parameters": {"binary_data_size": len(r)}}
                                  for n, d, s, r in wire]}).encode()
    host, _, port = url.rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request("POST", f"/v2/models/{MODEL}/infer", head + b"".join(r for *_, r in wire),
                     {"Inference-Header-Content-Length": str(len(head))})
        resp = conn.getresponse()
        status, body = resp.status, resp.read()
    finally:
        conn.close()
    assert status == 400, (status, body[:300])
    return _answer(HTTP, json.loads(body)["error"])


def _via_grpc(url: str, wire: Wire, surface: str) -> str:
    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pbg

    req = pb.ModelInferRequest(model_name=MODEL)
    for n, d, s, r in wire:
        req.inputs.add(name=n, datatype=d, shape=s)
        req.raw_input_contents.append(r)
    with grpc.insecure_channel(url) as channel, pytest.raises(grpc.RpcError) as e:
        pbg.GRPCInferenceServiceStub(channel).ModelInfer(req, timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (surface, e.value.code(), e.value.details())
    return _answer(surface, e.value.details())


# ------------------------------------------------------------------------------------------------- tests


def test_rules_read_alike_from_the_json_and_the_protobuf_config():
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2 as mc

    path = layout.repository_root() / MODEL / layout.CONFIG_FILE
    if not path.is_file():
        pytest.skip(f"{path} is not exported: run `make export` first")
    cfg = text_format.Parse(path.read_text(), mc.ModelConfig())
    rules = ModelRules.from_config(cfg)
    assert rules == ModelRules.from_config(json_format.MessageToDict(cfg, preserving_proto_field_name=True))
    assert rules.inputs["target"].value_range == (-1, 9) and rules.inputs["target"].optional
    assert rules.inputs["image"].bounds == {1: (48, 96), 2: (48, 96)}
    for arrays, _, piece, _ in KINDS.values():  # in-process too: the client's and the backend's path
        if arrays is not None:
            with pytest.raises(InputError, match=re.escape(piece)):
                check_arrays(rules, arrays)
    assert list(check_arrays(rules, {"image": _img(3)})) == ["image"]


def test_every_surface_refuses_each_bad_input_with_the_same_message(served):
    seen: dict[str, dict[str, str]] = {}
    for kind, (arrays, _, piece, direct) in KINDS.items():
        wire = _wire(kind)
        got = {HTTP: _via_http(served["http"], wire), GRPC: _via_grpc(served["grpc"], wire, GRPC)}
        if arrays is not None:
            got[CLIENT] = _via_client(served, arrays)
        if direct is not None:
            answer = _via_grpc(served["triton"], wire, BACKEND_DIRECT)
            if direct == "backend":
                got[BACKEND_DIRECT] = answer
            else:  # Triton's own refusal: the backend never sees this kind
                assert direct[1] in answer and answer != got[HTTP], (kind, answer)
        seen[kind] = got
        message = got[HTTP]
        assert message.startswith(f"model '{MODEL}'") and piece in message, (kind, message)
        assert all(m == message for m in got.values()), (kind, got)
    # Which surfaces each kind reached, as the module's docstring says: the backend sees exactly the kinds that
    # pass Triton's own checks, the client every kind a numpy array can express.
    assert {k for k, g in seen.items() if BACKEND_DIRECT in g} == {
        "missing input", "axis outside its bounds", "NaN", "Inf", "integer outside input_ranges"}
    assert {k for k, g in seen.items() if CLIENT not in g} == {"negative dim", "short data"}
    assert served["server"].health() == {MODEL: None}  # no bad input hurt the model
