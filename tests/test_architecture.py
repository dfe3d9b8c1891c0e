"""The architecture's contracts on toy models: named tensors end to end (a two-input model), multi-graph
deployables (an ensemble and a BLS pipeline) served by the real Triton, one comparator, output kinds."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from export.compare import Tolerance, compare
from export.onnx_export import export_onnx
from export.parity import ParityError, check_parity
from export.runners import OnnxRuntimeRunner, TorchRunner
from serving import repository as rep
from serving.client import PROTOCOLS, Client
from serving.server import TritonServer, free_ports
from tests.conftest import stop_in_background
from training import layout
from training.feeds import sample_feeds
from training.registry import (
    Composition,
    Dim,
    GraphSpec,
    ModelSpec,
    Step,
    TensorSpec,
    class_logits,
    image_input,
)
from training.tasks import output_kind

# ------------------------------------------------------------------------------------------- toy models


class TwoInput(nn.Module):
    """Logits from an image, and the score of a class the request names (an int64 input)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, image: torch.Tensor, target: torch.Tensor):
        logits = self.fc(torch.relu(self.conv(image)).mean(dim=(2, 3)))
        return logits, logits.gather(1, target)


TWO_INPUT = ModelSpec(
    name="toy_two_input", family="toy", builder=TwoInput, description="toy: image + target class",
    inputs=(image_input(), TensorSpec("target", (1,), "int64", "tensor", value_range=(0, 9))),
    outputs=(class_logits(), TensorSpec("score", (1,), "float32", "tensor")),
)


class Features(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)

    def forward(self, image):
        return (torch.relu(nn.functional.max_pool2d(self.conv(image), 2)),)


class Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 10)

    def forward(self, feat):
        return (self.fc(feat.mean(dim=(2, 3))),)


class TwoStage(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.features, self.head = Features(), Head()

    def forward(self, image):
        return self.head(self.features(image)[0])


def _pipeline_spec(kind: str) -> ModelSpec:
    image = image_input()
    half = Dim("half_height", 24, 32, 48), Dim("half_width", 24, 32, 48)
    feat = TensorSpec("feat", (8, *half), "float32", "map")
    return ModelSpec(
        name=f"toy_{kind}", family="toy", builder=TwoStage, description=f"toy two-graph pipeline ({kind})",
        inputs=(image,), outputs=(class_logits(),),
        graphs=(GraphSpec("features", (image,), (feat,), module=lambda m: m.features),
                GraphSpec("head", (feat,), (class_logits(),), module=lambda m: m.head)),
        composition=Composition(kind, (Step("features", {"image": "image"}, {"feat": "stage1"}),
                                       Step("head", {"feat": "stage1"}, {"logits": "logits"}))),
    )


TOYS = [TWO_INPUT, _pipeline_spec("ensemble"), _pipeline_spec("bls")]


def _export(spec: ModelSpec, repo) -> dict:
    model = spec.builder().eval()
    files = {}
    for g in spec.deploy_graphs():
        files[g.name] = export_onnx(spec, model, layout.onnx_path(spec.graph_model_name(g), repo), slim=False, graph=g)
    return files


@pytest.fixture(scope="module")
def toy_repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("toy-repo")
    files = {spec.name: _export(spec, repo) for spec in TOYS}
    for spec in TOYS:
        rep.write_model(spec, "cpu", repo)
    return repo, files


# ------------------------------------------------------------------------------------------------ tests


def test_two_input_graph_has_both_named_inputs_with_their_dynamic_axes(toy_repo):
    import onnx

    _, files = toy_repo
    proto = onnx.load(files["toy_two_input"]["toy_two_input"])
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    assert dims == {"image": ["batch", 1, "height", "width"], "target": ["batch", 1]}
    assert [o.name for o in proto.graph.output] == ["logits", "score"]


@pytest.mark.parametrize("spec", TOYS, ids=lambda s: s.name)
def test_parity_compares_the_deployed_path_with_the_torch_model(toy_repo, spec):
    _, files = toy_repo
    result = check_parity(spec, spec.builder().eval(), files[spec.name])
    assert not result.failures and result.worst < 1e-5
    assert len(result.cases) == len(spec.checks.parity_batches) * len(spec.checks.parity_sides)


def test_parity_catches_a_composed_path_wired_wrong(toy_repo):
    """The head graph fed from the wrong model's features must fail the gate, naming the output."""
    _, files = toy_repo
    spec = _pipeline_spec("ensemble")
    other = TwoStage()
    with torch.no_grad():
        other.head.fc.weight.mul_(-1)
    with pytest.raises(ParityError, match="output 'logits'"):
        check_parity(spec, other.eval(), files[spec.name])


def test_configs_compose_the_graphs(toy_repo):
    repo, _ = toy_repo
    ens = rep.parse_config(layout.config_path("toy_ensemble", repo).read_text())
    assert ens.platform == "ensemble"
    assert [s.model_name for s in ens.ensemble_scheduling.step] == ["toy_ensemble_features", "toy_ensemble_head"]
    assert dict(ens.ensemble_scheduling.step[0].output_map) == {"feat": "stage1"}
    bls = rep.parse_config(layout.config_path("toy_bls", repo).read_text())
    assert bls.backend == "python" and "steps" in bls.parameters
    assert layout.onnx_path("toy_bls_head", repo).exists()
    two = rep.parse_config(layout.config_path("toy_two_input", repo).read_text())
    assert [(i.name, list(i.dims)) for i in two.input] == [("image", [1, -1, -1]), ("target", [1])]
    assert two.parameters["input_bounds"].string_value == '{"image": {"1": [48, 96], "2": [48, 96]}}'


@pytest.fixture(scope="module")
def toy_server(toy_repo):
    repo, _ = toy_repo
    http, grpc, metrics = free_ports(3)
    # Its own server, not a shared one: the toy specs' repository.
    server = TritonServer(repo, http_port=http, grpc_port=grpc, metrics_port=metrics, require_all=True).start()
    yield server
    stop_in_background(server, "test_architecture.py toy_server")


@pytest.mark.server
@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("spec", TOYS, ids=lambda s: s.name)
def test_served_answers_equal_torch(toy_server, spec, protocol):
    url = toy_server.grpc_url if protocol == "grpc" else toy_server.http_url
    feeds = sample_feeds(spec, 5, 72)  # not the export size: dynamic axes through every graph
    with Client(spec.name, protocol, url) as client:
        got = client.infer(feeds)
    ref = TorchRunner.for_spec(spec, spec.builder().eval()).infer(feeds)
    c = compare(ref, got, spec.outputs, Tolerance(1e-4, 1.0), where=f"{spec.name} over {protocol}")
    assert c.ok, c.failures


@pytest.mark.server
def test_input_outside_the_spec_bounds_is_refused_naming_the_range(toy_server):
    feeds = sample_feeds(TWO_INPUT, 1, 64)
    feeds["image"] = np.zeros((1, 1, 8, 8), np.float32)
    with Client(TWO_INPUT.name, "grpc", toy_server.grpc_url) as client:
        with pytest.raises(Exception, match=r"48\.\.96"):
            client.infer(feeds, validate=False)  # the server's own check
        with pytest.raises(Exception, match=r"48\.\.96"):
            client.infer(feeds)  # the client's, from the config's input_bounds
    assert toy_server.health([TWO_INPUT.name]) == {TWO_INPUT.name: None}


def test_comparator_applies_each_kind_agreement_rule():
    rng = np.random.default_rng(0)
    outputs = (TensorSpec("scale_logits", (3, 10), kind="logits"), TensorSpec("mask", (11, 4, 4), kind="segmentation"),
               TensorSpec("boxes", (2, 4), kind="boxes"))
    ref = {"scale_logits": rng.normal(size=(6, 3, 10)), "mask": rng.normal(size=(6, 11, 4, 4)),
           "boxes": rng.uniform(size=(6, 2, 4))}
    got = {k: v.copy() for k, v in ref.items()}
    assert compare(ref, got, outputs, Tolerance(1e-4, 1.0)).ok
    flipped = got["scale_logits"].copy()
    flipped[0, 2] = -flipped[0, 2]  # one scale of one sample answers differently
    c = compare(ref, got | {"scale_logits": flipped}, outputs, Tolerance(None, 1.0))
    assert c.outputs["scale_logits"].agreement == pytest.approx(17 / 18)
    assert c.failures == ["output 'scale_logits': logits agreement 0.9444 < 1"]
    moved = got["mask"].copy()
    moved[0, :, 0, 0] = moved[0, ::-1, 0, 0]
    seg = compare(ref, got | {"mask": moved}, outputs, Tolerance(None, 1.0))
    assert seg.outputs["mask"].agreement == pytest.approx(1 - 1 / 96)
    boxes = compare(ref, got | {"boxes": got["boxes"] + 2e-4}, outputs, Tolerance(1e-4, 1.0))
    assert boxes.outputs["boxes"].agreement is None and "max abs error 0.0002 > 0.0001" in boxes.failures[0]
    missing = compare(ref, {k: v for k, v in got.items() if k != "boxes"}, outputs, Tolerance(1e-4, 1.0))
    assert missing.failures == ["output 'boxes': missing from the runner's outputs"]


def test_onnxruntime_runner_names_missing_inputs(toy_repo):
    _, files = toy_repo
    runner = OnnxRuntimeRunner(files["toy_two_input"]["toy_two_input"])
    with pytest.raises(KeyError, match="target"):
        runner.infer({"image": np.zeros((1, 1, 64, 64), np.float32)})


def test_output_kinds_present_any_rank():
    assert output_kind("logits").present(np.array([0.0, 3.0, 1.0]))["prediction"] == 1
    assert output_kind("logits").present(np.array([[0.0, 3.0], [5.0, 1.0]]))["prediction"] == [1, 0]
    seg = output_kind("segmentation").present(np.stack([np.ones((2, 3)), np.zeros((2, 3))]))
    assert seg == {"shape": [2, 3], "pixels_per_class": {0: 6}}
    assert output_kind("map").present(np.eye(3)[None])["peak_yx"] == [[0, 0]]
    assert output_kind("no such kind").name == "tensor"


def test_client_and_repository_generator_load_no_torch():
    code = "import sys, serving.client, serving.repository, training, training.tasks; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("module", ["training", "export", "export.fp16", "export.engines", "export.gpu_check",
                                    "bench.ort_vs_torch", "export.verify"])
def test_every_cli_rejects_an_unknown_model_with_one_line(module):
    out = subprocess.run([sys.executable, "-m", module, "no_such_model"], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown model 'no_such_model'" in lines[0], out.stderr


def test_the_readme_model_is_one_file_that_exports_and_passes_parity(tmp_path, monkeypatch):
    """The README's "Adding a model" example, run as written: it registers a spec that every stage takes."""
    import re

    from training.paths import REPO_ROOT

    code = re.search(r"```python\n(# training/models/tiny.py\n.*?)```", (REPO_ROOT / "README.md").read_text(), re.S)
    assert code, "README: the 'Adding a model' example is missing"
    registered: list[ModelSpec] = []
    monkeypatch.setattr("training.registry.register_model", registered.append)  # keep the real registry clean
    exec(compile(code.group(1), "README.md", "exec"), {"__name__": "readme_tiny"})
    (spec,) = registered
    model = spec.builder().eval()
    path = export_onnx(spec, model, tmp_path / "tiny.onnx")
    assert not check_parity(spec, model, path).failures
    repo = tmp_path / "repo"
    layout.onnx_path(spec.name, repo).parent.mkdir(parents=True)
    layout.onnx_path(spec.name, repo).write_bytes(path.read_bytes())
    written = {p.name for p in rep.write_model(spec, "cpu", repo)}
    assert written == {"config.pbtxt", "model.py", "labels.txt"}  # labels: Triton's classification extension
