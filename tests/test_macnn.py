"""MA-CNN: the grouping loss terms against a hand computation, the k-means channel init, the part formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training import create_model, get_spec
from training.models.macnn import (
    MACNN,
    MARGIN,
    cluster_channels,
    distance_loss,
    diversity_loss,
    init_grouping_from_clusters,
    part_metrics,
    variant_spec,
)


def _hand_maps() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.random((2, 3, 4, 5))


def test_distance_loss_matches_a_hand_computation():
    maps = _hand_maps()
    b, p, h, w = maps.shape
    total = 0.0
    for n in range(b):
        for i in range(p):
            ty, tx = np.unravel_index(maps[n, i].argmax(), (h, w))
            ty, tx = (ty + 0.5) / h, (tx + 0.5) / w
            for y in range(h):
                for x in range(w):
                    total += maps[n, i, y, x] * (((y + 0.5) / h - ty) ** 2 + ((x + 0.5) / w - tx) ** 2)
    got = distance_loss(torch.from_numpy(maps)).item()
    assert got == pytest.approx(total / maps.size, rel=1e-12)


def test_diversity_loss_matches_a_hand_computation():
    maps = _hand_maps()
    b, p, h, w = maps.shape
    total = 0.0
    for n in range(b):
        for i in range(p):
            for y in range(h):
                for x in range(w):
                    other = max(maps[n, k, y, x] for k in range(p) if k != i)
                    total += maps[n, i, y, x] * (other - MARGIN)
    assert diversity_loss(torch.from_numpy(maps)).item() == pytest.approx(total / maps.size, rel=1e-12)


def test_diversity_is_lower_for_maps_on_different_places():
    apart = torch.zeros(1, 2, 4, 4)
    apart[0, 0, 0, 0] = apart[0, 1, 3, 3] = 1.0
    together = torch.zeros(1, 2, 4, 4)
    together[0, :, 0, 0] = 1.0
    assert diversity_loss(apart) < diversity_loss(together)
    # A compact map is closer to its peak than a spread one.
    spread = torch.full((1, 1, 4, 4), 0.5)
    spread[0, 0, 0, 0] = 1.0
    assert distance_loss(apart[:, :1]) < distance_loss(spread)


def test_kmeans_groups_channels_by_peak_position():
    # Six channels: three peak near the top-left in every image, three near the bottom-right.
    rng = np.random.default_rng(0)
    n = 20
    tl = 0.2 + 0.02 * rng.standard_normal((3, n, 2))
    br = 0.8 + 0.02 * rng.standard_normal((3, n, 2))
    peaks = np.concatenate([tl, br]).reshape(6, -1)
    labels = cluster_channels(peaks, 2)
    assert len(set(labels[:3])) == 1 and len(set(labels[3:])) == 1 and labels[0] != labels[3]


def test_grouping_init_outputs_the_cluster_indicator_and_maps_follow_the_formula():
    torch.manual_seed(0)
    model = MACNN(num_parts=2).eval()
    labels = np.array([0, 1] * 32)
    init_grouping_from_clusters(model, labels)
    x = torch.rand(3, 1, 64, 64)
    with torch.no_grad():
        feats, d, maps = model.parts(x)
        want_d = np.where(labels == np.arange(2)[:, None], 1 / (1 + np.exp(-3.0)), 1 / (1 + np.exp(3.0)))
        np.testing.assert_allclose(d.numpy(), np.broadcast_to(want_d, d.shape), rtol=1e-6)
        response = model.bn(model.conv(model.stem(x)))
        r = torch.einsum("bpc,bchw->bphw", d, response) / d.sum(2)[..., None, None]
        want = torch.sigmoid(model.map_scale[None, :, :, None] * r + model.map_bias[None, :, :, None])
        torch.testing.assert_close(maps, want)
        logits, part_logits, out_maps = model(x)
        pooled = (maps[:, :, None] * feats[:, None]).sum((3, 4)) / maps.sum((2, 3))[..., None]
        torch.testing.assert_close(part_logits[:, 1], model.part_fc[1](pooled[:, 1]))
        torch.testing.assert_close(logits, model.fc(pooled.flatten(1)))
        torch.testing.assert_close(out_maps, maps)


def test_part_metrics_on_hand_made_maps():
    maps = np.zeros((2, 2, 4, 4), np.float32)
    maps[:, 0, 0, 0] = maps[:, 1, 3, 3] = 1.0
    logits = np.zeros((2, 2, 10), np.float32)
    logits[:, 0, 3] = 1.0  # part 0 says 3, part 1 says 0
    m = part_metrics({"part_maps": maps, "part_logits": logits}, {"label": np.array([3, 3])})
    assert m["part0_accuracy"] == 1.0 and m["part1_accuracy"] == 0.0 and m["best_part_accuracy"] == 1.0
    assert m["peak_distance"] == pytest.approx(np.hypot(0.75, 0.75)) and m["map_overlap"] == 0.0


def test_spec_outputs_and_variants():
    spec = get_spec("macnn")
    assert spec.output_names == ("logits", "part_logits", "part_maps")
    assert [st.name for st in spec.train.stages][:2] == ["classify", "grouping"]
    assert spec.train.stages[1].setup is not None  # k-means before the first grouping stage
    two = variant_spec(2, name="macnn_p2")
    assert two.outputs[2].axes[0] == 2 and two.builder().num_parts == 2
    model = create_model("macnn", num_classes=7, in_chans=3)
    assert model.fc.out_features == 7 and model.part_fc[0].out_features == 7


def test_tiny_staged_training_run():
    from training.train import train_model

    record = train_model("macnn", steps=8, train_size=64, test_size=16, save=False, progress=False)
    assert np.isfinite(record["metrics"]["accuracy"]) and "map_overlap" in record["metrics"]
    assert record["steps"] >= len(get_spec("macnn").train.stages)
