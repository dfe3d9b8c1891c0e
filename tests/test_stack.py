"""The stack as `make serve` runs it (``python -m serving.stack``): the front door (HTTP + gRPC) as the only ports,
tritonserver private, supervised. A real subprocess, real tritonclient clients, real SIGKILLs, and another local
user (uid 65534) trying every way in."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench import reliability_stack as rs
from training import layout
from training.images import DEFAULT_MAX_REQUEST_PIXELS, ImagePreprocess, decode, request_pixels

pytestmark = pytest.mark.server
MODEL = "cnn"
MODELS = [MODEL, f"{MODEL}_preprocess", f"{MODEL}{layout.IMAGE_SUFFIX}"]


@pytest.fixture(scope="module")
def stack():
    repo = layout.repository_root()
    if not all((repo / m / layout.CONFIG_FILE).is_file() for m in MODELS):
        pytest.skip(f"{MODELS} are not in {repo}: run `make export` first")
    with rs.running_stack(repo, MODELS, "--backoff", "0.5", "--watchdog", "2") as s:
        yield s


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _jpeg(w: int, h: int) -> bytes:
    yy, xx = np.mgrid[0:h, 0:w]
    img = Image.fromarray(np.stack([(xx // 23) % 255, (yy // 17) % 255, ((xx + yy) // 31) % 255], -1).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_a_large_jpeg_decodes_scaled_to_the_same_picture():
    data = _jpeg(4000, 3000)
    pre = ImagePreprocess(64, 3, 73)
    assert decode(data, 3, min_side=pre.resize_side).size == (500, 375)  # 1/8: still >= 2x the resize side (146)
    full, drafted = pre.eval(decode(data, 3)), pre(data)
    assert np.abs(full - drafted).max() <= 2 / 255  # the resize sees the same picture, within a grey level or two
    assert request_pixels([data, data], min_side=pre.resize_side) == 2 * 500 * 375  # from headers alone


def test_the_stack_exposes_only_the_front_door(stack):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    from export.runners import OnnxRuntimeRunner

    cmdline = Path(f"/proc/{rs.triton_pid(stack)}/cmdline").read_bytes().split(b"\0")
    assert b"--allow-http=false" in cmdline and not any(b"admin-key" in a for a in cmdline)
    assert any(a.startswith(b"--grpc-address=unix:") for a in cmdline)
    ort = OnnxRuntimeRunner(layout.onnx_path(MODEL))
    rng = np.random.default_rng(0)
    with grpcclient.InferenceServerClient(stack.grpc) as g, httpclient.InferenceServerClient(stack.http) as h:
        for batch in (1, 3):
            x = rng.random((batch, 1, 64, 64), dtype=np.float32)
            want = ort.infer({"image": x})["logits"]
            gi, hi = grpcclient.InferInput("image", list(x.shape), "FP32"), httpclient.InferInput(
                "image", list(x.shape), "FP32")
            gi.set_data_from_numpy(x)
            hi.set_data_from_numpy(x, binary_data=True)
            assert np.abs(g.infer(MODEL, [gi]).as_numpy("logits") - want).max() <= 1e-4
            assert np.abs(h.infer(MODEL, [hi]).as_numpy("logits") - want).max() <= 1e-4
        assert g.is_server_ready() and g.is_model_ready(MODEL)
        with pytest.raises(InferenceServerException, match="not offered by the front door"):
            g.load_model(MODEL)
        with pytest.raises(InferenceServerException, match=r"unknown model|not found"):
            g.get_model_config("no_such_model")


@pytest.mark.parametrize("shape, raws, message", [
    ([1, 1, -64, 64], 1, r"every dim must be >= 1"),
    ([1, 1, 4611686018427387904, 4], 1, r"axis 2 is 4611686018427387904, must be in"),
    ([1, 1, 64, 64], 2, r"2 raw_input_contents for 1 input\(s\)"),
])
def test_grpc_refuses_what_would_hurt_triton_by_name(stack, shape, raws, message):
    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pbg

    req = pb.ModelInferRequest(model_name=MODEL)
    req.inputs.add(name="image", datatype="FP32", shape=shape)
    req.raw_input_contents.extend([bytes(4 * 64 * 64)] * raws)
    with grpc.insecure_channel(stack.grpc) as channel, pytest.raises(grpc.RpcError) as e:
        pbg.GRPCInferenceServiceStub(channel).ModelInfer(req, timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert re.search(message, e.value.details()), e.value.details()


def test_images_within_the_request_budget_are_answered_and_above_it_refused_by_name(stack):
    path = f"/v2/models/{MODELS[2]}/infer"
    for data in (_jpeg(6000, 4000), _png(Image.new("RGBA", (6000, DEFAULT_MAX_REQUEST_PIXELS // 6000), "gray"))):
        status, body = rs.post(stack.http, path, *rs.image_request(data))
        assert status == 200, body[:300]
    big = _png(Image.new("L", (4000, 4000)))
    head = (b'{"inputs":[{"name":"image_file","shape":[2,1],"datatype":"BYTES","parameters":{"binary_data_size":%d}}]}'
            % (2 * (len(big) + 4)))
    body = head + 2 * (len(big).to_bytes(4, "little") + big)
    status, answer = rs.post(stack.http, path, body, {"Inference-Header-Content-Length": str(len(head))})
    assert status == 400 and b"per-request budget of 24000000" in answer, answer[:300]


def test_another_local_user_gets_no_key_no_socket_no_file_and_cannot_hurt_triton(stack):
    report = rs.local_user_attack(stack, MODEL)
    if "skipped" in report:
        pytest.skip(report["skipped"])
    # The stack under test is judged: this suite also runs development servers (`python -m serving.server`: loopback
    # ports, an admin key on the command line by design, docs/serving.md) that `make serve` never starts.
    ours = {f"/proc/{pid}/" for pid in rs.stack_pids(stack)}
    assert report["uid"] == rs.NOBODY
    assert not [s for s in report["secrets"] if s.rsplit("/", 1)[0] + "/" in ours], report["secrets"]
    assert report["sockets"] and all(s["result"].startswith("refused") for s in report["sockets"])
    assert not [f for f in report["files"] if f["result"] == "READ"]
    answered = [q for q in report["requests"] if q["answer"].startswith(("OK", "200", "connection error"))]
    assert not answered, answered
    front = [q for q in report["requests"] if q["port"].startswith("front door")]
    assert all(re.match(r"(4\d\d|INVALID_ARGUMENT|PERMISSION_DENIED|RESOURCE_EXHAUSTED) ", q["answer"])
               for q in front), front
    assert report["triton_pid_after"] == report["triton_pid_before"] and report["stubs_same"]
    assert report["rss_after_mb"] - report["rss_before_mb"] < 300  # no gigabyte per bomb
    assert report["ready_after"]


def test_sigkills_never_end_the_stack_and_readiness_tells_the_truth(stack):
    r = rs.sigkill_storm(stack, kills=3, within_s=12, recover_s=60)
    assert r["kills"] == 3 and r["ready_while_down"] == 0 and r["readiness_samples"] > 20
    assert r["stack_running"] and r["serving_again_s"] is not None
    assert os.path.exists(f"/proc/{rs.triton_pid(stack)}")


def _bad_inputs() -> dict[str, tuple[str, str, list[int], bytes]]:
    """(input name, datatype, shape, raw bytes) that every surface must refuse."""
    ok = np.zeros((1, 1, 64, 64), np.float32)
    nan = ok.copy()
    nan[0, 0, 3, 3] = np.nan
    return {
        "wrong datatype": ("image", "FP64", [1, 1, 64, 64], ok.astype(np.float64).tobytes()),
        "wrong rank": ("image", "FP32", [1, 64, 64], ok.tobytes()),
        "negative dim": ("image", "FP32", [1, 1, -64, 64], b""),
        "unknown input": ("img", "FP32", [1, 1, 64, 64], ok.tobytes()),
        "batch over the maximum": ("image", "FP32", [65, 1, 64, 64], np.zeros((65, 1, 64, 64), np.float32).tobytes()),
        "axis outside its range": ("image", "FP32", [1, 1, 200, 64], np.zeros((1, 1, 200, 64), np.float32).tobytes()),
        "fewer bytes than the shape": ("image", "FP32", [1, 1, 64, 64], ok[..., :32].tobytes()),
        "NaN": ("image", "FP32", [1, 1, 64, 64], nan.tobytes()),
    }


def test_http_and_grpc_refuse_the_same_bad_inputs_with_the_same_message(stack):
    """One validator (serving.validation) behind both surfaces (and the client and the backend:
    tests/test_validation.py)."""
    import json

    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pbg

    with grpc.insecure_channel(stack.grpc) as channel:
        stub = pbg.GRPCInferenceServiceStub(channel)
        for case, (name, datatype, shape, raw) in _bad_inputs().items():
            head = json.dumps({"inputs": [{"name": name, "datatype": datatype, "shape": shape,
                                           "parameters": {"binary_data_size": len(raw)}}]}).encode()
            status, body = rs.post(stack.http, f"/v2/models/{MODEL}/infer", head + raw,
                                   {"Inference-Header-Content-Length": str(len(head))})
            req = pb.ModelInferRequest(model_name=MODEL)
            req.inputs.add(name=name, datatype=datatype, shape=shape)
            req.raw_input_contents.append(raw)
            with pytest.raises(grpc.RpcError) as e:
                stub.ModelInfer(req, timeout=30)
            assert status == 400 and e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, case
            assert json.loads(body)["error"] == e.value.details(), case
