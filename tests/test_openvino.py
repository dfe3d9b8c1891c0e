"""OpenVINO as a second CPU engine: fp32 parity with onnxruntime on real test images for every exported model it
compiles, and the INT8 gate applied to OpenVINO's int8 answers (it must refuse wrong answers and uncompilable
graphs, and say why)."""

from __future__ import annotations

import numpy as np
import pytest

from export.compare import Tolerance, compare, spec_tolerance
from export.host_choice import cpu_runner, int8_gate, int8_reference
from export.openvino_runner import OpenVinoCompileError, OpenVinoRunner, batch_buckets
from export.runners import infer_batched
from export.variants import variant_graphs
from training import layout
from training.feeds import sample_feeds
from training.registry import get_spec, resolve_names

BATCHES = (1, 8)
EXPORTED = [n for n in resolve_names(["all"]) if "fp32" in variant_graphs(get_spec(n))]
INT8 = [n for n in EXPORTED if "int8" in variant_graphs(get_spec(n))]
GATE_IMAGES = 200

pytestmark = pytest.mark.skipif(not EXPORTED, reason="no exported graphs: run `make export`")


@pytest.mark.parametrize("name", EXPORTED)
def test_fp32_parity_with_onnxruntime(name: str) -> None:
    """Every output within the spec's fp32 bound (1e-4 unless the spec loosens one, with its reason: feedback's
    unrolled loop) and top-1 agreement 1.0, at two batch sizes; a graph OpenVINO cannot compile fails the test
    with OpenVINO's reason rather than being skipped."""
    spec = get_spec(name)
    files = variant_graphs(spec)["fp32"]
    ov, ort = cpu_runner(spec, files, "openvino"), cpu_runner(spec, files, "onnxruntime")
    feeds = sample_feeds(spec, max(BATCHES), spec.train.canvas)
    for b in BATCHES:
        x = {k: v[:b] for k, v in feeds.items()}
        c = compare(ort.infer(x), ov.infer(x), spec.outputs, spec_tolerance(spec), where=f"{name} batch {b}")
        assert c.ok, c.failures
        assert set(c.max_abs()) == set(spec.output_names)


def test_dynamic_shapes_compile_once_and_match_static() -> None:
    path = layout.onnx_path("cnn")
    feeds = sample_feeds(get_spec("cnn"), 4, 64)
    dynamic, static = OpenVinoRunner(path, static=False), OpenVinoRunner(path)
    for side in (64, 80):
        x = {"image": np.ascontiguousarray(np.resize(feeds["image"], (4, 1, side, side)))}
        np.testing.assert_allclose(dynamic.infer(x)["logits"], static.infer(x)["logits"], atol=1e-4)
    assert static.compiled_shapes == 2 and dynamic.compiled_shapes == 1


def test_batch_buckets_pad_and_cut_back() -> None:
    """Static shapes per batch bucket: a batch of 3 runs as 4 (the last sample repeated) and comes back as 3 with
    the answers of the dynamic-shape model; each bucket compiles once; past the largest bucket the exact size."""
    assert batch_buckets(64) == (1, 2, 4, 8, 16, 32, 64) and batch_buckets(48)[-2:] == (32, 48)
    assert batch_buckets(1) == (1,)
    path = layout.onnx_path("cnn")
    feeds = sample_feeds(get_spec("cnn"), 9, 64)
    dynamic, bucketed = OpenVinoRunner(path, static=False), OpenVinoRunner(path, batch_buckets=(1, 2, 4, 8))
    for b in (3, 4, 1, 5, 9, 3):
        x = {"image": feeds["image"][:b]}
        got = bucketed.infer(x)["logits"]
        assert got.shape[0] == b
        np.testing.assert_allclose(got, dynamic.infer(x)["logits"], atol=1e-4)
    assert bucketed.compiled_shapes == 4  # buckets 4, 1 and 8, and 9 as itself


def test_batches_routed_by_size_run_on_their_own_engine() -> None:
    """A choice routed by batch size (``export.host_choice.routed``) runs each batch on its route's engine, in
    process as the python backend does: OpenVINO static up to 2 (its buckets stop there), onnxruntime above;
    every size within the fp32 parity bound of torch."""
    from export.cpu_engines import BatchRouted
    from export.host_choice import served_runner
    from export.parity import deployed_runner
    from export.runners import TorchRunner
    from training.checkpoints import load_trained

    name = "cnn"
    if name not in EXPORTED:
        pytest.skip("cnn not exported: run `make export`")
    spec = get_spec(name)
    files = variant_graphs(spec)["fp32"]
    served = {"engine": "onnxruntime", "setting": "spin off",
              "routes": [{"up_to": 2, "engine": "openvino", "setting": "static"},
                         {"up_to": None, "engine": "onnxruntime", "setting": "spin off"}]}
    routed = served_runner(spec, files, served)
    assert isinstance(routed, BatchRouted)
    small, large = routed.target(1), routed.target(3)
    assert routed.target(2) is small and routed.target(64) is large
    assert isinstance(small, OpenVinoRunner) and small.buckets == (1, 2)
    assert type(large) is type(deployed_runner(spec, files))
    torch_ref = TorchRunner.for_spec(spec, load_trained(name))
    feeds = sample_feeds(spec, 8, spec.train.canvas)
    for b in (1, 2, 3, 8):
        x = {k: v[:b] for k, v in feeds.items()}
        c = compare(torch_ref.infer(x), routed.infer(x), spec.outputs, spec_tolerance(spec), where=f"routed b{b}")
        assert c.ok, c.failures
    assert small.compiled_shapes == 2  # batches 1 and 2 only: 3 and 8 never reached OpenVINO


def test_bad_files_are_one_line_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        OpenVinoRunner(tmp_path / "missing.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a graph")
    with pytest.raises(OpenVinoCompileError, match=r"bad\.onnx"):
        OpenVinoRunner(bad)
    runner = OpenVinoRunner(layout.onnx_path("cnn"))
    with pytest.raises(KeyError, match="missing inputs"):
        runner.infer({"wrong": np.zeros((1, 1, 64, 64), np.float32)})


def _top1(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.argmax(-1) == b.argmax(-1)).mean())


@pytest.mark.parametrize("name", [n for n in ("macnn", "gen_attention_1111", "cnn") if n in INT8])
def test_int8_gate_judges_openvino_answers(name: str) -> None:
    """The gate's verdict follows OpenVINO's own answers: measured independently here (top-1 agreement with the
    fp32 torch model), a miss must be refused with the agreement named; a graph that does not compile must be
    refused with the compiler's reason. (On the hosts measured so far macnn's int8 answers are wrong and the
    gen_attention int8 graphs do not compile.)"""
    spec = get_spec(name)
    files = variant_graphs(spec)["int8"]
    ref = int8_reference(spec, GATE_IMAGES)
    g = int8_gate(spec, files, "openvino", GATE_IMAGES, ref)
    try:
        got = infer_batched(cpu_runner(spec, files, "openvino"), sample_feeds(spec, GATE_IMAGES, spec.train.canvas))
    except OpenVinoCompileError as e:
        assert not g["passed"] and "cannot compile" in g["why"], g
        assert str(e).split(":")[0] in g["why"]
        return
    logits = [t.name for t in spec.outputs if t.kind == "logits"]
    agreement = min(_top1(ref[k], got[k]) for k in logits)
    bar = min(spec.checks.int8_agreement(k) for k in logits)
    # The gate's verdict agrees with its own figures...
    assert g["passed"] == (g["agreement"] >= bar and g["metric_drop"] <= spec.checks.int8_max_metric_drop + 1e-12)
    if not g["passed"]:
        assert "agreement" in g["why"] or "below fp32" in g["why"], g
    # ...and with answers measured independently here. Not to the digit: OpenVINO's macnn int8 answers differ
    # from one compile of the same graph to the next (measured: max abs 30 between two compiles, same input).
    if agreement < bar - 0.05:
        assert not g["passed"], (agreement, g)


@pytest.mark.server
def test_served_on_openvino_through_the_python_backend(tmp_path) -> None:
    """A config that names ``engine: openvino`` (as the host choice writes it) is served by OpenVINO inside
    Triton's python backend, with dynamic shapes and with static shapes per batch bucket: answers equal OpenVINO's
    in process, within the fp32 parity bound of torch, at three batch sizes (3: padded to bucket 4) and two input
    sizes; the same for a config routed by batch size (OpenVINO static up to 2, onnxruntime above); a bad engine
    name or route list fails the model's load naming it."""
    import shutil

    from export.runners import TorchRunner
    from serving import repository as rep
    from serving.client import Client
    from serving.server import TritonServer, free_ports
    from training.checkpoints import load_trained

    name = "cnn"
    if name not in EXPORTED:
        pytest.skip("cnn not exported: run `make export`")
    spec = get_spec(name)
    dst = layout.onnx_path(name, tmp_path)
    dst.parent.mkdir(parents=True)
    shutil.copyfile(layout.onnx_path(name), dst)
    choice = {"isa_key": "test", "served": {"fp32": {"engine": "openvino", "setting": "dynamic", "instances": 1}}}
    rep.write_model(spec, "cpu", tmp_path, choice=choice)

    def variant(suffix: str, **params: str) -> str:
        cfg = rep.parse_config(layout.config_path(name, tmp_path).read_text())
        cfg.name = f"{name}_{suffix}"
        for k, v in params.items():
            cfg.parameters[k].string_value = v
        layout.version_dir(cfg.name, tmp_path).mkdir(parents=True)
        shutil.copyfile(dst, layout.onnx_path(cfg.name, tmp_path))
        shutil.copyfile(rep.BACKEND_MODEL_PY, layout.version_dir(cfg.name, tmp_path) / layout.BACKEND_FILE)
        rep.write_text(layout.config_path(cfg.name, tmp_path), rep.config_text(cfg))
        return cfg.name

    from export.cpu_engines import BatchRouted, Route
    from export.parity import deployed_runner

    bad, static = variant("bad_engine", engine="tensorflow"), variant("static", shapes="static")
    routes = (Route(2, "openvino", "static"), Route(None, "onnxruntime", "spin off"))
    routed = variant("routed", routes=Route.dump(routes))
    bad_routes = variant("bad_routes", routes=Route.dump(routes[::-1]))
    local = {name: OpenVinoRunner(dst, static=False),
             static: OpenVinoRunner(dst, batch_buckets=batch_buckets(spec.serving.max_batch_size)),
             routed: BatchRouted([(2, OpenVinoRunner(dst, batch_buckets=(1, 2))),
                                  (None, deployed_runner(spec, {spec.deploy_graphs()[0].name: dst}))])}
    torch_ref = TorchRunner.for_spec(spec, load_trained(name))
    http, grpc, metrics = free_ports(3)
    with TritonServer(tmp_path, [name, bad, static, routed, bad_routes], http_port=http, grpc_port=grpc,
                      metrics_port=metrics) as srv:
        assert "unknown engine 'tensorflow'" in srv.load_errors.get(bad, ""), srv.load_errors
        assert "limits must ascend" in srv.load_errors.get(bad_routes, ""), srv.load_errors
        for served, runner in local.items():
            client = Client(served, "grpc", srv.grpc_url)
            for side in spec.checks.parity_sides:
                feeds = sample_feeds(spec, 8, side)
                for b in (1, 3, 8):
                    x = {k: v[:b] for k, v in feeds.items()}
                    got = client.infer(x)
                    same = compare(runner.infer(x), got, spec.outputs, Tolerance(1e-5, 1.0), where=served)
                    assert same.ok, same.failures
                    c = compare(torch_ref.infer(x), got, spec.outputs, spec_tolerance(spec),
                                where=f"{served} b{b} {side}px")
                    assert c.ok, c.failures
