"""TensorRT (export.tensorrt): parse errors name the node, profiles come from each named input's Dims, the
loaders compose into engines, FP16 graphs reach TensorRT with the kept ops in fp32, engines carry metadata,
and a mismatched engine or a shape outside the profile is refused.

These run in CI on CPU with TensorRT-RTX (ahead-of-time builds); the GPU tests at the end skip with a
reason unless a CUDA GPU and TensorRT are both present."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from export.tensorrt import (
    CreateConfig,
    EngineBuildError,
    EngineBytesFromNetwork,
    EngineMismatchError,
    NetworkFromOnnxPath,
    ProfileError,
    SaveEngine,
    TensorRTParseError,
    TensorRTRunner,
    TensorRTUnavailableError,
    build_engine,
    check_engine_compatible,
    check_network_inputs,
    device_compute_capability,
    engine_info_or_none,
    import_trt,
    metadata_path,
    network_layer_precisions,
    normalize_cc,
    parse_onnx,
    profile_shapes,
    read_engine_info,
    sha256,
    trt_available,
)
from tests.conftest import require_onnx
from training import layout
from training.paths import REPO_ROOT
from training.registry import (
    Dim,
    ExportOptions,
    GraphSpec,
    ModelSpec,
    TensorSpec,
    class_logits,
    get_spec,
    image_input,
    list_models,
)

pytestmark = pytest.mark.skipif(not trt_available(), reason="neither tensorrt nor tensorrt_rtx is installed")


class Tiny(nn.Module):
    """Conv -> gaussian affinity softmax -> logits: the ops the FP16 keep-list is about, in 0.1 MB."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 8, 3, stride=4, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = torch.relu(self.conv(x)).flatten(2)  # [B, C, N]
        attn = torch.softmax(q.transpose(1, 2) @ q, dim=-1)
        return self.fc((q @ attn.transpose(1, 2)).mean(-1))


def tiny_spec(**export) -> ModelSpec:
    return ModelSpec(
        name="tiny", family="test", builder=Tiny, description="test graph",
        inputs=(image_input(),), outputs=(class_logits(),),
        export=ExportOptions(**({"fp16_keep_fp32_ops": ("MatMul", "Softmax")} | export)),
    )


class TwoInput(nn.Module):
    """Logits from an image, and the score of a class each request names (a per-sample int64 input)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, image: torch.Tensor, target: torch.Tensor):
        logits = self.fc(torch.relu(self.conv(image)).mean(dim=(2, 3)))
        return logits, logits.gather(1, target)


SIDES = Dim("height", 40, 56, 80), Dim("width", 32, 64, 72)
TWO_INPUT = ModelSpec(
    name="toy_two_input", family="test", builder=TwoInput, description="image + target class",
    inputs=(TensorSpec("image", (1, *SIDES), "float32", "image"),
            TensorSpec("target", (1,), "int64", "tensor", value_range=(0, 9))),
    outputs=(class_logits(), TensorSpec("score", (1,), "float32", "tensor")),
    export=ExportOptions(profile_batch=(2, 4, 16)),
)


@pytest.fixture(scope="module")
def two_input_onnx(tmp_path_factory):
    from export.onnx_export import export_onnx

    path = tmp_path_factory.mktemp("trt2") / "model.onnx"
    return export_onnx(TWO_INPUT, TWO_INPUT.builder().eval(), path, slim=False)


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("trt") / "tiny.onnx"
    dims = {0: torch.export.Dim("batch", min=1, max=1024), 2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC}
    torch.onnx.export(Tiny().eval(), (torch.rand(2, 1, 64, 64),), str(path), dynamo=True, opset_version=18,
                      external_data=False, input_names=["image"], output_names=["logits"],
                      dynamic_shapes=(dims,), verbose=False)
    return path


def bad_graph(path, op: str, domain: str, opset: int = 18):
    """image -> Relu -> <op> -> out, with a node name to look for in the error."""
    nodes = [helper.make_node("Relu", ["image"], ["r"], name="relu0")]
    if op == "AffineGrid":  # a real ONNX op (opset 20) that TensorRT does not import
        theta = helper.make_tensor("theta", TensorProto.FLOAT, [1, 2, 3], [1, 0, 0, 0, 1, 0])
        size = helper.make_tensor("size", TensorProto.INT64, [4], [1, 1, 8, 8])
        nodes.append(helper.make_node("AffineGrid", ["theta", "size"], ["out"], name="apn/affine_grid"))
        inits = [theta, size]
    else:
        nodes.append(helper.make_node(op, ["r"], ["out"], name="apn/crop_zoom", domain=domain))
        inits = []
    graph = helper.make_graph(nodes, "bad", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 1, 8, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], inits)
    imports = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    onnx.save(helper.make_model(graph, opset_imports=imports), str(path))
    return path


# --------------------------------------------------------------------------------------------- parse


def test_import_trt_reports_flavour_and_refuses_unknown():
    trt, flavour = import_trt()
    assert flavour in ("tensorrt", "tensorrt_rtx") and trt.__version__
    with pytest.raises(ValueError, match="unknown TensorRT flavour"):
        import_trt("tensorrt-llm")


def test_import_trt_missing_flavour_says_what_failed():
    try:
        import tensorrt  # noqa: F401
    except Exception:
        with pytest.raises(TensorRTUnavailableError, match=r"tensorrt: .*Error"):
            import_trt("tensorrt")
    else:
        pytest.skip("full TensorRT is installed here")


def test_parse_reports_layers_and_io(tiny_onnx):
    report = parse_onnx(tiny_onnx)
    assert report.num_layers > 5
    assert report.inputs == [{"name": "image", "shape": [-1, 1, -1, -1], "dtype": "float32"}]
    assert report.outputs[0]["name"] == "logits" and report.outputs[0]["dtype"] == "float32"
    assert report.onnx_ops["MatMul"] == 2 and report.onnx_ops["Softmax"] == 1


def test_parse_error_names_custom_node(tmp_path):
    with pytest.raises(TensorRTParseError) as err:
        parse_onnx(bad_graph(tmp_path / "custom.onnx", "CropZoom", "attnzoo"))
    msg = str(err.value)
    assert "'apn/crop_zoom'" in msg and "CropZoom" in msg and "custom.onnx" in msg
    assert err.value.errors[0]["node_name"] == "apn/crop_zoom" and err.value.errors[0]["operator"] == "CropZoom"


def test_parse_error_names_unsupported_standard_op(tmp_path):
    with pytest.raises(TensorRTParseError, match=r"'apn/affine_grid' \(op AffineGrid\)"):
        parse_onnx(bad_graph(tmp_path / "affine.onnx", "AffineGrid", "", opset=20))


def test_parse_missing_file_is_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="make export"):
        parse_onnx(tmp_path / "nope.onnx")


# --------------------------------------------------------------------------------------------- profiles


def test_profile_shapes_come_from_each_named_inputs_dims():
    image = TensorSpec("image", (1, Dim("height", 40, 72, 128), Dim("width", 32, 64, 96)))
    target = TensorSpec("target", (), "int64")  # one int per sample: only the batch ranges
    mask = TensorSpec("mask", (3, 5), "float32")  # fixed per-sample axes stay fixed
    graph = GraphSpec("g", (image, target, mask), (class_logits(),))
    assert profile_shapes(graph, (2, 16, 32)) == {
        "image": ((2, 1, 40, 32), (16, 1, 72, 64), (32, 1, 128, 96)),
        "target": ((2,), (16,), (32,)),
        "mask": ((2, 3, 5), (16, 3, 5), (32, 3, 5)),
    }
    spec = tiny_spec(profile_batch=(1, 8, 64))  # a spec's inputs, as a graph's
    assert profile_shapes(spec, spec.export.profile_batch) == {"image": ((1, 1, 48, 48), (8, 1, 64, 64),
                                                                         (64, 1, 96, 96))}


def test_profile_refuses_dynamic_axes_without_a_range():
    graph = GraphSpec("g", (image_input(), TensorSpec("mask", (8, 3))), (class_logits(),))
    network = {"image": (-1, 1, -1, -1), "mask": (-1, -1, 3)}  # the graph left mask's axis 1 dynamic
    with pytest.raises(ProfileError, match=r"graph 'g': input 'mask' axis 1 is dynamic in the graph \[-1, -1, 3\] "
                                           r"but the spec gives it no range \(it fixes it to 8\).*Dim"):
        profile_shapes(graph, (1, 8, 64), network)
    assert profile_shapes(graph, (1, 8, 64), {"image": (-1, 1, -1, -1), "mask": (-1, 8, 3)})["mask"][2] == (64, 8, 3)
    with pytest.raises(ValueError, match="ordered"):
        profile_shapes(tiny_spec(), (8, 1, 64))
    with pytest.raises(ValueError, match="named more than once"):
        profile_shapes([image_input(), image_input()], (1, 8, 64))


def test_profile_must_fit_the_parsed_network():
    shapes = profile_shapes(tiny_spec(), (1, 8, 64))
    check_network_inputs(shapes, {"image": (-1, 1, -1, -1)})
    with pytest.raises(ProfileError, match=r"'image' axis 2 is fixed to 64 in the graph.*48\.\.96.*froze"):
        check_network_inputs(shapes, {"image": (-1, 1, 64, 64)})
    with pytest.raises(ProfileError, match=r"the spec lacks \['target'\]"):
        check_network_inputs(shapes, {"image": (-1, 1, -1, -1), "target": (-1, 1)})
    with pytest.raises(ProfileError, match="rank 3"):
        check_network_inputs(shapes, {"image": (-1, -1, -1)})


def test_two_input_profile_builds_and_flags_shapes_outside_it(two_input_onnx, tmp_path):
    """A profile from each named input's Dims (an image and a fixed-shape int64 class input) lets TensorRT
    build the engine; its sidecar then refuses shapes outside that profile, input by input."""
    info = build_engine(two_input_onnx, TWO_INPUT, tmp_path / "model.plan", archs=("sm86",))
    assert info.profile == {
        "image": {"min": [2, 1, 40, 32], "opt": [4, 1, 56, 64], "max": [16, 1, 80, 72]},
        "target": {"min": [2, 1], "opt": [4, 1], "max": [16, 1]},
    }
    assert [(t["name"], t["dtype"]) for t in info.inputs] == [("image", "float32"), ("target", "int64")]
    assert [t["name"] for t in info.outputs] == ["logits", "score"]
    assert info.model == "toy_two_input" and info.graph == "toy_two_input"
    assert info.shape_problems({"image": (3, 1, 40, 72), "target": (3, 1)}) == []
    problems = info.shape_problems({"image": (17, 1, 81, 64), "target": (1, 1)})
    assert problems == [
        "input 'image' shape [17, 1, 81, 64]: axis 0 is 17, outside 2..16, axis 2 is 81, outside 40..80 "
        "(the engine's profile)",
        "input 'target' shape [1, 1]: axis 0 is 1, outside 2..16 (the engine's profile)",
    ]
    assert info.shape_problems({"image": (2, 1, 40, 40)}) == ["input 'target' is missing"]
    assert "not an input" in info.shape_problems({"image": (2, 1, 40, 40), "target": (2, 1), "x": (1,)})[0]


def test_a_graph_that_froze_a_dynamic_axis_is_refused_before_building(tmp_path):
    """Exported with only the batch dynamic, the graph cannot serve the spec's 48..96 sides: said in one line."""
    path = tmp_path / "static.onnx"
    torch.onnx.export(Tiny().eval(), (torch.rand(2, 1, 64, 64),), str(path), dynamo=True, opset_version=18,
                      external_data=False, input_names=["image"], output_names=["logits"],
                      dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},), verbose=False)
    with pytest.raises(ProfileError, match=r"static\.onnx: graph 'tiny': input 'image' axis 2 is fixed to 64"):
        build_engine(path, tiny_spec(), tmp_path / "model.plan", archs=("sm86",))
    assert not (tmp_path / "model.plan").exists()


# --------------------------------------------------------------------------------------------- engines


def test_build_engine_writes_plan_and_metadata(tiny_onnx, tmp_path):
    spec = tiny_spec()
    plan = tmp_path / "tiny" / "1" / "model.plan"
    info = build_engine(tiny_onnx, spec, plan, archs=("sm86", "sm89"))
    meta = json.loads((tmp_path / "tiny" / "1" / "model.plan.json").read_text())
    trt, flavour = import_trt()
    assert plan.stat().st_size == meta["plan_bytes"] > 10_000
    assert meta["flavour"] == flavour and meta["trt_version"] == trt.__version__
    assert meta["compute_capabilities"] == ["8.6", "8.9"] and meta["precision"] == "fp32"
    assert meta["profile"] == {"image": {"min": [1, 1, 48, 48], "opt": [8, 1, 64, 64], "max": [64, 1, 96, 96]}}
    assert meta["onnx_sha256"] == sha256(tiny_onnx) and meta["plan_sha256"] == sha256(plan)
    assert meta["tf32"] is False and meta["built_at"]
    if flavour == "tensorrt_rtx" and device_compute_capability() is None:
        assert meta["aot"] is True and meta["triton_loadable"] is False and meta["timing_cache"] is None
    assert meta["model"] == "tiny" and meta["graph"] == "tiny"
    assert read_engine_info(plan) == info
    assert "sm86,sm89" in info.label


def test_mismatched_engine_is_refused(tiny_onnx, tmp_path):
    plan = tmp_path / "model.plan"
    info = build_engine(tiny_onnx, tiny_spec(), plan, archs=("sm86",))
    assert check_engine_compatible(plan, "8.6", info.trt_version) == info
    assert check_engine_compatible(plan, (8, 6), info.trt_version, info.flavour) == info
    with pytest.raises(EngineMismatchError, match=r"targets sm86, this GPU is sm90"):
        check_engine_compatible(plan, "sm90", info.trt_version)
    with pytest.raises(EngineMismatchError, match=rf"built by TensorRT {info.trt_version}, this runtime is 10\.5\.0"):
        check_engine_compatible(plan, "8.6", "10.5.0")
    with pytest.raises(EngineMismatchError, match="make engines"):
        check_engine_compatible(plan, "8.6", info.trt_version, flavour="tensorrt" if info.flavour != "tensorrt"
                                else "tensorrt_rtx")
    (tmp_path / "model.plan.json").unlink()
    with pytest.raises(EngineMismatchError, match=r"no model\.plan\.json"):
        check_engine_compatible(plan, "8.6", info.trt_version)


def test_fp16_graph_reaches_tensorrt_with_kept_ops_in_fp32(tiny_onnx, tmp_path):
    from export.fp16 import convert_to_fp16

    fp16 = convert_to_fp16(tiny_onnx, tmp_path / "tiny.fp16.onnx", ("MatMul", "Softmax"))
    model = onnx.load(str(fp16))
    kept = {n.name for n in model.graph.node if n.op_type in ("MatMul", "Softmax")}
    layers = network_layer_precisions(fp16)
    assert kept and kept <= set(layers)
    for name in kept:  # TensorRT's own view of the strongly typed network
        assert set(layers[name]["inputs"]) == {"FLOAT"} and layers[name]["outputs"] == ["FLOAT"], name
    convs = [v for v in layers.values() if v["type"] == "CONVOLUTION"]
    assert convs and all(v["outputs"] == ["HALF"] for v in convs)  # the rest really is fp16
    info = build_engine(fp16, tiny_spec(), tmp_path / "fp16.plan", archs=("sm86",), precision="fp16")
    assert info.precision == "fp16" and info.fp16_style == "graph" and info.kept_fp32_ops == ["MatMul", "Softmax"]
    assert info.outputs[0]["dtype"] == "float32"  # fp32 I/O: same Triton config as the fp32 engine


def test_fp16_engine_from_an_fp32_graph_converts_on_the_fly(tiny_onnx, tmp_path):
    info = build_engine(tiny_onnx, tiny_spec(), tmp_path / "fp16.plan", archs=("sm86",), precision="fp16")
    assert info.fp16_style == "graph" and info.onnx_sha256 == sha256(tiny_onnx)


def test_builder_refuses_what_it_cannot_do(tiny_onnx, tmp_path):
    trt, flavour = import_trt()
    if flavour == "tensorrt_rtx":
        with pytest.raises(EngineBuildError, match="cannot target sm90"):
            build_engine(tiny_onnx, tiny_spec(), tmp_path / "a.plan", archs=("sm90",))
    if not hasattr(trt.BuilderFlag, "FP16"):
        with pytest.raises(EngineBuildError, match="strongly typed only"):
            build_engine(tiny_onnx, tiny_spec(), tmp_path / "b.plan", archs=("sm86",), precision="fp16",
                         fp16_style="flag")
    with pytest.raises(ValueError, match="precision"):
        build_engine(tiny_onnx, tiny_spec(), tmp_path / "c.plan", precision="int4")
    with pytest.raises(EngineBuildError, match="QDQ graph"):  # int8 comes from Q/DQ nodes (export.int8)
        build_engine(tiny_onnx, tiny_spec(), tmp_path / "c.plan", archs=("sm86",), precision="int8")
    assert not (tmp_path / "a.plan").exists() and not (tmp_path / "b.plan").exists()


def test_normalize_cc_accepts_common_spellings():
    assert {normalize_cc(x) for x in ("sm86", "SM86", "8.6", 86, (8, 6), "sm_86")} == {"8.6"}
    assert normalize_cc("sm120") == "12.0"
    with pytest.raises(ValueError, match=r"sm86 or 8\.6"):
        normalize_cc("ampere")


def test_engine_info_or_none_reads_metadata(tiny_onnx, tmp_path):
    """What the repository generator asks before serving a plan: its sidecar, or None when it cannot vouch."""
    plan = layout.plan_path("tiny", tmp_path)
    assert engine_info_or_none(plan) is None  # no plan
    info = build_engine(tiny_onnx, tiny_spec(), plan, archs=("sm86",))
    found = engine_info_or_none(plan)
    assert found == info and found.triton_loadable == (info.flavour == "tensorrt")
    metadata_path(plan).write_text("{not json")
    assert engine_info_or_none(plan) is None
    metadata_path(plan).unlink()
    assert engine_info_or_none(plan) is None  # a plan without metadata


def test_loaders_compose_lazily_into_the_same_engine(tiny_onnx, tmp_path):
    """Nothing runs until the outermost loader is called; composed by hand they build what build_engine builds."""
    network = NetworkFromOnnxPath(tmp_path / "missing.onnx")  # not parsed yet: no error
    with pytest.raises(FileNotFoundError, match="make export"):
        network()
    spec = tiny_spec()
    reference = build_engine(tiny_onnx, spec, tmp_path / "a.plan", archs=("sm86",))
    config = CreateConfig(profiles=lambda shapes: profile_shapes(spec, spec.export.profile_batch, shapes),
                          archs=("sm86",))
    info = SaveEngine(EngineBytesFromNetwork(NetworkFromOnnxPath(tiny_onnx), config), tmp_path / "b.plan",
                      model="tiny")()
    assert info.profile == reference.profile and info.compute_capabilities == ["8.6"]
    assert info.plan_sha256 == reference.plan_sha256  # builds are deterministic
    with pytest.raises(ProfileError, match=r"inputs \['image'\] are dynamic, and no profile was given"):
        EngineBytesFromNetwork(NetworkFromOnnxPath(tiny_onnx), CreateConfig(archs=("sm86",)))()


def test_runner_needs_a_gpu_and_says_so(tiny_onnx, tmp_path):
    if device_compute_capability() is not None:
        pytest.skip("a CUDA GPU is visible: the GPU tests below run the engine")
    plan = tmp_path / "model.plan"
    build_engine(tiny_onnx, tiny_spec(), plan, archs=("sm86",))
    with pytest.raises(TensorRTUnavailableError, match="needs a CUDA GPU"):
        TensorRTRunner(plan)


# --------------------------------------------------------------------------------------------- exported models


@pytest.mark.parametrize("name", list_models())
def test_exported_model_parses_and_builds_fp32_and_fp16(name, tmp_path):
    """CI's TensorRT gate: every exported graph and its FP16 graph parse, and build ahead of time."""
    from export.fp16 import convert_to_fp16

    spec = get_spec(name)
    archs = None if device_compute_capability() else ("sm86",)
    for g in spec.deploy_graphs():
        fp32 = require_onnx(spec.graph_model_name(g))
        fp16 = convert_to_fp16(fp32, tmp_path / f"{g.name}.fp16.onnx", spec.export.fp16_keep_fp32_ops)
        parse_onnx(fp32)
        parse_onnx(fp16)
        for precision, path in (("fp32", fp32), ("fp16", fp16)):
            info = build_engine(path, spec, tmp_path / g.name / precision / "model.plan", archs=archs,
                                precision=precision, graph=g)
            assert info.plan_bytes > 0 and set(info.profile) == {t.name for t in g.inputs}
            assert all(p["max"][0] == spec.export.profile_batch[2] for p in info.profile.values())


def test_engines_cli_builds_aot_and_never_deploys_them(tmp_path):
    """`python -m export.engines` on a CPU host: AOT engines under artifacts/engines, none in the
    model repository, and a report that says so."""
    from export.onnx_export import export_onnx

    _, flavour = import_trt()
    if flavour != "tensorrt_rtx" or device_compute_capability() is not None:
        pytest.skip("checks the CPU-host (TensorRT-RTX, no GPU) behaviour")
    repo, art, rep = tmp_path / "repo", tmp_path / "artifacts", tmp_path / "reports"
    spec = get_spec("cnn")
    torch.manual_seed(0)
    export_onnx(spec, spec.builder().eval(), layout.onnx_path("cnn", repo), slim=False)
    env = os.environ | {"ATTNZOO_REPOSITORY": str(repo), "ATTNZOO_ARTIFACTS": str(art), "ATTNZOO_REPORTS": str(rep)}
    proc = subprocess.run([sys.executable, "-m", "export.engines", "cnn", "nonlocal_dot", "--archs", "sm86,sm89"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "Ahead-of-time TensorRT-RTX builds for sm86, sm89" in out and "NOT deployable" in out
    assert "nonlocal_dot" in out and "no exported graph" in out  # skipped, with the reason
    assert "model.plan: not written" in out
    for precision in ("fp32", "fp16"):
        meta = json.loads((art / "engines" / "cnn" / precision / "model.plan.json").read_text())
        assert meta["compute_capabilities"] == ["8.6", "8.9"] and meta["aot"] is True
    assert not layout.plan_path("cnn", repo).exists()
    report = (rep / "engines.md").read_text()
    assert "| cnn | ok" in report and "NOT deployable" in report


@pytest.mark.parametrize("module", ["export.engines", "export.gpu_check"])
def test_clis_reject_an_unknown_model_in_one_line(module, capsys):
    import importlib

    assert importlib.import_module(module).main(["cnn", "no_such_model"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: unknown model 'no_such_model'"), err


@pytest.mark.slow
def test_gpu_check_smoke_runs_on_cpu(tmp_path):
    """The GPU script's own path (runners, parity gate, latency table, report) without a GPU."""
    env = os.environ | {"ATTNZOO_REPOSITORY": str(tmp_path / "repo"), "ATTNZOO_REPORTS": str(tmp_path / "rep")}
    cmd = [sys.executable, "-m", "export.gpu_check", "cnn", "--device", "cpu", "--untrained",
           "--images", "32", "--iters", "2", "--batches", "1,8"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "rep" / "gpu_check.json").read_text())
    cnn = report["models"]["cnn"]
    assert cnn["parity"]["torch eager fp32 (cpu)"]["passed"]
    assert any(k.startswith("onnxruntime") and v["passed"] for k, v in cnn["parity"].items())
    ort = next(v for k, v in cnn["parity"].items() if k.startswith("onnxruntime"))
    assert set(ort["sides"]) == {str(s) for s in get_spec("cnn").checks.parity_sides}  # every size checked
    assert set(ort["max_abs"]) == {"logits"}  # per named output, from the one comparator
    assert set(next(iter(cnn["latency"].values()))) == {"1", "8"}
    assert any("TensorRT" in s for s in cnn["skipped"])  # says what it skipped
    assert "| torch eager fp32 (cpu) |" in (tmp_path / "rep" / "gpu_check.md").read_text()


# --------------------------------------------------------------------------------------------- GPU

needs_gpu = pytest.mark.skipif(device_compute_capability() is None, reason="no CUDA GPU visible to torch")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engine_matches_torch_on_gpu(tiny_onnx, tmp_path, precision):
    from export.compare import Tolerance, compare

    spec = tiny_spec()
    try:
        build_engine(tiny_onnx, spec, tmp_path / "model.plan", precision=precision)
    except (EngineBuildError, TensorRTUnavailableError) as exc:
        pytest.skip(f"this TensorRT cannot build for this GPU: {exc}")
    runner = TensorRTRunner(tmp_path / "model.plan")
    x = np.random.default_rng(0).random((16, 1, 64, 64), dtype=np.float32)
    with torch.inference_mode():
        ref = {"logits": Tiny().eval()(torch.from_numpy(x)).numpy()}
    got = runner.infer({"image": x})
    tol = Tolerance(spec.checks.trt_fp32_max_abs, None) if precision == "fp32" else Tolerance(None, 0.9)
    result = compare(ref, got, spec.outputs, tol)
    assert result.ok, result.failures
    assert np.isfinite(got["logits"]).all()


@pytest.mark.gpu
@needs_gpu
def test_two_input_engine_runs_every_named_input_and_output(two_input_onnx, tmp_path):
    from export.compare import Tolerance, compare
    from export.runners import TorchRunner
    from training.feeds import sample_feeds

    try:
        build_engine(two_input_onnx, TWO_INPUT, tmp_path / "model.plan")
    except (EngineBuildError, TensorRTUnavailableError) as exc:
        pytest.skip(f"this TensorRT cannot build for this GPU: {exc}")
    runner = TensorRTRunner(tmp_path / "model.plan")
    assert runner.input_names == ("image", "target") and set(runner.output_names) == {"logits", "score"}
    feeds = {k: v[:8] for k, v in sample_feeds(TWO_INPUT, 8, side=48).items()}
    ref = TorchRunner.for_spec(TWO_INPUT, TWO_INPUT.builder().eval()).infer(feeds)
    result = compare(ref, runner.infer(feeds), TWO_INPUT.outputs, Tolerance(TWO_INPUT.checks.trt_fp32_max_abs, None))
    assert result.ok, result.failures
    with pytest.raises(ValueError, match=r"input 'image' shape \[8, 1, 96, 96\]: axis 2 is 96, outside 40\.\.80"):
        runner.infer(sample_feeds(TWO_INPUT, 8, side=96))


@pytest.mark.gpu
@needs_gpu
def test_engine_for_another_gpu_is_refused_on_load(tiny_onnx, tmp_path):
    from export.tensorrt import load_engine

    plan = tmp_path / "model.plan"
    try:
        build_engine(tiny_onnx, tiny_spec(), plan)
    except (EngineBuildError, TensorRTUnavailableError) as exc:
        pytest.skip(f"this TensorRT cannot build for this GPU: {exc}")
    meta = json.loads((tmp_path / "model.plan.json").read_text())
    (tmp_path / "model.plan.json").write_text(json.dumps(meta | {"compute_capabilities": ["1.0"]}))
    with pytest.raises(EngineMismatchError, match="targets sm10"):
        load_engine(plan)
