"""Serving against a REAL tritonserver (pip's nvidia-pytriton), in temp repositories.

Always runs (no trained artifacts needed): config generation + protobuf validation, the server's lifecycle,
an untrained ``cnn`` exported here and the pass-through floor model over gRPC and HTTP (parity with torch,
concurrency, dynamic batching), every reliability case, load errors, a stub crash, a 5,000-request load
test and the CLIs. With trained checkpoints and exported graphs (``make export``), every registered model is
also checked for wire == ``training.load_trained(name)`` on real test images.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from export.compare import compare, spec_tolerance
from export.runners import OnnxRuntimeRunner, TorchRunner
from serving import repository as rep
from serving.server import TritonServer, free_ports, port_free, probe_inputs
from tests.conftest import stop_in_background
from training import layout

ROOT = Path(__file__).resolve().parent.parent
PROTOCOLS = ("grpc", "http")

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _real_images(n: int, side: int = 64) -> tuple[np.ndarray, np.ndarray]:
    from training.data import test_images

    images, labels = test_images(n, canvas=side)
    return np.ascontiguousarray(images, dtype=np.float32), labels


def _torch_outputs(model: torch.nn.Module, x: np.ndarray, spec) -> dict[str, np.ndarray]:
    return TorchRunner.for_spec(spec, model).infer({spec.inputs[0].name: x})


def _assert_parity(got: dict[str, np.ndarray], ref: dict[str, np.ndarray], spec, where: str) -> None:
    assert set(got) == set(ref), where
    c = compare(ref, got, spec.outputs, spec_tolerance(spec), where=where)
    assert c.ok, c.failures


def _client(server: TritonServer, model: str, protocol: str):
    from serving.client import Client

    return Client(model, protocol, server.grpc_url if protocol == "grpc" else server.http_url)


def _start(repo: Path, models=None, **kw) -> TritonServer:
    http, grpc, metrics = free_ports(3)  # never collide with a `make serve` on 8000-8002
    return TritonServer(repo, models, http_port=http, grpc_port=grpc, metrics_port=metrics, **kw).start()


# ------------------------------------------------------------------------------------------ configs


@pytest.mark.parametrize("target", rep.TARGETS)
def test_every_spec_config_validates_with_triton_protobuf(target):
    from tritonclient.grpc import model_config_pb2 as mc

    from training.registry import list_models

    for name, spec, d in ((n, s, d) for n in [*list_models(), rep.FLOOR_MODEL] for s in [rep.spec_for(n)]
                          for d in rep.deployables(s)):
        if d.graph is None:  # a composed model's ensemble / BLS model: its tensors are the spec's
            cfg = rep.validate_config(rep.config_text(rep.composition_config(spec, target)), d, source=name)
            assert cfg.name == name and [o.name for o in cfg.output] == list(spec.output_names)
            continue
        text = rep.config_text(rep.graph_config(spec, d.graph, target))
        cfg = rep.validate_config(text, d, source=d.triton_name)
        assert cfg.name == d.triton_name and cfg.max_batch_size == spec.serving.max_batch_size
        assert [i.name for i in cfg.input] == [t.name for t in d.inputs]
        assert [list(i.dims) for i in cfg.input] == [list(t.shape) for t in d.inputs]
        assert [o.name for o in cfg.output] == [t.name for t in d.outputs]
        assert [list(o.dims) for o in cfg.output] == [list(t.shape) for t in d.outputs]
        assert list(cfg.dynamic_batching.preferred_batch_size) == list(spec.serving.preferred_batch_sizes)
        assert cfg.dynamic_batching.max_queue_delay_microseconds == spec.serving.max_queue_delay_us
        kind = mc.ModelInstanceGroup.KIND_CPU if target == "cpu" else mc.ModelInstanceGroup.KIND_GPU
        assert [(g.kind, g.count) for g in cfg.instance_group] == [(kind, spec.serving.instance_count)]
        assert cfg.version_policy.latest.num_versions == 1
        assert cfg.model_warmup[0].batch_size == 1
        assert (cfg.backend, cfg.platform) == (("python", "") if target == "cpu" else ("", "onnxruntime_onnx"))
        kinds = json.loads(cfg.parameters["output_kinds"].string_value)
        assert kinds == {t.name: t.kind for t in d.outputs}
        bounds = json.loads(cfg.parameters["input_bounds"].string_value)
        assert bounds == {t.name: {str(i): [x.min, x.max] for i, x in t.dynamic.items()}
                          for t in d.inputs if t.dynamic}
        # Only the python backend fills in defaults; native backends get every input from the request.
        assert [i.optional for i in cfg.input] == [t.optional and target == "cpu" for t in d.inputs]
        defaults = json.loads(cfg.parameters["input_defaults"].string_value)
        assert defaults == {t.name: t.default for t in d.inputs if t.optional}
        off = rep.graph_config(spec, d.graph, target, dynamic_batching=False)
        assert not off.HasField("dynamic_batching")


def test_validate_config_rejects_mismatches():
    spec = rep.floor_spec()
    floor = rep.deployables(spec)[0]
    good = rep.config_text(rep.model_config(spec))
    with pytest.raises(rep.RepositoryError, match="not a valid Triton model config"):
        rep.validate_config(good + "\nno_such_field: 3\n", floor, source="x/config.pbtxt")
    with pytest.raises(rep.RepositoryError, match="inputs"):
        rep.validate_config(good.replace("dims: -1", "dims: 64", 1), floor)
    with pytest.raises(rep.RepositoryError, match="preferred batch size 32"):
        rep.validate_config(good.replace("max_batch_size: 64", "max_batch_size: 16"), floor)
    with pytest.raises(rep.RepositoryError, match="does not match 'cnn'"):
        rep.validate_config(good, rep.deployables(rep.spec_for("cnn"))[0])


def test_write_repository_only_adds_next_to_exported_graphs(tmp_path):

    with pytest.raises(rep.RepositoryError, match=r"missing .*cnn/1/model\.onnx"):
        rep.write_repository(["cnn"], "cpu", tmp_path)
    # A stand-in graph for cnn (the generator never reads it) must come out byte-identical.
    onnx_file = layout.onnx_path("cnn", tmp_path)
    rep.write_floor_onnx(onnx_file)
    digest = hashlib.sha256(onnx_file.read_bytes()).hexdigest()
    written = rep.write_repository(None, "cpu", tmp_path)  # default: every exported model + the floor
    assert hashlib.sha256(onnx_file.read_bytes()).hexdigest() == digest
    assert {p.relative_to(tmp_path).as_posix() for p in written} == {
        "cnn/config.pbtxt", "cnn/1/model.py", "passthrough/config.pbtxt", "passthrough/1/model.py",
        # raw image files in: the preprocessing model and the ensemble with the class labels
        "cnn_preprocess/config.pbtxt", "cnn_preprocess/1/model.py", "cnn_image/config.pbtxt", "cnn_image/labels.txt",
        "attnzoo.json"}  # the stamp: target and selection, read by the server
    assert rep.read_stamp(tmp_path)["target"] == "cpu"
    assert (tmp_path / "cnn/1/model.py").read_bytes() == rep.BACKEND_MODEL_PY.read_bytes()
    assert sorted(rep.check_repository(tmp_path)) == ["cnn", "cnn_image", "cnn_preprocess", "passthrough"]
    # The floor graph is an Identity with the image input's dynamic signature.
    floor = OnnxRuntimeRunner(layout.onnx_path(rep.FLOOR_MODEL, tmp_path))
    x = np.random.rand(3, 1, 40, 56).astype(np.float32)
    np.testing.assert_array_equal(floor.infer({"image": x})["output"], x)


def _engine_sidecar(plan: Path, flavour: str, aot: bool) -> None:
    from export.tensorrt import EngineInfo, metadata_path

    info = EngineInfo(
        model="cnn", plan=str(plan), precision="fp32", flavour=flavour, trt_version="10.7.0",
        compute_capabilities=["9.0"], aot=aot, triton_loadable=flavour == "tensorrt", profile={},
        inputs=[], outputs=[], onnx="model.onnx", onnx_sha256="", built_at="", build_seconds=0.0,
        plan_bytes=plan.stat().st_size, plan_sha256="",
    )
    metadata_path(plan).write_text(info.to_json())


def test_gpu_target_uses_native_backends_and_engines(tmp_path):
    rep.write_floor_onnx(layout.onnx_path("cnn", tmp_path))
    plan = tmp_path / "cnn/1/model.plan"
    plan.write_bytes(b"engine bytes")
    _engine_sidecar(plan, "tensorrt", aot=False)
    rep.write_repository(["cnn"], "gpu", tmp_path)
    onnx_cfg = rep.parse_config((tmp_path / "cnn/config.pbtxt").read_text())
    assert (onnx_cfg.platform, onnx_cfg.default_model_filename) == ("onnxruntime_onnx", "model.onnx")
    trt_cfg = rep.parse_config((tmp_path / "cnn_trt/config.pbtxt").read_text())
    assert (trt_cfg.name, trt_cfg.platform) == ("cnn_trt", "tensorrt_plan")
    assert trt_cfg.default_model_filename == "model.plan"
    assert (tmp_path / "cnn_trt/1/model.plan").read_bytes() == b"engine bytes"
    assert sorted(rep.check_repository(tmp_path)) == ["cnn", "cnn_image", "cnn_preprocess", "cnn_trt", "passthrough"]


@pytest.mark.parametrize("sidecar", ["tensorrt_rtx", None])
def test_gpu_target_skips_engines_triton_cannot_load(tmp_path, capsys, sidecar):
    """A TensorRT-RTX ahead-of-time engine, or a plan with no metadata, is never written as <name>_trt."""
    rep.write_floor_onnx(layout.onnx_path("cnn", tmp_path))
    plan = tmp_path / "cnn/1/model.plan"
    plan.write_bytes(b"engine bytes")
    if sidecar:
        _engine_sidecar(plan, sidecar, aot=True)
    rep.write_repository(["cnn"], "gpu", tmp_path)
    assert sorted(rep.check_repository(tmp_path)) == ["cnn", "cnn_image", "cnn_preprocess", "passthrough"]
    err = capsys.readouterr().err
    assert f"{plan} not served as cnn_trt" in err
    assert ("cannot load" if sidecar else "no model.plan.json") in err


def test_repository_cli(tmp_path):
    rep.write_floor_onnx(layout.onnx_path("cnn", tmp_path))
    assert rep.main(["--repo", str(tmp_path), "cnn"]) == 0
    assert rep.main(["--repo", str(tmp_path), "--check"]) == 0
    assert rep.main(["--repo", str(tmp_path), "nonlocal_dot"]) == 1  # not exported: one-line error


# --------------------------------------------------------------- a real server, untrained cnn + floor


@pytest.fixture(scope="module")
def untrained(untrained_repo):
    """A temp repository with an untrained ``cnn`` exported here, and the pass-through floor model (the session's,
    tests/conftest.py)."""
    return untrained_repo


# Every model of the untrained repository, ready (cnn_image / cnn_preprocess: raw image files in, written for
# every image model).
HEALTHY = {m: None for m in ("cnn", "cnn_image", "cnn_preprocess", "passthrough")}


@pytest.fixture(scope="module")
def server(untrained_server):
    """The session's server on the untrained repository (tests/conftest.py; tests/test_frontdoor.py shares it): its
    stop at the session's end asserts a clean exit and freed ports. The tests below that kill, crash or pin a server
    start their own."""
    return untrained_server


@pytest.mark.server
def test_server_ready_every_model_answers_a_probe(server):
    assert server.load_errors == {}
    assert server.health() == HEALTHY
    import urllib.request

    from serving.server import http_json

    with urllib.request.urlopen(server.metrics_url, timeout=10) as r:
        assert b"nv_inference_request_success" in r.read()
    code, meta = http_json("GET", f"http://{server.http_url}/v2")
    assert code == 200 and meta["version"].startswith("2.51")


@pytest.mark.server
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_wire_equals_torch_untrained_cnn(server, untrained, protocol):
    from training.registry import get_spec

    spec, model = get_spec("cnn"), untrained[1]
    c = _client(server, "cnn", protocol)
    images, _ = _real_images(spec.serving.max_batch_size)
    for n in (1, spec.serving.max_batch_size):
        x = images[:n]
        _assert_parity(c.infer(x), _torch_outputs(model, x, spec), spec, f"{protocol} batch {n}")
    # Another input size goes through the dynamic H, W of the served graph.
    x = _real_images(4, side=80)[0]
    _assert_parity(c.infer(x), _torch_outputs(model, x, spec), spec, f"{protocol} 80px")


@pytest.mark.server
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_concurrent_requests_match_their_inputs(server, untrained, protocol):
    from training.registry import get_spec

    spec, model = get_spec("cnn"), untrained[1]
    images, _ = _real_images(48)
    batches = [images[i:i + 1 + i % 3] for i in range(40)]  # mixed batch sizes 1..3
    ref = [_torch_outputs(model, b, spec) for b in batches]
    got = _client(server, "cnn", protocol).infer_many(batches, concurrency=16)
    for i, (g, r) in enumerate(zip(got, ref, strict=True)):
        _assert_parity(g, r, spec, f"{protocol} request {i}")


@pytest.mark.server
def test_dynamic_batching_merges_concurrent_requests(server):
    import tritonclient.grpc as grpcclient

    def counts() -> tuple[int, int]:
        s = grpcclient.InferenceServerClient(server.grpc_url).get_inference_statistics("cnn", as_json=True)
        st = s["model_stats"][0]
        return int(st.get("inference_count", 0)), int(st.get("execution_count", 0))

    inf0, exe0 = counts()
    images, _ = _real_images(64)
    _client(server, "cnn", "grpc").infer_many([images[i:i + 1] for i in range(64)], concurrency=16)
    inf1, exe1 = counts()
    assert inf1 - inf0 == 64
    assert exe1 - exe0 < 64, "every request ran alone: the dynamic batcher merged nothing"


# The reliability cases: (inputs, a piece of the expected one-line error). Sent with client checks off.
def _bad_inputs() -> dict[str, tuple[dict[str, np.ndarray], str]]:
    ok = _real_images(1)[0]
    nan = ok.copy()
    nan[0, 0, 5, 5] = np.nan
    inf = ok.copy()
    inf[0, 0, 1, 2] = np.inf
    return {
        "wrong_shape": ({"image": np.zeros((1, 3, 64, 64), np.float32)}, "unexpected shape for input 'image'"),
        "wrong_rank": ({"image": ok[0]}, "unexpected shape for input 'image'"),
        "wrong_dtype": ({"image": ok.astype(np.float64)}, "data-type is 'FP64', but model 'cnn' expects 'FP32'"),
        "batch_over_max": ({"image": np.zeros((65, 1, 64, 64), np.float32)}, "batch-size must be <= 64"),
        "unknown_input": ({"img": ok}, "unexpected inference input 'img'"),
        "extra_input": ({"image": ok, "mask": ok}, "expected 1 inputs but got 2"),
        "nan": ({"image": nan}, "input 'image' shape [1, 1, 64, 64] (FP32): 1 NaN/Inf value(s)"),
        "inf": ({"image": inf}, "input 'image' shape [1, 1, 64, 64] (FP32): 1 NaN/Inf value(s)"),
        "empty_batch": ({"image": np.zeros((0, 1, 64, 64), np.float32)}, "'image'"),
        "tiny_image": ({"image": np.zeros((1, 1, 1, 1), np.float32)}, "must be in 48..96"),
        "huge_image": ({"image": np.zeros((1, 1, 4096, 4096), np.float32)}, "must be in 48..96"),
    }


@pytest.mark.server
@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("case", list(_bad_inputs()))
def test_bad_request_gets_its_own_error_and_server_stays_ready(server, protocol, case):
    from serving.client import InferenceError

    inputs, expected = _bad_inputs()[case]
    c = _client(server, "cnn", protocol)
    with pytest.raises(InferenceError, match="model 'cnn'") as err:
        c.infer(inputs, validate=False)
    assert expected in str(err.value)
    assert "\n" not in str(err.value).strip() or case == "wrong_shape"  # Triton's shape note spans a sentence
    assert str(err.value.status) in ("400", "StatusCode.INVALID_ARGUMENT")
    assert server.health() == HEALTHY


@pytest.mark.server
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_bad_request_in_a_batch_does_not_fail_the_others(server, untrained, protocol):
    from serving.client import InferenceError
    from training.registry import get_spec

    spec = get_spec("cnn")
    images, _ = _real_images(16)
    batches = [images[i:i + 1].copy() for i in range(16)]
    for i in (3, 11):
        batches[i][0, 0, 0, 0] = np.nan
    # validate=False: the client refuses NaN itself (serving.validation); this is about the server's batches
    got = _client(server, "cnn", protocol).infer_many(batches, concurrency=16, return_errors=True, validate=False)
    for i, g in enumerate(got):
        if i in (3, 11):
            assert isinstance(g, InferenceError) and "NaN/Inf" in str(g)
        else:
            _assert_parity(g, _torch_outputs(untrained[1], batches[i], spec), spec, f"request {i}")


@pytest.mark.server
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_client_side_errors_are_one_line(server, protocol):
    from serving.client import Client, ClientError

    c = _client(server, "cnn", protocol)
    ok = _real_images(1)[0]
    cases = {
        "datatype 'FP64', the model takes FP32": ok.astype(np.float64),
        "shape [1, 3, 64, 64]: axis 1 is 3, the model takes 1": np.zeros((1, 3, 64, 64), np.float32),
        "batch 65 exceeds max_batch_size 64": np.zeros((65, 1, 64, 64), np.float32),
        "has no input 'img'": {"img": ok},
    }
    for expected, x in cases.items():
        with pytest.raises(ClientError, match=expected.replace("[", r"\[").replace("?", r"\?")):
            c.infer(x)
    with pytest.raises(ClientError, match=r"model 'nope' is not served \(or not ready\)"):
        _client(server, "nope", protocol)  # the repository index is an admin API: no key, no list
    from serving import admin

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(admin.KEY_ENV, server.admin_key)
        with pytest.raises(ClientError, match=f"unknown model 'nope'; served models: {', '.join(sorted(HEALTHY))}"):
            _client(server, "nope", protocol)
    port = free_ports(1)[0]
    with pytest.raises(ClientError, match=f"not reachable at 127.0.0.1:{port}"):
        Client("cnn", protocol, f"127.0.0.1:{port}", timeout=2, retries=0)


@pytest.mark.server
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_load_test_5000_requests_no_errors_every_response_matched(server, protocol):
    """5,000 requests at concurrency 16 on the floor model: zero errors, each output is its own input."""
    n = 5000
    base = np.random.default_rng(0).random((1, 1, 48, 48), dtype=np.float32)  # the smallest size allowed
    batches = [base + np.float32(i) for i in range(n)]  # each request's payload names its index
    t0 = time.perf_counter()
    got = _client(server, rep.FLOOR_MODEL, protocol).infer_many(batches, concurrency=16, return_errors=True)
    elapsed = time.perf_counter() - t0
    errors = [g for g in got if isinstance(g, Exception)]
    assert not errors, f"{len(errors)} errors, first: {errors[0]}"
    for i, g in enumerate(got):
        np.testing.assert_array_equal(g["output"], batches[i], err_msg=f"response {i} is not request {i}'s")
    print(f"{protocol}: 5000 requests, concurrency 16: {elapsed:.1f} s ({n / elapsed:.0f} req/s)")
    assert server.health() == HEALTHY


def _stub_pids(server: TritonServer, model: str) -> list[int]:
    return server.stub_pids(model)


def _not_private(srv: TritonServer) -> dict[str, str]:
    """{path: mode} of every shared-memory region of ``srv`` and every file it wrote that another user could
    read. A region is private where the server has a 0700 /dev/shm of its own (its mount namespace's)."""
    shm = Path(f"/proc/{srv.proc.pid}/root/dev/shm")
    own_shm = shm.stat().st_dev != Path("/dev/shm").stat().st_dev and shm.stat().st_mode & 0o077 == 0
    written = [*srv.repository.rglob("__pycache__"), *srv.repository.rglob("*.pyc")]  # the stubs' bytecode
    paths = [srv.log_path, *written, *([] if own_shm else srv.shm_regions())]
    return {str(p): oct(p.stat().st_mode & 0o777) for p in paths if p.stat().st_mode & 0o077}


def _get(url: str, path: str, body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    import http.client

    host, _, port = url.rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("POST" if body is not None else "GET", path, body,
                     {"Content-Type": "application/json"} if body is not None else {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


@pytest.mark.server
def test_server_files_and_shared_memory_are_private(server):
    """The python backend's shared memory holds every request's tensors: owner only, as is the log."""
    regions = server.shm_regions()
    assert len(regions) >= len(server.models) - 1, regions  # one per python stub (an ensemble has none)
    assert not list(Path("/dev/shm").glob(f"{server.shm_prefix}*"))  # not in the /dev/shm others see
    assert oct(regions[0].parent.stat().st_mode & 0o777) == "0o700"
    assert _not_private(server) == {}


@pytest.mark.server
def test_dead_stub_is_caught_by_the_probe_and_a_reload_heals_it(untrained, tmp_path):
    """A stub that dies leaves its model READY while requests fail: only a real inference tells. The front door
    says so (not ready, 503 + Retry-After) until the reload brings it back."""
    from serving.frontdoor import PROBE_TTL_S, create_app, serve_in_thread

    log = tmp_path / "tritonserver.log"
    log.write_text("a log left by an earlier run\n")
    log.chmod(0o644)
    # Its own server: a crashed stub makes shutdown wait the exit timeout (and exit 1, log kept).
    srv = _start(untrained[0], log_path=log)
    try:
        with serve_in_thread(create_app(srv.grpc_url, explorer=False), port=free_ports(1)[0]) as url:
            assert _not_private(srv) == {}  # a reused --log path too
            assert _get(url, "/v2/models/cnn/ready")[0] == 200
            pids = _stub_pids(srv, "cnn")
            assert len(pids) == 1, pids
            os.kill(pids[0], signal.SIGKILL)
            time.sleep(PROBE_TTL_S + 0.1)  # the front door's last probe (it said ready) has expired
            assert srv.model_states()["cnn"]["state"] == "READY"  # Triton's flag does not notice
            for path, body in (("/v2/models/cnn/ready", None), ("/v2/health/ready", None),
                               ("/v2/models/cnn/infer", json.dumps({"inputs": probe_inputs(srv.model_config("cnn"))}))):
                status, headers, answer = _get(url, path, body and body.encode())
                assert status == 503 and headers.get("retry-after") == "1", (path, status, answer)
            health = srv.health()
            assert health["passthrough"] is None
            assert "not healthy" in health["cnn"], health
            assert set(srv.heal()) == {"cnn"}  # unload + load of just that model
            assert srv.health() == HEALTHY
            assert _not_private(srv) == {}  # the new stub's region too
            deadline = time.monotonic() + 10  # the front door probes a model at most once a second
            while _get(url, "/v2/models/cnn/ready")[0] != 200 or _get(url, "/v2/health/ready")[0] != 200:
                assert time.monotonic() < deadline, "the front door still says cnn is not ready"
                time.sleep(0.2)
    finally:
        t0 = time.monotonic()
        srv.stop()
        assert time.monotonic() - t0 < 15  # --exit-timeout-secs=5 bounds the wait for the dead instance


@pytest.mark.server
def test_server_and_its_stubs_run_on_the_cpus_asked_for(untrained):
    """The benchmark keeps perf_analyzer off the server's cores: the pinning must reach the python stubs."""
    cpus = [max(os.sched_getaffinity(0))]
    srv = _start(untrained[0], cpus=cpus)
    try:
        pids = _stub_pids(srv, "cnn")
        assert len(pids) == 1, pids
        for pid in (srv.proc.pid, *pids):
            assert os.sched_getaffinity(pid) == set(cpus)
        assert srv.health() == HEALTHY
    finally:
        srv.stop()


# ------------------------------------------------------------------------------------ load errors


@pytest.mark.server
def test_missing_or_corrupt_graph_is_a_load_error_naming_the_file(untrained, tmp_path):
    src = untrained[0]
    repo = tmp_path / "repo"
    shutil.copytree(src, repo)
    for name in ("cnn_missing", "cnn_corrupt"):
        shutil.copytree(src / "cnn", repo / name)
        cfg = repo / name / "config.pbtxt"
        cfg.write_text(cfg.read_text().replace('name: "cnn"', f'name: "{name}"'))
    (repo / "cnn_missing/1/model.onnx").unlink()
    (repo / "cnn_corrupt/1/model.onnx").write_bytes(b"\x08\x07 this is not an ONNX graph" * 8)

    srv = _start(repo)
    try:
        assert set(srv.load_errors) == {"cnn_missing", "cnn_corrupt"}
        assert f"missing ONNX file {repo / 'cnn_missing/1/model.onnx'}" in srv.load_errors["cnn_missing"]
        assert f"cannot load ONNX file {repo / 'cnn_corrupt/1/model.onnx'}" in srv.load_errors["cnn_corrupt"]
        health = srv.health()
        assert health["cnn"] is None and health["passthrough"] is None
        from serving import admin
        from serving.client import ClientError

        with pytest.MonkeyPatch.context() as mp:  # the operator, who has the admin key, is told why
            mp.setenv(admin.KEY_ENV, srv.admin_key)
            with pytest.raises(ClientError, match=r"model 'cnn_missing' is not ready .*missing ONNX file"):
                _client(srv, "cnn_missing", "grpc")
        # The fixed file loads on request, with the others still served.
        shutil.copyfile(src / "cnn/1/model.onnx", repo / "cnn_missing/1/model.onnx")
        srv.load("cnn_missing")
        assert srv.health()["cnn_missing"] is None
    finally:
        assert srv.stop() == 0
    with pytest.raises(Exception, match=r"failed to load: .*cnn_corrupt/1/model\.onnx"):
        _start(repo, ["cnn", "cnn_corrupt"], require_all=True)


# -------------------------------------------------------------------------------------------- hardening


def _evil_load_body(marker: Path) -> dict:
    """A load request whose model.py comes inside the request and writes ``marker`` when it runs."""
    import base64

    source = (f"import pathlib\nclass TritonPythonModel:\n    def initialize(self, args):\n"
              f"        pathlib.Path({str(marker)!r}).write_text('ran')\n    def execute(self, requests):\n"
              f"        return []\n")
    config = {"name": "evil", "backend": "python", "max_batch_size": 0,
              "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [1]}],
              "output": [{"name": "y", "data_type": "TYPE_FP32", "dims": [1]}]}
    return {"parameters": {"config": json.dumps(config), "file:1/model.py": base64.b64encode(source.encode()).decode()}}


@pytest.mark.server
def test_admin_apis_are_locked_without_the_key(server, tmp_path):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from serving import admin
    from serving.server import http_json

    marker = tmp_path / "ran"
    v2 = f"http://{server.http_url}/v2"
    code, body = http_json("POST", f"{v2}/repository/models/evil/load", _evil_load_body(marker), timeout=60)
    assert code == 403, body
    assert http_json("POST", f"{v2}/repository/models/cnn/unload", {})[0] == 403
    assert http_json("POST", f"{v2}/repository/index", {}, headers={admin.HTTP_HEADER: "wrong"})[0] == 403
    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    with pytest.raises(InferenceServerException, match="admin-key"):
        grpc.unload_model("cnn")
    with pytest.raises(InferenceServerException):
        grpc.get_model_repository_index()
    time.sleep(0.5)
    assert not marker.exists()  # nothing ran
    assert server.health(["cnn"]) == {"cnn": None}  # and nothing was unloaded; inference stays open
    # With the key the same calls work (the project's own heal/reload/bench use it).
    assert grpc.get_model_repository_index(headers={admin.GRPC_HEADER: server.admin_key}) is not None
    code, body = http_json("POST", f"{v2}/repository/models/evil/load", _evil_load_body(marker), timeout=60,
                       headers=server.admin_headers)
    assert code == 200, body
    assert marker.read_text() == "ran"
    server.unload("evil")


def _kill_each_new_server(srv: TritonServer, n: int, timeout: float = 60) -> list[int]:
    """SIGKILL the next ``n`` tritonserver processes the supervisor starts, each as soon as it exists."""
    killed: list[int] = []
    deadline = time.monotonic() + timeout
    while len(killed) < n and time.monotonic() < deadline:
        proc = srv.proc
        if proc is not None and proc.pid not in killed and proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            killed.append(proc.pid)
        time.sleep(0.02)
    return killed


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


@pytest.mark.server
def test_supervisor_survives_a_crash_loop_backs_off_and_serves_again(untrained):
    """The HTTP request that claims a 2.6 TB tensor aborts tritonserver 2.51 (std::bad_alloc); the supervisor
    brings it back. Then every new server is SIGKILLed as it starts: the supervisor keeps trying, its backoff
    doubles up to the cap, its watchdog's errors on a dying server do not end it, and it serves again. A client
    with retries gets its answer across the restart; one without fails at once with one line."""
    import threading

    from serving.client import Client, InferenceError
    from serving.server import Supervisor, http_json

    srv = _start(untrained[0], require_all=True)
    killer = {"inputs": [{"name": "image", "shape": [64, 1, 100000, 100000], "datatype": "FP32", "data": []}]}
    logs: list[str] = []
    sup = Supervisor(srv, backoff_base_s=0.1, backoff_max_s=0.4, stable_s=300, log=logs.append)
    runner = threading.Thread(target=sup.run, kwargs={"watchdog_s": 0.2, "poll_s": 0.05}, daemon=True)
    patient = Client("cnn", "grpc", srv.grpc_url, retries=20, retry_base_s=0.2, retry_max_s=1.0)
    impatient = Client("cnn", "grpc", srv.grpc_url, retries=0)
    x = _real_images(1)[0]
    try:
        runner.start()
        with pytest.raises(OSError):
            http_json("POST", f"http://{srv.http_url}/v2/models/cnn/infer", killer, timeout=30)
        _wait(lambda: sup.restarts, 30, "no restart after the killer request")
        first = sup.restarts[0]
        assert first["ok"] and ("signal 6" in first["why"] or "bad_alloc" in first["why"]), first
        assert sup.status()["state"] == "serving"

        t0 = time.monotonic()
        assert len(_kill_each_new_server(srv, 1)) == 1  # the running one
        with pytest.raises(InferenceError) as e:
            impatient.infer(x)
        assert "\n" not in str(e.value) and "cnn" in str(e.value)
        assert len(_kill_each_new_server(srv, 2)) == 2  # each restart attempt, as it starts
        states = set()
        answer: dict = {}
        asker = threading.Thread(target=lambda: answer.update(patient.infer(x)), daemon=True)
        asker.start()  # sent while the server is down
        while not (sup.status()["state"] == "serving" and srv.alive()):
            states.add(sup.status()["state"])
            assert runner.is_alive() and time.monotonic() - t0 < 45, logs[-3:]
            time.sleep(0.02)
        serving_again_s = time.monotonic() - t0
        asker.join(30)
        assert answer["logits"].shape == (1, 10)
        assert "backing-off" in states
        assert runner.is_alive()
        backoffs = [r["backoff_s"] for r in sup.restarts]
        assert backoffs == [0.1, 0.2, 0.4, 0.4], (backoffs, logs)  # doubling, capped, never giving up
        assert [r["ok"] for r in sup.restarts] == [True, False, False, True], sup.restarts
        assert "SIGKILL" in sup.restarts[1]["why"] and "exited with code -9" in sup.restarts[2]["why"], sup.restarts
        st = sup.status()
        assert st["restarts"] == 2 and st["attempts"] == 4 and st["crashes_in_a_row"] == 4, st
        assert srv.health() == {m: None for m in srv.models}
        print(f"crash loop of 3 SIGKILLs: serving again {serving_again_s:.1f} s after the first; {logs}")
    finally:
        sup.stop()
        runner.join(10)
        patient.close()
        impatient.close()
        srv.stop()
    assert not runner.is_alive()
    assert any("restarting in 0.4 s" in line and "backing-off" in line for line in logs), logs
    assert any("serving again" in line for line in logs)


@pytest.mark.server
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_client_retries_while_its_model_reloads(server, protocol):
    """Triton answers a model being (re)loaded with an error: a client with retries waits it out."""
    import threading

    from serving.client import Client, InferenceError

    url = server.grpc_url if protocol == "grpc" else server.http_url
    x = _real_images(1)[0]
    loader = threading.Timer(0.8, server.load, ["cnn"])
    with Client("cnn", protocol, url, retries=8, retry_base_s=0.1, retry_max_s=0.5) as patient, \
            Client("cnn", protocol, url, retries=0) as impatient:
        server.unload("cnn")
        try:
            with pytest.raises(InferenceError) as e:
                impatient.infer(x)
            assert "\n" not in str(e.value) and "cnn" in str(e.value), e.value
            loader.start()
            t0 = time.monotonic()
            assert patient.infer(x)["logits"].shape == (1, 10)
            assert time.monotonic() - t0 >= 0.5  # it did wait for the load
        finally:
            if loader.is_alive():
                loader.join()
            if server.model_states().get("cnn", {}).get("state") != "READY":
                server.load("cnn")
    assert server.health() == HEALTHY


@pytest.mark.server
def test_client_retries_until_the_port_comes_up(server):
    """A connection refused (a server not up yet) is retried; without retries it is one line at once."""
    import threading

    from serving.client import Client, ClientError
    from serving.frontdoor import create_app, serve_in_thread

    url = f"127.0.0.1:{free_ports(1)[0]}"
    t0 = time.monotonic()
    with pytest.raises(ClientError, match="not reachable") as e:
        Client("cnn", "http", url, retries=0)
    assert time.monotonic() - t0 < 2 and "\n" not in str(e.value)
    done = threading.Event()

    def door_later() -> None:
        time.sleep(0.8)
        with serve_in_thread(create_app(server.grpc_url, explorer=False), port=int(url.rsplit(":", 1)[1])):
            done.wait(60)

    threading.Thread(target=door_later, daemon=True).start()
    try:
        with Client("cnn", "http", url, retries=8, retry_base_s=0.1, retry_max_s=0.5) as client:
            assert client.infer(_real_images(1)[0])["logits"].shape == (1, 10)
    finally:
        done.set()


# ------------------------------------------------------------------------------------------- CLIs


def _run(*args: str, timeout: float = 120, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), **(env_extra or {}))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


@pytest.mark.server
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_client_cli_png_npy_and_samples(server, tmp_path, protocol):
    from PIL import Image

    images, labels = _real_images(2)
    png = tmp_path / "digit.png"
    Image.fromarray((images[0, 0] * 255).round().astype(np.uint8)).save(png)
    npy = tmp_path / "digits.npy"
    np.save(npy, images)
    url = server.grpc_url if protocol == "grpc" else server.http_url
    # --tensor: the PNG goes decoded to the model itself (without it, image files go as bytes to cnn_image).
    r = _run("-m", "serving.client", "--model", "cnn", "--protocol", protocol, "--url", url, str(png), str(npy),
             "--sample", "2", "--json", "--tensor")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["input"] for row in rows] == [
        f"sample 0 (label {labels[0]})", f"sample 1 (label {labels[1]})", str(png), f"{npy}[0]", f"{npy}[1]"]
    assert all(0 <= row["outputs"]["logits"]["prediction"] <= 9 for row in rows)
    assert rows[3]["outputs"] == rows[0]["outputs"]  # .npy float32 == the data set sample

    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((2, 3, 8, 8), np.float32))
    from serving import admin

    with_key = {admin.KEY_ENV: server.admin_key}  # the repository index is an admin API
    served = "served models: cnn, cnn_image, cnn_preprocess, passthrough"
    cases = [(["--model", "nope", str(npy)], f"error: unknown model 'nope'; {served}", with_key),
             (["--model", "nope", str(png)], f"error: unknown model 'nope_image'; {served} (image files go as "
              "bytes to 'nope_image'; --tensor sends them decoded to 'nope')", with_key),
             (["--model", "nope", str(npy)], "error: model 'nope' is not served (or not ready)",
              {admin.KEY_ENV: "not-the-key"})]
    if protocol == "grpc":  # file errors do not depend on the protocol
        cases += [(["--model", "cnn", str(bad)], "expected [H, W], [1, H, W], [N, H, W] or [N, 1, H, W]", {}),
                  (["--model", "cnn", str(tmp_path / "none.png")], "none.png: no such file", {})]
    for args, expected, env in cases:
        r = _run("-m", "serving.client", "--protocol", protocol, "--url", url, *args, env_extra=env)
        assert r.returncode == 1 and expected in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = _run("-m", "serving.client", "--model", "cnn", "--url", f"127.0.0.1:{free_ports(1)[0]}", str(png),
             "--protocol", protocol, "--retries", "0")
    assert r.returncode == 1 and "not reachable" in r.stderr and "make serve" in r.stderr


@pytest.mark.server
def test_server_cli_starts_checks_and_stops(untrained):
    http, grpc, metrics = free_ports(3)
    r = _run("-m", "serving.server", "--repo", str(untrained[0]), "--no-generate", "--check", "--http-port",
             str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics))
    assert r.returncode == 0, r.stderr
    assert "tritonserver ready" in r.stdout and "cnn: ok" in r.stdout and "passthrough: ok" in r.stdout
    assert "tritonserver stopped (exit code 0)" in r.stderr
    assert port_free(http) and port_free(grpc)


# --------------------------------------------------------------------- trained models (make export)


def _trained_names() -> list[str]:
    from training import checkpoint_path
    from training.registry import get_spec, list_models

    return [n for n in list_models() if checkpoint_path(n).exists() and all(
        layout.onnx_path(d.triton_name).exists() for d in rep.deployables(get_spec(n)) if d.graph)]


@pytest.fixture(scope="module")
def trained_server(tmp_path_factory):
    names = _trained_names()
    if not names:
        pytest.skip("no trained checkpoint with an exported graph; run `make export` first")
    repo = tmp_path_factory.mktemp("trained_repo")
    from training.registry import get_spec

    for n in names:  # a temp repository on the exported graphs (never model_repository/ itself)
        for d in rep.deployables(get_spec(n)):
            if d.graph is not None:
                dst = layout.onnx_path(d.triton_name, repo)
                dst.parent.mkdir(parents=True)
                dst.symlink_to(layout.onnx_path(d.triton_name).resolve())
    rep.write_repository(names, "cpu", repo)
    srv = _start(repo)
    yield srv
    import gc

    gc.collect()  # tritonserver exits 1 if an HTTP client's connection is still open at shutdown
    stop_in_background(srv, "test_serving.py trained_server", clean=True)  # exit code 0, asserted at the end


def _model_names() -> list[str]:
    from training.registry import list_models

    return list_models()


@pytest.mark.server
@pytest.mark.parametrize("name", _model_names())
def test_wire_equals_load_trained(trained_server, name):
    from training import load_trained
    from training.registry import get_spec

    if name not in _trained_names():
        pytest.skip(f"{name!r}: no trained checkpoint or exported graph; run `make export` first")
    assert name not in trained_server.load_errors, trained_server.load_errors.get(name)
    spec, model = get_spec(name), load_trained(name)
    mbs = spec.serving.max_batch_size
    images, _ = _real_images(mbs, spec.train.canvas)
    for protocol in PROTOCOLS:
        c = _client(trained_server, name, protocol)
        for n in (1, mbs):
            x = images[:n]
            _assert_parity(c.infer(x), _torch_outputs(model, x, spec), spec, f"{protocol} batch {n}")
        singles = [images[i:i + 1] for i in range(32)]
        got = c.infer_many(singles, concurrency=16)
        ref = _torch_outputs(model, images[:32], spec)
        for i, g in enumerate(got):
            _assert_parity(g, {k: v[i:i + 1] for k, v in ref.items()}, spec, f"{protocol} concurrent {i}")


def _models_with_optional_inputs() -> list[str]:
    from training.registry import get_spec, list_models

    return [n for n in list_models() if any(t.optional for t in get_spec(n).inputs)]


@pytest.mark.server
@pytest.mark.parametrize("name", _models_with_optional_inputs())
def test_optional_inputs_default_values_and_range_errors(trained_server, name):
    """Left out, an optional input is its default; given, it is used; out of its range, the request gets an
    error naming the input and the range, and the server keeps answering."""
    from serving.client import ClientError
    from training import load_trained
    from training.registry import get_spec

    if name not in _trained_names():
        pytest.skip(f"{name!r}: no trained checkpoint or exported graph; run `make export` first")
    spec, model = get_spec(name), load_trained(name)
    images, _ = _real_images(4, spec.train.canvas)
    ref_default = _torch_outputs(model, images, spec)
    for t in (t for t in spec.inputs if t.optional):
        hi = t.value_range[1]
        chosen = np.full((4, *t.shape), hi, dtype=t.dtype)
        ref_chosen = TorchRunner.for_spec(spec, model).infer({spec.inputs[0].name: images, t.name: chosen})
        for protocol in PROTOCOLS:
            c = _client(trained_server, name, protocol)
            _assert_parity(c.infer(images), ref_default, spec, f"{protocol} {t.name} left out")
            _assert_parity(c.infer({spec.inputs[0].name: images, t.name: t.default_batch(4)}), ref_default, spec,
                           f"{protocol} {t.name} = default")
            _assert_parity(c.infer({spec.inputs[0].name: images, t.name: chosen}), ref_chosen, spec,
                           f"{protocol} {t.name} = {hi}")
            bad = np.full((4, *t.shape), hi + 1, dtype=t.dtype)
            with pytest.raises(ClientError, match=f"{t.name}.*values must be in"):  # the client refuses it
                c.infer({spec.inputs[0].name: images, t.name: bad})
            with pytest.raises(ClientError, match=f"{t.name}.*values must be in"):  # and so does the server
                c.infer({spec.inputs[0].name: images, t.name: bad}, validate=False)
            _assert_parity(c.infer(images), ref_default, spec, f"{protocol} after a bad request")
            c.close()


def _models_with_kind(*kinds: str) -> list[str]:
    from training.registry import get_spec, list_models

    return [n for n in list_models() if any(o.kind in kinds for o in get_spec(n).outputs)]


@pytest.mark.server
@pytest.mark.parametrize("name", _models_with_kind("segmentation"))
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_client_saves_the_served_mask_and_maps(trained_server, name, protocol, tmp_path):
    """``--save-mask`` writes the served per-pixel argmax as the palette's colours, pixel for pixel what the
    torch model gives for the same PNG; ``--save-maps`` writes every map output; several images get numbered
    files."""
    from PIL import Image

    from training import load_trained
    from training.data import make_split
    from training.registry import get_spec
    from training.tasks import PALETTE, output_kind

    if name not in _trained_names():
        pytest.skip(f"{name!r}: no trained checkpoint or exported graph; run `make export` first")
    spec, model = get_spec(name), load_trained(name)
    data = make_split("test", 2, 80, 5, spec.train.data)  # another size than the export's
    pngs = []
    for i in range(2):
        pngs.append(tmp_path / f"in{i}.png")
        Image.fromarray((data["image"][i, 0] * 255).round().astype(np.uint8)).save(pngs[-1])
    sent = np.stack([np.asarray(Image.open(p), np.float32)[None] / 255.0 for p in pngs])
    ref = _torch_outputs(model, sent, spec)
    url = trained_server.grpc_url if protocol == "grpc" else trained_server.http_url
    r = _run("-m", "serving.client", "--model", name, "--protocol", protocol, "--url", url, *map(str, pngs),
             "--save-mask", str(tmp_path / "mask.png"), "--save-maps", str(tmp_path / "maps.png"), "--json", "--tensor")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    seg = [o.name for o in spec.outputs if o.kind == "segmentation"]
    maps = [o.name for o in spec.outputs if o.kind in ("map", "saliency")]
    for i, row in enumerate(rows):
        assert len(row["saved"]) == len(seg) + len(maps), row
        for out in seg:
            path = tmp_path / (f"mask_{i}.png" if len(seg) == 1 else f"mask_{i}_{out}.png")
            got = np.asarray(Image.open(path).convert("RGB"))
            want = PALETTE[ref[out][i].argmax(0)]
            assert got.shape == want.shape == (80, 80, 3)
            assert (got == want).all(-1).mean() >= 0.999, "mask differs from torch's"  # a near-tie may flip
        for out in maps:
            path = tmp_path / (f"maps_{i}.png" if len(maps) == 1 else f"maps_{i}_{out}.png")
            assert np.asarray(Image.open(path)).shape == output_kind("map").render(ref[out][i]).shape
