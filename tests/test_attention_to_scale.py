"""Attention to Scale: the per-pixel softmax merge by hand, sizes from the runtime shape, the multi-scale data,
deep supervision, the drawn outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.data import MULTI_SIZE, make_split
from training.models.attention_to_scale import (
    DIGIT_WEIGHT,
    NUM_CLASSES,
    SCALES,
    AttentionToScale,
    deeply_supervised_loss,
    merge_scales,
    variant_spec,
)
from training.registry import get_spec
from training.tasks import PALETTE, output_kind
from training.train import data_feeds, training_forward


def test_attention_merge_matches_a_hand_computation():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(2, 3, 4, 5, 6))  # [B, S, K, h, w]
    logits = rng.normal(size=(2, 3, 5, 6))  # attention logits [B, S, h, w]
    w = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    want = np.zeros((2, 4, 5, 6))
    for b in range(2):
        for y in range(5):
            for x in range(6):
                want[b, :, y, x] = sum(w[b, s, y, x] * scores[b, s, :, y, x] for s in range(3))
    t = torch.from_numpy(scores)
    got = merge_scales(t, torch.softmax(torch.from_numpy(logits), 1), "attention").numpy()
    np.testing.assert_allclose(got, want, rtol=1e-12)
    np.testing.assert_allclose(merge_scales(t, None, "average").numpy(), scores.mean(1), rtol=1e-12)
    np.testing.assert_allclose(merge_scales(t, None, "max").numpy(), scores.max(1), rtol=1e-12)
    with pytest.raises(ValueError, match="unknown merge 'sum'"):
        merge_scales(t, None, "sum")


@pytest.mark.parametrize("size", [(64, 64), (80, 80), (50, 77), (96, 61)])
@pytest.mark.parametrize("merge", ["attention", "average", "max"])
def test_outputs_follow_the_input_size_and_weights_are_a_softmax_over_scales(size, merge):
    torch.manual_seed(0)
    m = AttentionToScale(merge=merge).eval()
    with torch.no_grad():
        logits, weights = m(torch.rand(2, 1, *size))
    assert logits.shape == (2, NUM_CLASSES, *size) and weights.shape == (2, len(SCALES), *size)
    torch.testing.assert_close(weights.sum(1), torch.ones(2, *size))
    assert (weights >= 0).all()
    if merge == "attention":  # the weights depend on the pixel, the pooling ones do not
        assert float(weights.std()) > 1e-4
    else:
        torch.testing.assert_close(weights, torch.full_like(weights, 1 / len(SCALES)))


def test_single_scale_is_the_shared_network_alone():
    torch.manual_seed(0)
    m = AttentionToScale(scales=(1.0,)).eval()
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        logits, weights = m(x)
        _, z = m.fcn(x)
    assert m.attention is None and weights.shape == (1, 1, 64, 64) and bool((weights == 1).all())
    torch.testing.assert_close(logits, torch.nn.functional.interpolate(z, size=(64, 64), mode="bilinear"))
    with pytest.raises(ValueError, match=r"start with 1\.0"):
        AttentionToScale(scales=(0.5, 1.0))


def test_deep_supervision_adds_a_loss_per_scale():
    spec = get_spec("attention_to_scale")
    torch.manual_seed(0)
    model = spec.builder().train()
    data = make_split("train", 4, 64, 0, "multiscale")
    batch = {k: torch.from_numpy(v) for k, v in data.items()}
    outs = training_forward(spec, model, data_feeds(spec, batch))
    assert outs["scale_logits"].shape == (4, len(SCALES), NUM_CLASSES, 64, 64)
    loss, log = deeply_supervised_loss(outs, batch)
    weight = torch.tensor([1.0] + [DIGIT_WEIGHT] * (NUM_CLASSES - 1))
    per_scale = [float(torch.nn.functional.cross_entropy(outs["scale_logits"][:, i], batch["mask"].long(),
                                                         weight=weight)) for i in range(len(SCALES))]
    assert log["loss"] == pytest.approx(log["merged"] + sum(per_scale), rel=1e-5)
    loss.backward()  # every part trains, the attention head included
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in model.parameters())


def test_multiscale_split_varies_digit_size_and_count():
    d = make_split("train", 400, 64, 0, "multiscale")
    classes_per_image = [len(np.unique(m)) - 1 for m in d["mask"]]
    assert min(classes_per_image) >= 1 and max(classes_per_image) >= 3
    heights = (d["box"][:, 3] - d["box"][:, 1]) * 64  # the largest digit's box
    assert heights.min() < 16 and heights.max() > 44, (heights.min(), heights.max())
    assert MULTI_SIZE == (10, 56)
    again = make_split("train", 400, 64, 0, "multiscale")
    assert all(np.array_equal(d[k], again[k]) for k in d)  # deterministic
    digits = make_split("train", 400, 64, 0)
    assert not np.array_equal(d["image"], digits["image"])  # its own stream, not the one-digit source's
    with pytest.raises(ValueError, match="unknown data source 'coco'"):
        make_split("train", 4, source="coco")


def test_variants_are_told_apart_by_their_fingerprints():
    from training.fingerprint import weights_fingerprint

    fps = {weights_fingerprint(variant_spec(m, name="a2s")) for m in ("attention", "average", "max")}
    assert len(fps | {weights_fingerprint(variant_spec(scales=(1.0,), name="a2s"))}) == 4


def test_drawn_mask_and_maps():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(NUM_CLASSES, 6, 7))
    rgb = output_kind("segmentation").render(logits)
    assert rgb.shape == (6, 7, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb, PALETTE[logits.argmax(0)])
    maps = output_kind("map").render(rng.random((3, 6, 7)))
    assert maps.shape == (6, 3 * 7 + 2 * 2, 3)
    assert output_kind("logits").render(logits[:, 0, 0]) is None
