"""FP16 graphs: conversion keeps the listed ops in fp32, the drift probe finds overflow by measurement,
and every trained model's FP16 graph agrees with its fp32 torch model (the export gate)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from export.fp16 import (
    Fp16AgreementError,
    check_fp16_agreement,
    convert_to_fp16,
    fp16_agreement,
    kept_op_problems,
    probe_drift,
    suspects,
)
from tests.conftest import require_checkpoint, require_onnx
from training.registry import ExportOptions, ModelSpec, TensorSpec, class_logits, get_spec, image_input, list_models

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


class Loud(nn.Module):
    """Classifier weights around 1e5: past fp16's 65504, so an all-fp16 graph clamps them and loses the
    argmax (the converter warns; the gate refuses)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 16, 3, stride=4, padding=1)
        self.fc = nn.Linear(16, 10)
        nn.init.normal_(self.fc.weight, std=3e4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def affinity_spec(keep: tuple[str, ...] = ()) -> ModelSpec:
    return ModelSpec(
        name="affinity_test", family="test", builder=Affinity, description="test graph",
        inputs=(image_input(),), outputs=(class_logits(), TensorSpec("attn", (-1, -1))),
        export=ExportOptions(fp16_keep_fp32_ops=keep),
    )


def export_tiny(model: nn.Module, path, output_names=("logits", "attn")):
    if not path.exists():
        batch = torch.export.Dim("batch", min=1, max=1024)
        torch.onnx.export(
            model.eval(), (torch.rand(2, 1, 64, 64),), str(path), dynamo=True, opset_version=18,
            external_data=False, input_names=["image"], output_names=list(output_names),
            dynamic_shapes=({0: batch},), verbose=False,
        )
    return path


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    d = tmp_path_factory.mktemp("fp16")
    return {
        "plain": (Affinity(1.0), export_tiny(Affinity(1.0), d / "plain.onnx")),
        "hot": (Affinity(300.0), export_tiny(Affinity(300.0), d / "hot.onnx")),
        "loud": (Loud(), export_tiny(Loud(), d / "loud.onnx", ("logits",))),
    }


def images(n: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 1, 64, 64), dtype=np.float32)


def types_of(path) -> dict[str, int]:
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    values = [*model.graph.value_info, *model.graph.input, *model.graph.output]
    types = {v.name: v.type.tensor_type.elem_type for v in values}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    return types


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
    # I/O stay fp32, including "attn", which a kept Softmax produces (the converter would leave it fp16)
    assert [o.type.tensor_type.elem_type for o in model.graph.output] == [FLOAT, FLOAT]
    assert [i.type.tensor_type.elem_type for i in model.graph.input] == [FLOAT]


def test_without_keep_list_the_same_ops_are_fp16(graphs, tmp_path):
    _, fp32 = graphs["plain"]
    model = onnx.load(str(convert_to_fp16(fp32, tmp_path / "m.onnx", ())))
    problems = kept_op_problems(model, ("MatMul", "Softmax"))
    assert problems and "MatMul" in problems[0]


def test_probe_finds_the_overflowing_affinity_by_measurement(graphs, tmp_path):
    _, fp32 = graphs["hot"]
    all_fp16 = convert_to_fp16(fp32, tmp_path / "all.onnx", ())
    rows = probe_drift(fp32, all_fp16, images(16))
    worst = rows[0]
    assert worst["overflow"] and worst["op"] == "MatMul" and worst["fp32_max_abs"] > 65504
    assert "MatMul" in suspects(rows)
    # The cnn-only part of the graph is not a suspect: fp16 rounding there stays near fp16's epsilon.
    assert "Conv" not in suspects(rows)


def test_keep_list_removes_the_overflow(graphs, tmp_path):
    torch_model, fp32 = graphs["hot"]
    x = images(16)

    def matmul_row(path):
        return next(r for r in probe_drift(fp32, path, x) if r["node"] == "node_matmul")

    assert matmul_row(convert_to_fp16(fp32, tmp_path / "a.onnx", ()))["nonfinite_fp16"] > 0
    keep = ("MatMul", "Softmax")
    kept = convert_to_fp16(fp32, tmp_path / "k.onnx", keep)
    assert matmul_row(kept)["nonfinite_fp16"] == 0  # computed in fp32: ~1e5 is no longer inf
    good = fp16_agreement(affinity_spec(keep), torch_model, kept, images(64))
    assert good["passed"] and all(v["nonfinite"] == 0 for v in good["outputs"].values())
    assert good["outputs"]["logits"]["max_abs_err"] < 0.05


def test_gate_refuses_an_fp16_graph_below_the_bar(graphs, tmp_path):
    torch_model, fp32 = graphs["loud"]
    spec = ModelSpec(name="loud_test", family="test", builder=Loud, description="test graph",
                     inputs=(image_input(),), outputs=(class_logits(),))
    x = images(64)
    bad = fp16_agreement(spec, torch_model, convert_to_fp16(fp32, tmp_path / "a.onnx", ()), x)
    assert not bad["passed"] and bad["top1_agreement"] < 0.5
    with pytest.raises(Fp16AgreementError, match=r"loud_test.*fp16_keep_fp32_ops"):
        check_fp16_agreement(spec, bad)
    # Keeping the classifier's Gemm in fp32 (its output leaves the graph in fp32) repairs it.
    good = fp16_agreement(spec, torch_model, convert_to_fp16(fp32, tmp_path / "k.onnx", ("Gemm",)), x)
    assert good["passed"] and good["outputs"]["logits"]["nonfinite"] == 0
    check_fp16_agreement(spec, good)  # does not raise


def test_racnn_fp16_graph_keeps_gridsample_and_coordinates_fp32(tmp_path):
    """RA-CNN has GridSample, Range and shape-derived coordinate math: the converter's hard case."""
    from export.onnx_export import export_onnx

    spec = get_spec("racnn")
    torch.manual_seed(0)
    model = spec.builder().eval()
    fp32 = export_onnx(spec, model, tmp_path / "racnn.onnx")
    out = convert_to_fp16(fp32, tmp_path / "racnn.fp16.onnx", ("GridSample",))
    graph = onnx.load(str(out)).graph
    types = types_of(out)
    grid = [n for n in graph.node if n.op_type == "GridSample"]
    assert grid and all(types[t] == FLOAT for n in grid for t in n.input)
    assert all(types[t] != FLOAT16 for n in graph.node if n.op_type == "Range" for t in n.output)
    x = images(32)
    res = fp16_agreement(spec, model, out, x)
    assert all(v["nonfinite"] == 0 for v in res["outputs"].values())
    assert res["outputs"]["boxes"]["max_abs_err"] < 5e-3


@pytest.mark.parametrize("name", list_models())
def test_trained_fp16_graph_meets_the_agreement_bar(name, tmp_path):
    """The export gate on real test images: top-1 agreement >= spec.checks.fp16_min_top1_agreement."""
    from training import load_trained
    from training.data import test_images

    require_checkpoint(name)
    fp32 = require_onnx(name)
    spec = get_spec(name)
    out = convert_to_fp16(fp32, tmp_path / f"{name}.fp16.onnx", spec.export.fp16_keep_fp32_ops)
    x, labels = test_images(500, canvas=spec.train.canvas)
    res = fp16_agreement(spec, load_trained(name), out, x, labels)
    assert res["top1_agreement"] >= spec.checks.fp16_min_top1_agreement, res
    assert all(v["nonfinite"] == 0 for v in res["outputs"].values())

