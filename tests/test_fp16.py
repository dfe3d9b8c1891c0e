"""FP16 graphs: conversion keeps the listed ops in fp32, every conversion pass is needed (each test below
fails without its pass), the drift probe finds overflow by measurement, the gate covers every output with
an agreement rule at any rank, and every trained model's FP16 graph agrees with its fp32 torch model."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import helper
from torch import nn

from export.fp16 import (
    Fp16AgreementError,
    Fp16GraphError,
    convert_to_fp16,
    fp16_gate,
    keep_list_sweep,
    kept_op_problems,
    measure,
    passes_without,
    probe_drift,
    probe_model,
    suspects,
    write_report,
)
from export.fp16.__main__ import main
from export.fp16.gate import fp32_graph_paths, reference_outputs
from export.onnx_export import export_onnx
from export.runners import OnnxRuntimeRunner
from tests.conftest import require_checkpoint, require_onnx
from training import paths
from training.feeds import sample_feeds
from training.registry import (
    Dim,
    ExportOptions,
    ModelSpec,
    TensorSpec,
    class_logits,
    get_spec,
    image_input,
    list_models,
)
from training.tasks import output_kind

FLOAT, FLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16


class Affinity(nn.Module):
    """Conv features -> gaussian non-local affinity softmax(x_i . x_j) -> logits, and the affinity itself
    as a second output (a kept op that produces a graph output). ``gain`` scales the features: at 300
    the raw dot products (~1e5) overflow fp16, the failure the keep-list exists for."""

    def __init__(self, gain: float = 1.0):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 16, 3, stride=4, padding=1)
        self.fc = nn.Linear(16, 10)
        self.gain = gain

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = torch.relu(self.conv(x)) * self.gain
        q = f.flatten(2)  # [B, C, N]
        attn = torch.softmax(q.transpose(1, 2) @ q, dim=-1)  # [B, N, N]
        y = (q @ attn.transpose(1, 2)).mean(-1) / self.gain
        return self.fc(y), attn


def grid_features(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Where the digit is: ``conv`` on a 4x4 grid of 12 px cells over the top-left 48 px (every input has
    them), flattened. They differ from image to image, so the argmax does too."""
    return torch.relu(conv(x[:, :, :48, :48])).flatten(1)


class Loud(nn.Module):
    """Classifier weights around 1e5: past fp16's 65504, so an all-fp16 graph clamps them and loses the
    argmax (the converter warns; the gate refuses)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 4, 12, stride=12)
        self.fc = nn.Linear(64, 10)
        nn.init.normal_(self.fc.weight, std=1e5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(grid_features(self.conv, x))


class LoudScales(Loud):
    """Sound logits [N, 10] and loud per-scale logits [N, 3, 10]: only the rank-3 output breaks in fp16."""

    def __init__(self):
        super().__init__()
        nn.init.normal_(self.fc.weight, std=1.0)
        self.scales = nn.Linear(64, 30)
        nn.init.normal_(self.scales.weight, std=1e5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = grid_features(self.conv, x)
        return self.fc(f), self.scales(f).unflatten(1, (3, 10))


def spec_for(name: str, builder, outputs: tuple[TensorSpec, ...], keep: tuple[str, ...] = ()) -> ModelSpec:
    return ModelSpec(name=name, family="test", builder=builder, description="test graph", inputs=(image_input(),),
                     outputs=outputs, export=ExportOptions(fp16_keep_fp32_ops=keep))


def affinity_spec(keep: tuple[str, ...] = ()) -> ModelSpec:
    tokens = Dim("tokens", 144, 256, 576)  # (side / 4) ** 2 for sides 48..96
    return spec_for("affinity_test", Affinity, (class_logits(), TensorSpec("attn", (tokens, tokens), kind="map")), keep)


def loud_spec(keep: tuple[str, ...] = ()) -> ModelSpec:
    return spec_for("loud_test", Loud, (class_logits(),), keep)


def loud_scales_spec(keep: tuple[str, ...] = ()) -> ModelSpec:
    scale_logits = TensorSpec("scale_logits", (3, 10), kind="logits")
    return spec_for("loud_scales_test", LoudScales, (class_logits(), scale_logits), keep)


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    """Small untrained models and their FP32 graphs (exported as `make export` does, without slimming)."""
    d = tmp_path_factory.mktemp("fp16")
    made = {}
    for key, spec, model in [("plain", affinity_spec(), Affinity(1.0)), ("hot", affinity_spec(), Affinity(300.0)),
                             ("loud", loud_spec(), Loud()), ("scales", loud_scales_spec(), LoudScales())]:
        made[key] = (model.eval(), export_onnx(spec, model.eval(), d / f"{key}.onnx", slim=False))
    return made


@pytest.fixture(scope="module")
def racnn(tmp_path_factory):
    """RA-CNN (untrained): GridSample, Range and shape-derived coordinate math, the converter's hard case."""
    spec = get_spec("racnn")
    torch.manual_seed(0)
    model = spec.builder().eval()
    return spec, model, export_onnx(spec, model, tmp_path_factory.mktemp("racnn") / "racnn.onnx")


@pytest.fixture
def artifacts(tmp_path, monkeypatch):
    """The gate writes FP16 graphs to training.layout.fp16_onnx_path: keep them in the test's folder."""
    monkeypatch.setattr(paths, "ARTIFACTS_DIR", tmp_path / "artifacts")
    return tmp_path / "artifacts"


def images(n: int = 64, seed: int = 0) -> dict[str, np.ndarray]:
    return {"image": np.random.default_rng(seed).random((n, 1, 64, 64), dtype=np.float32)}


def types_of(path) -> dict[str, int]:
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    values = [*model.graph.value_info, *model.graph.input, *model.graph.output]
    types = {v.name: v.type.tensor_type.elem_type for v in values}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    return types


# ------------------------------------------------------------------------------------------------ convert


def test_kept_ops_run_in_fp32_and_the_rest_in_fp16(graphs, tmp_path):
    _, fp32 = graphs["plain"]
    out = convert_to_fp16(fp32, tmp_path / "m.onnx", ("MatMul", "Softmax"))
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    types = types_of(out)
    kept = [n for n in model.graph.node if n.op_type in ("MatMul", "Softmax")]
    assert len(kept) == 3
    for node in kept:  # every input and output of a kept op is fp32
        assert all(types[t] == FLOAT for t in [*node.input, *node.output] if t in types), node.name
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    assert types[conv.input[1]] == FLOAT16  # the weights really are fp16: the graph is an FP16 graph
    assert kept_op_problems(model, ("MatMul", "Softmax")) == []
    # I/O stay fp32, including "attn", which a kept Softmax produces
    assert [o.type.tensor_type.elem_type for o in model.graph.output] == [FLOAT, FLOAT]
    assert [i.type.tensor_type.elem_type for i in model.graph.input] == [FLOAT]


def test_without_keep_list_the_same_ops_are_fp16(graphs, tmp_path):
    _, fp32 = graphs["plain"]
    model = onnx.load(str(convert_to_fp16(fp32, tmp_path / "m.onnx", ())))
    problems = kept_op_problems(model, ("MatMul", "Softmax"))
    assert problems and "MatMul" in problems[0]


@pytest.mark.parametrize(("removed", "graph", "keep", "refusal"), [
    pytest.param("keep_ops_without_fp16", "racnn", ("GridSample",), r"Range.*float16",  # Range has no fp16
                 id="keep_ops_without_fp16"),
    pytest.param("drop_value_info", "loud", ("Gemm",), r"Inferred elem type differs",  # kept weights annotated fp16
                 id="drop_value_info"),
    pytest.param("sort_topologically", "plain", (), r"invalid.*expected to have type",  # the Casts come last
                 id="sort_topologically"),
])
def test_each_pass_is_needed(graphs, racnn, tmp_path, removed, graph, keep, refusal):
    """Each repair of the converter's output is needed: without it, ONNX refuses the graph."""
    fp32 = racnn[2] if graph == "racnn" else graphs[graph][1]
    convert_to_fp16(fp32, tmp_path / "all.onnx", keep)
    with pytest.raises(Fp16GraphError, match=refusal):
        convert_to_fp16(fp32, tmp_path / "without.onnx", keep, passes=passes_without(removed))


def test_cast_round_trips_are_removed(graphs, tmp_path):
    """The converter sends a kept MatMul's output (~1e5) through fp16 to the kept Softmax: inf, unless the
    Cast(fp32)(Cast(fp16)(x)) round trip is removed."""
    _, fp32 = graphs["hot"]
    keep = ("MatMul", "Softmax")
    without = convert_to_fp16(fp32, tmp_path / "without.onnx", keep, passes=passes_without("remove_cast_round_trips"))
    assert not np.isfinite(OnnxRuntimeRunner(without).infer(images(16))["logits"]).all()
    good = OnnxRuntimeRunner(convert_to_fp16(fp32, tmp_path / "good.onnx", keep)).infer(images(16))
    assert all(np.isfinite(v).all() for v in good.values())
    model = onnx.load(str(tmp_path / "good.onnx"))
    producers = {o: n for n in model.graph.node for o in n.output}
    casts = [n for n in model.graph.node if n.op_type == "Cast" and n.input[0] in producers]
    assert not [n for n in casts if producers[n.input[0]].op_type == "Cast"]  # no Cast -> Cast pair is left


def test_int_to_float_casts_are_needed_by_tensorrt(racnn, tmp_path):
    """TensorRT computes shape-derived values on the host, in fp32 only: with RA-CNN's int64 -> float Casts
    of feature sizes converted to fp16, the TensorRT-RTX build fails; kept fp32, it builds."""
    from export.tensorrt import EngineBuildError, TensorRTUnavailableError, device_compute_capability, import_trt

    try:
        _, flavour = import_trt()
    except TensorRTUnavailableError as exc:
        pytest.skip(str(exc))
    if flavour != "tensorrt_rtx" or device_compute_capability() is not None:
        pytest.skip("measured with TensorRT-RTX ahead-of-time builds on a host without a GPU")
    from export.tensorrt import build_engine

    spec, _, fp32 = racnn
    keep = spec.export.fp16_keep_fp32_ops
    without = convert_to_fp16(fp32, tmp_path / "without.onnx", keep, passes=passes_without("keep_int_to_float_casts"))
    with pytest.raises(EngineBuildError, match="ShapeHostToDeviceCopy"):
        build_engine(without, spec, tmp_path / "without.plan", archs=("sm86",), precision="fp16", timing_cache=False)
    good = convert_to_fp16(fp32, tmp_path / "good.onnx", keep)
    info = build_engine(good, spec, tmp_path / "good.plan", archs=("sm86",), precision="fp16", timing_cache=False)
    assert info.plan_bytes > 0


def test_a_node_to_keep_needs_a_name(tmp_path):
    """Node-level fp32 choices go by name: an unnamed one is refused, not silently applied to every unnamed node."""
    nodes = [helper.make_node("Shape", ["x"], ["s"], name="shape"), helper.make_node("Cast", ["s"], ["f"], to=FLOAT),
             helper.make_node("Mul", ["x", "f"], ["y"], name="mul")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", FLOAT, [1])],
                              [helper.make_tensor_value_info("y", FLOAT, [1])])
    path = tmp_path / "unnamed.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    with pytest.raises(Fp16GraphError, match="no name"):
        convert_to_fp16(path, tmp_path / "out.onnx")


def test_racnn_fp16_graph_keeps_gridsample_and_coordinates_fp32(racnn, tmp_path):
    spec, model, fp32 = racnn
    out = convert_to_fp16(fp32, tmp_path / "racnn.fp16.onnx", ("GridSample",))
    graph = onnx.load(str(out)).graph
    types = types_of(out)
    grid = [n for n in graph.node if n.op_type == "GridSample"]
    assert grid and all(types[t] == FLOAT for n in grid for t in n.input)
    assert all(types[t] != FLOAT16 for n in graph.node if n.op_type == "Range" for t in n.output)
    feeds = sample_feeds(spec, 32, spec.train.canvas)
    res = measure(spec, reference_outputs(spec, model, feeds), {"racnn": out}, feeds)
    assert all(v == 0 for v in res["nonfinite"].values())
    assert res["max_abs"]["boxes"] < 5e-3
    # every output with an agreement rule is measured, at any rank: scale_logits is [N, 3, 10]
    assert set(res["agreements"]) == {"logits", "scale_logits"}


# ---------------------------------------------------------------------------------------------- probe


def test_probe_finds_the_overflowing_affinity_by_measurement(graphs, tmp_path):
    _, fp32 = graphs["hot"]
    all_fp16 = convert_to_fp16(fp32, tmp_path / "all.onnx", ())
    rows = probe_drift(fp32, all_fp16, images(16))
    worst = rows[0]
    assert worst["overflow"] and worst["op"] == "MatMul" and worst["fp32_max_abs"] > 65504
    assert "MatMul" in suspects(rows)
    # The cnn-only part of the graph is not a suspect: fp16 rounding there stays near fp16's epsilon.
    assert "Conv" not in suspects(rows)
    # The same, per graph of a deployable, with the spec's keep-list fixing it in the shipped graph.
    probed = probe_model(affinity_spec(("MatMul", "Softmax")), fp32, images(16))["affinity_test"]
    assert "MatMul" in probed["suspects"]
    assert all(v["dtype_spec_graph"] == "float32" for n, v in probed["suspects_in_spec_graph"].items()
               if n.startswith("node_matmul"))


def test_keep_list_removes_the_overflow(graphs, artifacts):
    torch_model, fp32 = graphs["hot"]

    def matmul_row(path):
        return next(r for r in probe_drift(fp32, path, images(16)) if r["node"] == "node_matmul")

    assert matmul_row(convert_to_fp16(fp32, artifacts / "a.onnx", ()))["nonfinite_fp16"] > 0
    keep = ("MatMul", "Softmax")
    good = fp16_gate(affinity_spec(keep), torch_model, fp32, n=64)
    assert matmul_row(good["fp16_graphs"]["affinity_test"])["nonfinite_fp16"] == 0  # in fp32: ~1e5 is not inf
    assert good["passed"] and all(v == 0 for v in good["nonfinite"].values())
    assert good["max_abs"]["logits"] < 0.05
    assert good["fp16_graphs"] == {"affinity_test": str(artifacts / "onnx" / "affinity_test.fp16.onnx")}


# ----------------------------------------------------------------------------------------------- gate


def test_gate_refuses_an_fp16_graph_below_the_bar(graphs, artifacts, tmp_path):
    torch_model, fp32 = graphs["loud"]
    with pytest.raises(Fp16AgreementError, match=r"loud_test.*'logits'.*fp16_keep_fp32_ops"):
        fp16_gate(loud_spec(), torch_model, fp32, n=64)
    bad = fp16_gate(loud_spec(), torch_model, fp32, n=64, raise_on_fail=False)
    assert not bad["passed"] and bad["agreement"] < 0.9
    # Keeping the classifier's Gemm in fp32 (its output leaves the graph in fp32) repairs it.
    good = fp16_gate(loud_spec(("Gemm",)), torch_model, {"loud_test": fp32}, n=64)  # does not raise
    assert good["passed"] and good["nonfinite"]["logits"] == 0 and good["agreement"] >= 0.995
    assert good["agreements"] == {"logits": good["agreement"]} and "pass" in good["status"]
    # The sweep measures the same candidates the same way, and the report shows them.
    sweep = keep_list_sweep(loud_spec(("Gemm",)), torch_model, fp32, sample_feeds(loud_spec(), 64), [(), ("Gemm",)])
    rows = [(s["keep_fp32_ops"], s["passed"], s["is_spec"]) for s in sweep]
    assert rows == [([], False, False), (["Gemm"], True, True)]
    md, js = write_report({"loud_test": {"keep_fp32_ops": ["Gemm"], "gate": good, "sweep": sweep}}, tmp_path)
    text = md.read_text()
    assert "| loud_test | Gemm | 64 |" in text and "keep-list sweep" in text and js.exists()


def test_gate_covers_every_output_with_an_agreement_rule_at_any_rank(graphs, artifacts):
    """Per-scale logits [N, 3, 10] are held to the bar too: here they alone break in fp16."""
    torch_model, fp32 = graphs["scales"]
    with pytest.raises(Fp16AgreementError, match=r"loud_scales_test.*'scale_logits'"):
        fp16_gate(loud_scales_spec(), torch_model, fp32, n=64)
    bad = fp16_gate(loud_scales_spec(), torch_model, fp32, n=64, raise_on_fail=False)
    assert bad["agreements"]["logits"] >= 0.995 > bad["agreements"]["scale_logits"] == bad["agreement"]
    # The per-scale Gemm's 1e5 outputs overflow fp16 in the Reshape after it too: keep both in fp32.
    assert fp16_gate(loud_scales_spec(("Gemm", "Reshape")), torch_model, fp32, n=64)["passed"]


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_refuses_an_unknown_model_with_one_line(capsys):
    assert main(["no_such_model"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: unknown model 'no_such_model'")


def test_cli_calls_a_model_without_an_exported_graph_an_error(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(paths, "REPOSITORY_DIR", tmp_path / "empty")
    assert main(["cnn"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: model 'cnn': no exported graph at") and "make export" in err[0]


# -------------------------------------------------------------------------------------- trained models


@pytest.mark.parametrize("name", list_models())
def test_trained_fp16_graph_meets_the_agreement_bar(name, artifacts):
    """The export gate on real test images: every output's agreement >= spec.checks.fp16_min_agreement."""
    from training import load_trained

    spec = get_spec(name)
    for g in spec.deploy_graphs():
        require_onnx(spec.graph_model_name(g))
    require_checkpoint(name)
    res = fp16_gate(spec, load_trained(name), fp32_graph_paths(spec), n=500)  # raises under the bar
    assert all(v >= spec.checks.fp16_agreement(k) for k, v in res["agreements"].items()), res
    one = np.zeros((1, 2, 2), np.float32)
    ruled = {o.name for o in spec.outputs if output_kind(o.kind).agreement(one, one) is not None}
    assert set(res["agreements"]) == ruled
    assert all(v == 0 for v in res["nonfinite"].values())


def test_report_json_merges_model_by_model(tmp_path):
    """A run of one model keeps every other model's entry and the keys it did not redo (a probe, a sweep)."""
    import json

    from export.cli_loop import merge_results

    path = tmp_path / "fp16.json"
    earlier = {"cnn": {"gate": {"passed": True}, "probe": {"x": 1}}, "mhsa": {"gate": {"passed": False}}}
    path.write_text(json.dumps(earlier))
    merged = merge_results(path, {"cnn": {"gate": {"passed": False}}, "racnn": {"gate": {"passed": True}}})
    assert list(merged) == ["cnn", "mhsa", "racnn"]
    assert merged["cnn"] == {"gate": {"passed": False}, "probe": {"x": 1}}
    assert merged["mhsa"] == {"gate": {"passed": False}}
    assert json.loads(path.read_text()) == merged
