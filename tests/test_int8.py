"""INT8 graphs: calibration reads training images only, both QDQ flavours are what their runtime needs (and
TensorRT-RTX refuses the other one), keep-lists leave exactly the named nodes float, the probe compares the
three calibration methods and records its choice, the gate fails naming the model, and the repository serves
``<name>_int8`` with the same backend (served parity against the in-process int8 graph)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from export import manifest
from export.int8 import Int8Choice, Int8GateError, Int8GraphError, build_int8_graphs, int8_gate, quantized_nodes
from export.int8.__main__ import main
from export.int8.calibration import BATCH, TrainingImages, training_feeds
from export.int8.choices import METHODS, load_choices, save_choice
from export.int8.gate import fp32_graph_paths, prepared_graphs
from export.int8.probe import DATA_MOVEMENT, probe_model
from export.runners import OnnxRuntimeRunner
from serving import repository as rep
from tests.conftest import require_checkpoint, require_onnx
from training import data as digits
from training import layout
from training.registry import get_spec

MODEL = "cnn"


@pytest.fixture(scope="module")
def cnn():
    require_checkpoint(MODEL)
    require_onnx(MODEL)
    spec = get_spec(MODEL)
    return spec, fp32_graph_paths(spec)


@pytest.fixture(scope="module")
def calibration(cnn):
    spec, _ = cnn
    return {MODEL: training_feeds(spec, 64)[0]}


def _initializers(path):
    g = onnx.load(str(path)).graph
    return g, {t.name: numpy_helper.to_array(t) for t in g.initializer}


def test_reader_strides_cover_every_sample_once():
    x = np.arange(100, dtype=np.float32).reshape(100, 1)
    reader = TrainingImages({"image": x}, batch=32)
    assert len(reader) == 100
    seen = []
    for start in range(0, 100, 40):  # how onnxruntime's strided calibration drives it
        reader.set_range(start, start + 40)
        while (b := reader.get_next()) is not None:
            assert len(b["image"]) <= 32
            seen += b["image"][:, 0].tolist()
    assert seen == list(range(100))


def test_calibration_images_come_from_the_training_split():
    spec = get_spec(MODEL)
    cal, sel = training_feeds(spec, 70, 50)
    assert len(cal["image"]) == 64 == 2 * BATCH  # whole calibration batches
    assert len(sel["image"]) == 50
    test, _ = digits.test_images(200)
    pool = np.concatenate([cal["image"], sel["image"]]).reshape(114, -1)
    assert not (pool[:, None, :] == test.reshape(200, -1)[None]).all(-1).any()  # no test image among them
    assert not (cal["image"].reshape(64, -1)[:, None] == sel["image"].reshape(50, -1)[None]).all(-1).any()


def test_flavours_are_what_onnxruntime_and_tensorrt_need(cnn, calibration, tmp_path):
    spec, fp32 = cnn
    cpu = build_int8_graphs(spec, fp32, Int8Choice(calibration_images=64), tmp_path, calibration)[MODEL]
    trt = build_int8_graphs(spec, fp32, Int8Choice(calibration_images=64), tmp_path, calibration, "tensorrt")[MODEL]
    for path, act_dtype, symmetric in ((cpu, np.uint8, False), (trt, np.int8, True)):
        g, init = _initializers(path)
        dq = [n for n in g.node if n.op_type == "DequantizeLinear"]
        zero_points = [init[n.input[2]] for n in dq if len(n.input) > 2 and n.input[2] in init]
        weights = [init[n.input[0]] for n in dq if n.input[0] in init and init[n.input[0]].dtype == np.int8
                   and init[n.input[0]].ndim == 4]
        assert weights and all(w.dtype == np.int8 for w in weights)
        # Per-channel weights: one scale per output channel of every quantized Conv.
        per_channel = [init[n.input[1]].size for n in dq if n.input[0] in init and init[n.input[0]].ndim == 4]
        assert all(s == w.shape[0] for s, w in zip(per_channel, weights, strict=True))
        activations = [z for n, z in zip(dq, zero_points, strict=False) if n.input[0] not in init]
        assert activations and all(z.dtype == act_dtype for z in activations)
        assert all((z == 0).all() for z in zero_points) == symmetric
        int32_bias = [n for n in dq if n.input[0] in init and init[n.input[0]].dtype == np.int32]
        assert bool(int32_bias) != symmetric  # TensorRT refuses an int32 DequantizeLinear
        assert quantized_nodes(path)  # the convolutions read dequantized tensors


def test_keep_list_leaves_exactly_the_named_nodes_float(cnn, calibration, tmp_path):
    spec, fp32 = cnn
    full = build_int8_graphs(spec, fp32, Int8Choice(calibration_images=64), tmp_path / "a", calibration)[MODEL]
    convs = [n for n, op in quantized_nodes(full).items() if op == "Conv"]
    kept = build_int8_graphs(spec, fp32, Int8Choice(calibration_images=64, keep_fp32_nodes={MODEL: (convs[1],)}),
                             tmp_path / "b", calibration)[MODEL]
    # Only it leaves int8 among the compute nodes (a data-movement node after it, e.g. MaxPool, follows its input).
    compute = {n for n, op in quantized_nodes(full).items() if op not in DATA_MOVEMENT}
    assert compute - set(quantized_nodes(kept)) == {convs[1]}
    assert set(quantized_nodes(kept)) <= set(quantized_nodes(full))
    g, init = _initializers(kept)
    node = next(n for n in g.node if n.name == convs[1])
    assert init[node.input[1]].dtype == np.float32  # its weight stays a float initializer
    with pytest.raises(Int8GraphError, match="no_such_node"):
        build_int8_graphs(spec, fp32, Int8Choice(keep_fp32_nodes={MODEL: ("no_such_node",)}), tmp_path, calibration)


def test_gate_passes_and_fails_naming_the_model(cnn):
    from training import load_trained

    spec, fp32 = cnn
    model = load_trained(MODEL)
    r = int8_gate(spec, model, fp32, 300, choice=Int8Choice(calibration_images=64))
    assert r["passed"], r["failures"]
    assert r["agreement"] >= spec.checks.int8_min_agreement
    assert abs(r["metric_drop"]) <= spec.checks.int8_max_metric_drop
    strict = dataclasses.replace(spec, checks=dataclasses.replace(spec.checks, int8_max_metric_drop=-0.5))
    with pytest.raises(Int8GateError, match=f"model '{MODEL}'.*accuracy"):
        int8_gate(strict, model, fp32, 300, choice=Int8Choice(calibration_images=64))


def test_probe_compares_the_methods_and_records_its_choice(cnn, tmp_path):
    spec, fp32 = cnn
    r = probe_model(spec, fp32, n_cal=64, n_sel=128)
    assert [c["method"] for c in r["calibration"]] == list(METHODS)
    chosen = [c for c in r["calibration"] if c["chosen"]]
    assert len(chosen) == 1 and chosen[0]["method"] == r["method"] == r["choice"]["calibration"]
    rows = r["sensitivity"]["graphs"][MODEL]["rows"]
    assert {row["op"] for row in rows} >= {"Conv", "Gemm"}
    assert all(row["latency_ratio"] > 0 for row in rows)
    path = tmp_path / "choices.json"
    save_choice(MODEL, Int8Choice.from_dict(r["choice"]), path)
    save_choice("other", Int8Choice(), path)
    assert load_choices(path)[MODEL].calibration == r["method"]
    assert set(json.loads(path.read_text())) == {MODEL, "other"}


def test_prepared_graph_is_reused_per_content(cnn):
    spec, fp32 = cnn
    assert prepared_graphs(spec, fp32) == prepared_graphs(spec, fp32)


def test_cli_rejects_unknown_models(capsys):
    assert main(["no_such_model"]) == 2
    assert "unknown model 'no_such_model'" in capsys.readouterr().err


def test_tensorrt_builds_the_tensorrt_flavour_and_refuses_the_cpu_one(cnn, calibration, tmp_path):
    from export.tensorrt import TensorRTParseError, build_engine, parse_onnx, trt_available

    if not trt_available():
        pytest.skip("no TensorRT here")
    spec, fp32 = cnn
    choice = Int8Choice(calibration_images=64)
    trt = build_int8_graphs(spec, fp32, choice, tmp_path, calibration, "tensorrt")[MODEL]
    info = build_engine(trt, spec, tmp_path / "int8.plan", archs=("sm86",), precision="int8")
    assert info.precision == "int8" and info.plan_bytes > 0
    cpu = build_int8_graphs(spec, fp32, choice, tmp_path, calibration)[MODEL]
    with pytest.raises(TensorRTParseError, match=r"Int32|zero point"):  # its int32 bias, its uint8 zero points
        parse_onnx(cpu)


def test_repository_serves_the_int8_variant(cnn, calibration, tmp_path):
    spec, fp32 = cnn
    dst = layout.onnx_path(MODEL, tmp_path)
    dst.parent.mkdir(parents=True)
    dst.symlink_to(fp32[MODEL].resolve())
    rep.write_repository([MODEL], "cpu", tmp_path)
    image = ["cnn_image", "cnn_preprocess"]  # raw image files in, for every image model
    assert sorted(rep.check_repository(tmp_path)) == sorted(["cnn", *image, "passthrough"])  # no int8 graph: no variant
    graph = build_int8_graphs(spec, fp32, Int8Choice(calibration_images=64), tmp_path / "g", calibration)[MODEL]
    int8 = layout.int8_onnx_path(MODEL, repo_dir=tmp_path)
    int8.parent.mkdir(parents=True)
    int8.symlink_to(graph.resolve())
    rep.write_repository([MODEL], "cpu", tmp_path)  # a graph placed by hand, no export manifest: not served
    assert sorted(rep.check_repository(tmp_path)) == sorted(["cnn", *image, "passthrough"])
    manifest.write(spec, {MODEL: dst}, {"passed": True}, repo_dir=tmp_path)
    manifest.set_variant(MODEL, "int8", {MODEL: int8}, {"passed": False}, repo_dir=tmp_path)
    rep.write_repository([MODEL], "cpu", tmp_path)  # the manifest says it missed its gate: not served
    assert sorted(rep.check_repository(tmp_path)) == sorted(["cnn", *image, "passthrough"])
    manifest.set_variant(MODEL, "int8", {MODEL: int8}, {"passed": True}, repo_dir=tmp_path)
    rep.write_repository([MODEL], "cpu", tmp_path)
    assert sorted(rep.check_repository(tmp_path)) == sorted(["cnn", *image, "cnn_int8", "passthrough"])
    cfg = rep.parse_config(layout.config_path("cnn_int8", tmp_path).read_text())
    assert cfg.name == "cnn_int8" and cfg.backend == "python"
    assert (layout.version_dir("cnn_int8", tmp_path) / layout.BACKEND_FILE).read_bytes() == \
        rep.BACKEND_MODEL_PY.read_bytes()


def test_repository_variant_best_serves_the_recorded_fastest_gated_variant(cnn, calibration, tmp_path, monkeypatch):
    from training import paths

    spec, fp32 = cnn
    repo = tmp_path / "repo"
    graph = build_int8_graphs(spec, fp32, Int8Choice(calibration_images=64), tmp_path / "g", calibration)[MODEL]
    int8 = layout.int8_onnx_path(MODEL, repo_dir=repo)
    for src, dst in ((fp32[MODEL], layout.onnx_path(MODEL, repo)), (graph, int8)):
        dst.parent.mkdir(parents=True)
        dst.symlink_to(src.resolve())
    monkeypatch.setattr(paths, "REPORTS_DIR", tmp_path)
    with pytest.raises(rep.RepositoryError, match="make variants"):
        rep.write_repository([MODEL], "cpu", repo, "best")
    for best, onnx_file in (("int8", "model.int8.onnx"), ("fp32", "model.onnx")):
        (tmp_path / "variants.json").write_text(json.dumps({MODEL: {"best": best}}))
        rep.write_repository([MODEL], "cpu", repo, "best")
        cfg = rep.parse_config(layout.config_path(MODEL, repo).read_text())
        assert cfg.parameters["onnx_file"].string_value == onnx_file
        assert (layout.version_dir(MODEL, repo) / onnx_file).read_bytes() == \
            (graph if best == "int8" else fp32[MODEL]).read_bytes()


@pytest.mark.server
def test_served_int8_equals_the_in_process_int8_graph(cnn, calibration, tmp_path):
    from export.compare import Tolerance, compare
    from export.runners import TorchRunner
    from serving.client import Client
    from serving.server import TritonServer, free_ports
    from training import load_trained

    spec, fp32 = cnn
    graph = build_int8_graphs(spec, fp32, Int8Choice(calibration_images=64), tmp_path / "g", calibration)[MODEL]
    int8 = layout.int8_onnx_path(MODEL, repo_dir=tmp_path / "repo")
    fp = layout.onnx_path(MODEL, tmp_path / "repo")
    for src, dst in ((graph, int8), (fp32[MODEL], fp)):
        dst.parent.mkdir(parents=True)
        dst.symlink_to(src.resolve())
    manifest.write(spec, {MODEL: fp}, {"passed": True}, repo_dir=tmp_path / "repo")
    manifest.set_variant(MODEL, "int8", {MODEL: int8}, {"passed": True}, repo_dir=tmp_path / "repo")
    rep.write_repository([MODEL], "cpu", tmp_path / "repo")
    x, _ = digits.test_images(96)
    local = OnnxRuntimeRunner(graph).infer({"image": x})
    torch_ref = TorchRunner.for_spec(spec, load_trained(MODEL)).infer({"image": x})
    http, grpc, metrics = free_ports(3)
    with TritonServer(tmp_path / "repo", ["cnn_int8"], http_port=http, grpc_port=grpc, metrics_port=metrics) as srv:
        for protocol, url in (("grpc", srv.grpc_url), ("http", srv.http_url)):
            client = Client("cnn_int8", protocol, url)
            parts = client.infer_many([x[i:i + 8] for i in range(0, len(x), 8)], concurrency=8)
            served = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
            same = compare(local, served, spec.outputs, Tolerance(max_abs=1e-6, min_agreement=1.0))
            assert same.ok, same.failures
            # 96 images and a 64-image calibration: one flip is 0.0104, so the bar here is looser than the
            # export's 1000-image gate (int8_min_agreement), which the shipped graph meets.
            vs_torch = compare(torch_ref, served, spec.outputs, Tolerance(None, 0.97))
            assert vs_torch.ok, vs_torch.failures


def test_variants_never_pick_a_variant_that_missed_its_gate(cnn, tmp_path, monkeypatch):
    from bench import variants
    from training import paths

    spec, _ = cnn
    graphs = variants.variant_graphs(spec)
    if set(graphs) != set(variants.VARIANTS):
        pytest.skip(f"cnn has only the {sorted(graphs)} graphs; run `make export` (fp16, int8)")
    monkeypatch.setattr(paths, "REPORTS_DIR", tmp_path)
    (tmp_path / "parity.json").write_text(json.dumps({MODEL: {"parity": {"passed": True}, "metrics": {"a": 0.97}}}))
    (tmp_path / "fp16.json").write_text(json.dumps({MODEL: {"gate": {"passed": False, "agreement": 0.5}}}))
    r = variants.measure_model(MODEL, rounds=3)
    assert set(r["batches"]["32"]["latency"]) == set(variants.VARIANTS)  # all measured ...
    assert r["gates"]["int8"]["passed"] is False  # no INT8 gate recorded here: never picked
    assert all(b["best"] == "fp32" for b in r["batches"].values())  # ... only the gated one is picked


def test_export_neither_builds_nor_serves_a_variant_that_missed_its_gate(cnn, tmp_path, monkeypatch):
    from export import pipeline
    from export.int8 import choices
    from training import paths

    spec, fp32 = cnn
    monkeypatch.setattr(paths, "REPOSITORY_DIR", tmp_path)
    monkeypatch.setattr(choices, "CHOICES_PATH", tmp_path / "choices.json")
    save_choice(MODEL, Int8Choice(ship=False, not_shipped="missed its test-split gate: x"))
    stale = layout.int8_onnx_path(MODEL)
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"stale")
    status, agreement, failure = pipeline._int8_gate(spec, None, fp32)
    assert status.startswith("int8 not shipped (missed") and agreement is None and failure is None
    assert not stale.parent.parent.exists()  # the whole cnn_int8 folder: no config is left without its graph


def test_export_fails_naming_the_model_when_a_shipped_int8_graph_misses_its_gate(cnn, tmp_path, monkeypatch, capsys):
    """Recorded ``ship: true`` but missing the gate now (here: an impossible metric bar) is an export failure:
    one line naming the model and the missed criterion, a non-zero exit, and the int8 graph is not served."""
    from export import __main__ as export_main
    from export import pipeline
    from export.int8 import choices
    from training import load_trained, paths

    spec, fp32 = cnn
    monkeypatch.setattr(paths, "REPOSITORY_DIR", tmp_path / "repo")
    monkeypatch.setattr(paths, "REPORTS_DIR", tmp_path / "reports")
    monkeypatch.setattr(choices, "CHOICES_PATH", tmp_path / "choices.json")
    save_choice(MODEL, Int8Choice(calibration_images=64))  # ship: true
    impossible = dataclasses.replace(spec, checks=dataclasses.replace(spec.checks, int8_max_metric_drop=-0.5))
    status, agreement, failure = pipeline._int8_gate(impossible, load_trained(MODEL), fp32, n=200)
    assert "(FAIL)" in status and agreement is not None
    assert failure.startswith(f"model '{MODEL}': INT8 graph misses its gate") and "accuracy" in failure
    assert "\n" not in failure
    assert not layout.model_dir(MODEL + layout.INT8_SUFFIX).exists()  # built, gated, then removed: not served

    # Through `python -m export`: the parity row is kept, the exit is non-zero with that one line.
    summary = pipeline.ExportSummary(name=MODEL, int8=status, int8_agreement=agreement, int8_failure=failure)
    monkeypatch.setattr(export_main, "export_model", lambda name, **kw: summary)
    assert export_main.main([MODEL]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {MODEL}: {failure}"]
    assert json.loads((tmp_path / "reports" / "parity.json").read_text())[MODEL]["int8_failure"] == failure

    # The same choice recorded `ship: false` (measured to miss) is skipped: a note, no failure.
    save_choice(MODEL, Int8Choice(calibration_images=64, ship=False, not_shipped="missed its test-split gate: x"))
    status, agreement, failure = pipeline._int8_gate(impossible, None, fp32)
    assert status.startswith("int8 not shipped") and agreement is None and failure is None


def test_gpu_check_builds_and_times_int8_engines_as_far_as_this_host_goes(cnn, tmp_path, monkeypatch, capsys):
    """``make gpu-check``'s int8 path: the plan (a not-shipped model gets no int8 engine, and says why), and
    the build of the TensorRT QDQ graph's engine; without a GPU the run is a skip naming the reason, with one
    the engine is gated on the int8 agreement rule and timed with the other runners."""
    import argparse

    from export import gpu_check
    from export.int8 import choices
    from export.tensorrt import trt_available

    spec, fp32 = cnn
    monkeypatch.setattr(choices, "CHOICES_PATH", tmp_path / "choices.json")
    save_choice(MODEL, Int8Choice(calibration_images=64))
    plan = gpu_check.engine_plan(spec)
    assert [(r["precision"], r["triton_model"]) for r in plan] == [(p, MODEL) for p in gpu_check.PRECISIONS]
    assert plan[2]["source"].startswith("QDQ int8 graph, tensorrt flavour")
    assert gpu_check.main([MODEL, "--plan", "--precisions", "int8"]) == 0
    assert capsys.readouterr().out.strip() == f"{MODEL}: int8 {MODEL} ({plan[2]['source']})"
    with pytest.raises(SystemExit):
        gpu_check.main([MODEL, "--plan", "--precisions", "int4"])

    if not trt_available():
        pytest.skip("no TensorRT here")
    gated: list[tuple[str, str]] = []
    entry = {"engines_planned": gpu_check.engine_plan(spec, ("int8",)), "engines": {}, "skipped": []}
    runners: dict = {}
    gpu_check._tensorrt(spec, fp32, tmp_path, runners, lambda label, runner, precision: gated.append(
        (label, precision)), entry, argparse.Namespace(precisions=("int8",), engines=None))
    built = entry["engines"]["int8"][MODEL]
    assert built["plan_bytes"] > 0 and built["onnx"].endswith(".int8.tensorrt.onnx")
    if gated:  # a GPU ran it
        assert gated == [(next(iter(runners)), "int8")]
    else:
        assert len(entry["skipped"]) == 1 and "needs a CUDA GPU" in entry["skipped"][0]

    save_choice(MODEL, Int8Choice(ship=False, not_shipped="missed its test-split gate: x"))
    entry = {"engines_planned": gpu_check.engine_plan(spec, ("int8",)), "engines": {}, "skipped": []}
    gpu_check._tensorrt(spec, fp32, tmp_path, {}, None, entry, argparse.Namespace(precisions=("int8",), engines=None))
    assert entry["engines"] == {} and len(entry["skipped"]) == 1
    assert entry["skipped"][0].startswith("TensorRT int8")
    assert entry["skipped"][0].endswith(": int8 not shipped (missed its test-split gate: x)")


@pytest.mark.parametrize("name", ["cnn", "attention_to_scale"])
def test_gate_and_selection_labels_come_from_the_models_data_source(name):
    """The arrays the gate and the probe score against (labels, masks) belong to the very images fed to the
    graphs, for every data source (the multi-scale segmentation split included)."""
    from export.int8.calibration import selection_data
    from export.int8.gate import test_split

    spec = get_spec(name)
    feeds, data = test_split(spec, 4)
    np.testing.assert_array_equal(feeds["image"], data["image"])
    _, sel = training_feeds(spec, BATCH, 4)
    np.testing.assert_array_equal(sel["image"], selection_data(spec, 4)["image"])
