"""Fine-tuning's loading code (training.finetune) on files the project makes: the shipped cnn weights by name, the
same weights re-saved in timm's checkpoint layout (wrapped, DDP's ``module.`` prefix), another family's weights,
files that are not state dicts; the first conv's channel adaptation; the fine-tuning parameter groups; and the
documented command end to end on a small generated tree."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from training.finetune import BODY_LR_SCALE, FinetuneError, adapt_input_conv, initializer
from training.registry import create_model

ROOT = Path(__file__).resolve().parent.parent
CLASSES = 4


def _fresh() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("cnn", in_chans=3, num_classes=CLASSES)


def _shipped() -> dict[str, torch.Tensor]:
    from training.checkpoints import checkpoint_path

    return torch.load(checkpoint_path("cnn"), map_location="cpu", weights_only=True)


def test_grayscale_kernel_tiled_to_rgb_answers_a_gray_photo_alike():
    w = torch.randn(8, 1, 3, 3)
    gray = torch.rand(2, 1, 16, 16)
    rgb_w = adapt_input_conv(w, 3)
    assert rgb_w.shape == (8, 3, 3, 3)
    torch.testing.assert_close(F.conv2d(gray.expand(-1, 3, -1, -1), rgb_w), F.conv2d(gray, w))


def test_rgb_kernel_summed_to_grayscale_answers_a_gray_image_alike():
    w = torch.randn(8, 3, 3, 3)
    gray = torch.rand(2, 1, 16, 16)
    torch.testing.assert_close(F.conv2d(gray, adapt_input_conv(w, 1)), F.conv2d(gray.expand(-1, 3, -1, -1), w))


def test_shipped_weights_by_name_load_with_adapted_stem_and_new_head():
    model = _fresh()
    head_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("fc.")}
    apply, report = initializer("cnn", CLASSES)
    apply(model)
    src, got = _shipped(), model.state_dict()
    assert report.new == ["fc.weight", "fc.bias"]
    assert report.adapted == ["stem.0.0.weight: 1 -> 3 input channels"]
    for k in report.loaded:
        torch.testing.assert_close(got[k], src[k], rtol=0, atol=0)
    torch.testing.assert_close(got["stem.0.0.weight"], src["stem.0.0.weight"].repeat(1, 3, 1, 1) / 3)
    for k, v in head_before.items():  # the head keeps its fresh initialisation
        torch.testing.assert_close(got[k], v, rtol=0, atol=0)
    assert set(report.loaded) | {"stem.0.0.weight", *report.new} == set(src)  # every tensor accounted for


def test_timm_layout_file_loads_like_the_name(tmp_path: Path):
    path = tmp_path / "cnn_timm.pth.tar"
    torch.save({"epoch": 3, "arch": "cnn", "state_dict": {f"module.{k}": v for k, v in _shipped().items()}}, path)
    a, b = _fresh(), _fresh()
    initializer("cnn", CLASSES)[0](a)
    initializer(str(path), CLASSES)[0](b)
    for k, v in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[k], v, rtol=0, atol=0)


def test_another_familys_weights_are_refused_naming_the_tensor():
    apply, _ = initializer("racnn", CLASSES)
    with pytest.raises(FinetuneError, match=r"--init racnn: has no tensor 'stem\.0\.0\.weight'"):
        apply(_fresh())


def test_another_width_is_refused_naming_the_tensor(tmp_path: Path):
    state = _shipped()
    state["head.0.0.weight"] = torch.zeros(48, 32, 3, 3)
    torch.save(state, tmp_path / "narrow.pt")
    apply, _ = initializer(str(tmp_path / "narrow.pt"), CLASSES)
    with pytest.raises(FinetuneError, match=r"'head\.0\.0\.weight' has shape \(48, 32, 3, 3\), the model needs"):
        apply(_fresh())


@pytest.mark.parametrize("content", [b"not a checkpoint", None])
def test_not_a_state_dict_is_one_line(tmp_path: Path, content: bytes | None):
    path = tmp_path / "bad.pt"
    if content is None:
        torch.save([torch.zeros(1)], path)
    else:
        path.write_bytes(content)
    with pytest.raises(FinetuneError) as e:
        initializer(str(path), CLASSES)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_unknown_name_is_one_line():
    with pytest.raises(FinetuneError, match="neither a file nor a registered model"):
        initializer("no_such_model", CLASSES)


def test_fine_tuning_groups_train_the_head_faster():
    model = _fresh()
    apply, _ = initializer("cnn", CLASSES)
    groups = apply(model)(model, list(model.parameters()), 3e-3)
    head = {id(p) for p in model.fc.parameters()}
    by_lr = {g["lr"]: {id(p) for p in g["params"]} for g in groups}
    assert by_lr[3e-3] == head
    assert by_lr[3e-3 * BODY_LR_SCALE] == {id(p) for p in model.parameters()} - head


@pytest.mark.slow
def test_documented_command_fine_tunes_a_tree(tmp_path: Path):
    from training.sample_trees import write_folder_tree

    tmp = tmp_path
    tree = write_folder_tree(tmp / "tree", per_class=8)
    env = {**os.environ, "ATTNZOO_USER_MODELS": str(tmp / "models"), "ATTNZOO_ARTIFACTS": str(tmp / "artifacts")}
    cmd = [sys.executable, "-m", "training", "cnn", "--data", str(tree), "--name", "shapes_ft", "--init", "cnn",
           "--steps", "4", "--train-size", "128"]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    rec = json.loads((tmp / "models" / "shapes_ft.json").read_text())
    assert rec["init"]["source"] == "cnn" and rec["init"]["new_head"] == ["fc.weight", "fc.bias"]
    assert rec["init"]["adapted"] and rec["init"]["sha256"]
    refused = subprocess.run([sys.executable, "-m", "training", "cnn", "--init", "cnn"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "--data" in refused.stderr
