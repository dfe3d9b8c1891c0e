"""Export CLI, graph checks and the parity gate: on untrained models (always) and trained ones (after make export)."""

import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from export.onnx_export import ExportError, check_graph, export_onnx
from export.parity import ParityError, check_parity
from export.runtime import ort_session
from tests.conftest import require_onnx
from training import create_model, get_spec, list_models, load_trained
from training.paths import REPO_ROOT


def _cli(*args, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_cli_unknown_model_is_one_line():
    r = _cli("export", "resnet9000")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"error: unknown model 'resnet9000'; known models: {', '.join(list_models())}"]


def test_cli_missing_checkpoint_names_the_file(tmp_path):
    r = _cli("export", "cnn", "--no-train", env_extra={"ATTNZOO_WEIGHTS": str(tmp_path),
                                                          "ATTNZOO_ARTIFACTS": str(tmp_path),
                                                          "ATTNZOO_REPOSITORY": str(tmp_path / "repo"),
                                                          "ATTNZOO_REPORTS": str(tmp_path / "reports")})
    assert r.returncode == 1
    assert f"no checkpoint for model 'cnn' at {tmp_path / 'cnn.pt'}" in r.stderr
    assert "Traceback" not in r.stderr


def test_corrupt_onnx_file_is_named(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"\x08\x07 this is not a protobuf")
    with pytest.raises(RuntimeError, match=f"onnxruntime cannot load {bad}"):
        ort_session(bad)
    with pytest.raises(ExportError, match=f"ONNX check failed for {bad}"):
        check_graph(bad, get_spec("cnn").deploy_graphs()[0])
    with pytest.raises(FileNotFoundError, match="ONNX file not found"):
        ort_session(tmp_path / "missing.onnx")


@pytest.fixture(scope="module")
def untrained_cnn(tmp_path_factory):
    spec, model = get_spec("cnn"), create_model("cnn").eval()
    path = export_onnx(spec, model, tmp_path_factory.mktemp("cnn") / "model.onnx")
    return spec, model, path


def test_export_has_named_dynamic_axes_and_metadata(untrained_cnn):
    spec, _, path = untrained_cnn
    proto = onnx.load(path)
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 1, "height", "width"]
    assert [o.name for o in proto.graph.output] == list(spec.output_names)
    assert {p.key: p.value for p in proto.metadata_props}["attnzoo.model"] == "cnn"
    assert next(o.version for o in proto.opset_import if o.domain == "") == spec.export.opset


def test_parity_gate_passes_then_catches_a_tampered_graph(untrained_cnn, tmp_path):
    spec, model, path = untrained_cnn
    result = check_parity(spec, model, path)
    assert not result.failures and result.worst <= spec.checks.fp32_max_abs
    assert {(c["batch"], c["side"]) for c in result.cases} == {(b, s) for b in (1, 8, 64) for s in (64, 80)}
    proto = onnx.load(path)
    gemm = next(n for n in proto.graph.node if n.op_type == "Gemm")  # the classifier layer
    init = next(t for t in proto.graph.initializer if t.name == gemm.input[2])
    arr = numpy_helper.to_array(init).copy()
    arr[3] += 0.5  # one bias off: the gate must notice
    init.CopyFrom(numpy_helper.from_array(arr, init.name))
    tampered = tmp_path / "tampered.onnx"
    onnx.save(proto, tampered)
    with pytest.raises(ParityError, match=r"parity gate failed for .*tampered.onnx: cnn at batch \d+, \d+x\d+: "
                                          r"output 'logits': max abs error"):
        check_parity(spec, model, tampered)


def test_float64_reference_is_the_exact_result_and_gates_at_the_strict_bound(untrained_cnn, tmp_path):
    """With ``float64_reference`` the graph is also held to ``fp32_max_abs`` against torch in float64, even
    where a looser per-output bound applies against torch in float32."""
    import copy
    import dataclasses

    from export.runners import TorchRunner

    spec, model, path = untrained_cnn
    x = {"image": np.random.default_rng(0).random((2, 1, 64, 64), dtype=np.float32)}
    exact = TorchRunner.for_spec(spec, model, float64=True).infer(x)["logits"]
    with torch.no_grad():
        want = copy.deepcopy(model).double()(torch.from_numpy(x["image"]).double())[0].float().numpy()
    np.testing.assert_array_equal(exact, want)
    checks = dataclasses.replace(spec.checks, float64_reference=True, output_max_abs={"logits": 1.0})
    result = check_parity(dataclasses.replace(spec, checks=checks), model, path)
    assert set(result.max_abs_vs_float64) == {"logits"} and result.max_abs_vs_float64["logits"] <= 1e-4
    assert all("max_abs_vs_float64" in c for c in result.cases)
    proto = onnx.load(path)  # off by 1e-3 in one bias: within the loose float32 bound, not the float64 one
    gemm = next(n for n in proto.graph.node if n.op_type == "Gemm")
    init = next(t for t in proto.graph.initializer if t.name == gemm.input[2])
    arr = numpy_helper.to_array(init).copy()
    arr[3] += 1e-3
    init.CopyFrom(numpy_helper.from_array(arr, init.name))
    onnx.save(proto, tmp_path / "off.onnx")
    with pytest.raises(ParityError, match=r"vs torch float64 at batch \d+, \d+x\d+: output 'logits'"):
        check_parity(dataclasses.replace(spec, checks=checks), model, tmp_path / "off.onnx")


@pytest.mark.parametrize("name", list_models())
def test_trained_graph_parity(name):
    """The deployed graphs vs their torch reference on real test images, every batch size and input side."""
    from export.pipeline import graph_paths

    spec = get_spec(name)
    for g in spec.deploy_graphs():
        require_onnx(spec.graph_model_name(g))
    result = check_parity(spec, load_trained(name), graph_paths(spec), raise_on_fail=False)
    assert not result.failures
    assert set(result.max_abs) == set(spec.output_names)
    for output, err in result.max_abs.items():
        assert err <= spec.checks.max_abs(output), f"{name} {output}: max abs error {err:.2e}"
    assert all(a == 1.0 for a in result.agreement.values()), result.agreement


@pytest.mark.parametrize("name", list_models())
def test_trained_model_meets_its_bars(name):
    from training.checkpoints import load_record
    from training.train import bar_failures

    rec = load_record(name)
    assert bar_failures(get_spec(name), rec["metrics"]) == [] == rec["bar_failures"], rec


def test_dynamic_batch_runs_in_onnxruntime(untrained_cnn):
    _, model, path = untrained_cnn
    sess = ort_session(path)
    for b in (1, 5):
        x = np.random.default_rng(b).random((b, 1, 72, 56), dtype=np.float32)
        with torch.no_grad():
            np.testing.assert_allclose(sess.run(None, {"image": x})[0], model(torch.from_numpy(x))[0].numpy(),
                                       atol=1e-5)


def test_verify_cli_names_a_corrupt_file(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"garbage")
    r = _cli("export.verify", "cnn", "--onnx", str(bad))
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: ONNX check failed for {bad}")


def test_parity_gate_holds_every_racnn_output_to_1e_4():
    """No output has a relaxed tolerance: an error of 2e-4 on any one of them (the per-scale logits
    included) fails the gate, naming that output; 5e-5 everywhere passes."""
    from export.compare import Tolerance, compare

    spec = get_spec("racnn")
    tol = Tolerance(spec.checks.fp32_max_abs, 1.0)
    ref = {"logits": np.zeros((4, 10), np.float32), "scale_logits": np.zeros((4, 3, 10), np.float32),
           "boxes": np.zeros((4, 2, 4), np.float32)}
    ref["logits"][:, 0] = ref["scale_logits"][:, :, 0] = 1.0  # a clear top-1
    assert compare(ref, {k: v + 5e-5 for k, v in ref.items()}, spec.outputs, tol).ok
    for name in spec.output_names:
        got = {k: v.copy() for k, v in ref.items()}
        got[name] += 2e-4
        assert compare(ref, got, spec.outputs, tol).failures == [f"output {name!r}: max abs error 0.0002 > 0.0001"]
