"""Residual Attention Network: the defining formulas on small inputs, sizes at odd resolutions, the spec."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training import create_model, get_spec
from training.models.residual_attention import (
    MASK_NORMS,
    AttentionModule,
    ResidualAttentionNet,
    SoftMaskBranch,
    normalise_mask,
    variant_spec,
)


def test_mask_normalisations_match_a_hand_computation():
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    a = x.numpy()
    mixed = 1 / (1 + np.exp(-a))
    channel = a / np.sqrt((a**2).sum(axis=1, keepdims=True) + 1e-5)
    mu = a.mean(axis=(2, 3), keepdims=True)
    sd = np.sqrt(((a - mu) ** 2).mean(axis=(2, 3), keepdims=True) + 1e-5)
    spatial = 1 / (1 + np.exp(-(a - mu) / sd))
    for mode, want in (("mixed", mixed), ("channel", channel), ("spatial", spatial)):
        np.testing.assert_allclose(normalise_mask(x, mode).numpy(), want, rtol=1e-12, atol=1e-12)
    # What each normalisation promises: unit L2 norm over channels; zero-mean logits per channel map.
    np.testing.assert_allclose(np.linalg.norm(normalise_mask(x, "channel").numpy(), axis=1), 1.0, atol=1e-3)
    with pytest.raises(ValueError, match="normalisation"):
        normalise_mask(x, "softmax")


@pytest.mark.parametrize(("residual", "use_mask"), [(True, True), (False, True), (True, False)])
def test_attention_module_output_is_one_plus_mask_times_trunk(residual, use_mask):
    torch.manual_seed(0)
    m = AttentionModule(8, depth=2, residual=residual, use_mask=use_mask).eval()
    x = torch.randn(2, 8, 11, 13)
    with torch.no_grad():
        out, mask = m(x)
        t = m.trunk(x)
        if use_mask:
            want_mask = m.mask(x)
            torch.testing.assert_close(mask, want_mask)
            h = (1 + want_mask) * t if residual else want_mask * t
        else:
            h = t
        torch.testing.assert_close(out, m.post(h))
    assert out.shape == x.shape and mask.shape[-2:] == x.shape[-2:]


@pytest.mark.parametrize("size", [(9, 9), (18, 18), (11, 7), (5, 6)])
def test_soft_mask_returns_to_the_input_size_where_pooling_does_not_round_trip(size):
    # ceil(9/2) = 5 and 5 * 2 = 10: a fixed x2 up-sampling would not land on 9.
    branch = SoftMaskBranch(4, depth=2, mask_norm="mixed").eval()
    with torch.no_grad():
        m = branch(torch.randn(1, 4, *size))
    assert m.shape == (1, 4, *size) and (m > 0).all() and (m < 1).all()


@pytest.mark.parametrize("mode", MASK_NORMS)
@pytest.mark.parametrize(("h", "w"), [(64, 64), (72, 72), (57, 71), (96, 48)])
def test_network_shapes_at_any_input_size(mode, h, w):
    model = ResidualAttentionNet(mask_norm=mode).eval()
    with torch.no_grad():
        logits, mask = model(torch.rand(3, 1, h, w))
    rows, cols = (h // 4 + 1) // 2, (w // 4 + 1) // 2  # the stem floors twice, the stride-2 unit ceils
    assert logits.shape == (3, 10) and mask.shape == (3, 1, rows, cols)
    spec = get_spec("residual_attention")
    assert mask.shape[1:] == spec.outputs[1].concrete({"mask_rows": rows, "mask_cols": cols})


def test_served_spec_and_ablation_variants():
    spec = get_spec("residual_attention")
    assert spec.output_names == ("logits", "soft_mask") and spec.task.min_accuracy == 0.96
    assert 72 in spec.checks.parity_sides  # the size where pools do not round-trip
    model = create_model("residual_attention", num_classes=5, in_chans=3)
    assert model.fc.out_features == 5 and model.stem[0][0].in_channels == 3
    naive = variant_spec(use_mask=False, name="ran_naive").builder()
    assert naive.stage1.mask is None and sum(p.numel() for p in naive.parameters()) < sum(
        p.numel() for p in spec.builder().parameters())
    assert not variant_spec(residual=False, name="ran_mt").builder().stage2.residual


def test_tiny_training_run():
    from training.train import train_model

    record = train_model("residual_attention", steps=3, train_size=32, test_size=16, save=False, progress=False)
    assert np.isfinite(record["metrics"]["accuracy"])
