"""The attention gallery (serving/gallery.py) and the explorer's bundled samples, which are its images."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from serving import gallery

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "serving" / "explorer" / "samples"


def test_bundled_samples_are_the_gallery_images():
    from PIL import Image

    images = gallery.gallery_images()
    assert len(images) == 8 and len({im.name for im in images}) == 8
    for im in images:
        path = SAMPLES / im.name
        assert path.exists(), f"{path} missing: python -m serving.gallery --write-samples {SAMPLES}"
        a = np.asarray(Image.open(io.BytesIO(im.data)).convert("RGB"), np.int16)
        b = np.asarray(Image.open(path).convert("RGB"), np.int16)
        assert a.shape == b.shape and np.abs(a - b).max() <= 2, im.name  # JPEG encoders may differ by a step


def _row(**outputs: tuple[str, np.ndarray]) -> gallery.Row:
    return gallery.Row("m", "a model", np.zeros((2, 1, 8, 8), np.float32), {k: v for k, (_, v) in outputs.items()},
                       {k: kind for k, (kind, _) in outputs.items()}, dict.fromkeys(outputs, ""),
                       [str(i) for i in range(3)])


def test_panels_follow_the_output_kinds():
    row = _row(logits=("logits", np.array([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]])),
               parts=("map", np.random.rand(2, 4, 4, 4)), sal=("saliency", np.random.rand(2, 1, 8, 8)),
               box=("boxes", np.zeros((2, 3, 4))), seg=("segmentation", np.random.rand(2, 3, 8, 8)),
               other=("tensor", np.zeros((2, 5))))
    assert gallery.panels(row) == [("input", "", 0), *[("map", "parts", c) for c in range(4)], ("map", "sal", 0),
                                   ("mask", "seg", 0)]
    assert gallery.prediction(row, 0).startswith("1 (") and gallery.prediction(row, 1).startswith("0 (")


def test_measured_figures_are_read_from_the_study_and_weights_records(tmp_path):
    reports, weights = tmp_path / "reports", tmp_path / "weights"
    reports.mkdir()
    weights.mkdir()
    (reports / "study_x.json").write_text(json.dumps({"runs": {
        "a": {"model": "m", "arm": "served", "seed": 0, "metrics": {"pointing": 0.8123, "iou_3": 0.5}},
        "b": {"model": "m@seed1", "arm": "served", "seed": 1, "metrics": {"pointing": 0.7}},
        "c": {"model": "other", "arm": "x", "seed": 0, "metrics": {"pointing": 0.1}}}}))
    (weights / "m.json").write_text(json.dumps({"metrics": {"box_err": 0.05, "steps": 1500}}))
    lines = gallery.measured("m", reports, weights)
    assert len(lines) == 3
    assert "seed 0" in lines[0] and "pointing 81.23%" in lines[0] and "iou_3" not in lines[0]
    assert "seed 1" in lines[1] and "70.00%" in lines[1]
    assert "box_err 5.00%" in lines[2] and "steps 1500" in lines[2]
    assert gallery.measured("nobody", reports, weights) == []


def test_gallery_draws_real_models_and_reports_their_study_figures(tmp_path):
    models = gallery.gallery_models(["racnn", "attention_to_scale", "feedback"])
    if len(models) < 3:
        pytest.skip("exported graphs missing: run `make export` first")
    from PIL import Image

    r = gallery.build(models, tmp_path / "gallery.png", threads=1, progress=False)
    img = Image.open(r["png"])
    assert img.width > 600 and img.height > 600
    a = np.asarray(img.convert("L"), np.float64)
    assert a.std() > 10  # drawn, not blank
    md = r["md"].read_text()
    for m in models:
        assert f"## {m}" in md
    # A figure the feedback study measured, as read from its JSON (never a number typed into the generator).
    study = json.loads((ROOT / "reports" / "study_feedback.json").read_text())
    run = next(v for v in study["runs"].values() if v["model"] == "feedback")
    assert f"pointing_feedback {run['metrics']['pointing_feedback']:.2%}" in md
