"""Feedback CNN: the unrolled top-down graph against the autograd reference, the routing rule, the target input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from export.rewriters.lean_feedback import LEAN_FEEDBACK, route_to_first_max, transposed_conv_as_conv
from export.rewriters.registry import applied, plan
from tests.conftest import require_checkpoint
from training import get_spec, load_trained
from training.data import make_split
from training.models.feedback import (
    UPDATES,
    FeedbackCNN,
    feedback_reference,
    pointing_hits,
    route_max_pool_grad,
)


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (1, 2, 7, 9), (2, 1, 5, 4)])
def test_max_pool_routing_breaks_ties_like_pytorch(shape):
    # Small integers: most windows hold ties, where "equals the max" would route to every tied cell.
    x = torch.randint(0, 3, shape).double().requires_grad_(True)
    y = F.max_pool2d(x, 2)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    torch.testing.assert_close(route_max_pool_grad(g, x.detach()), x.grad, rtol=0, atol=0)
    # the export rewrite's routing (upsampled window maxima, first maximum by a second pool): the same, exactly
    torch.testing.assert_close(route_to_first_max(g, x.detach()), x.grad, rtol=0, atol=0)
    torch.testing.assert_close(route_to_first_max(g.float(), x.detach().float()), x.grad.float(), rtol=0, atol=0)


def test_transposed_conv_as_conv():
    w, g = torch.randn(8, 4, 3, 3, dtype=torch.float64), torch.randn(2, 8, 9, 12, dtype=torch.float64)
    torch.testing.assert_close(transposed_conv_as_conv(g, w, padding=1), F.conv_transpose2d(g, w, padding=1),
                               rtol=0, atol=1e-12)


def _random_net(iters: int = 4, update: str = "binary") -> FeedbackCNN:
    torch.manual_seed(0)
    net = FeedbackCNN(iters=iters, update=update)
    with torch.no_grad():
        for bn in net.bns:
            bn.running_mean.uniform_(-0.1, 0.1)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
    return net.double().eval()


@pytest.mark.parametrize("update", UPDATES)
def test_unrolled_inference_equals_autograd_in_float64(update):
    net = _random_net(update=update)
    x = torch.rand(3, 1, 48, 56, dtype=torch.float64)
    target = torch.tensor([[-1], [3], [7]])
    with torch.no_grad():
        got = net.feedback(x, target)
    ref = feedback_reference(net, x, target, iters=net.iters, update=update)
    for key in ("logits_first", "logits", "saliency", "gradient_saliency"):
        torch.testing.assert_close(got[key], ref[key], rtol=0, atol=1e-12)
    for z, z_ref in zip(got["gates"], ref["gates"], strict=True):
        torch.testing.assert_close(z, z_ref, rtol=0, atol=1e-12)
    if update == "binary":  # gates are 0/1, some neurons switched off, and once off they stay off
        assert all(set(z.unique().tolist()) <= {0.0, 1.0} for z in got["gates"])
        assert any((z == 0).any() and (z == 1).any() for z in got["gates"])
        one_more = feedback_reference(net, x, target, iters=net.iters + 1, update=update)["gates"]
        assert all((z1 <= z).all() for z1, z in zip(one_more, got["gates"], strict=True))


@pytest.mark.parametrize("update", UPDATES)
def test_lean_feedback_rewrite_equals_autograd_in_float64(update):
    """The export-time rewrite of the top-down pass (export/rewriters/lean_feedback.py) computes the same inference,
    at even and odd sizes, and is patched in only inside ``applied``."""
    net = _random_net(update=update)
    original = FeedbackCNN.top_down
    assert plan(("fused_attention", LEAN_FEEDBACK), net, 18) == ((LEAN_FEEDBACK,), 18)
    assert plan((LEAN_FEEDBACK,), get_spec("cnn").builder(), 18) == ((), 18)
    for h, w in ((48, 56), (45, 51)):
        x = torch.rand(3, 1, h, w, dtype=torch.float64)
        target = torch.tensor([[-1], [3], [7]])
        ref = feedback_reference(net, x, target, iters=net.iters, update=update)
        with torch.no_grad(), applied((LEAN_FEEDBACK,)):
            assert FeedbackCNN.top_down is not original
            got = net.feedback(x, target)
        for key in ("logits_first", "logits", "saliency", "gradient_saliency"):
            torch.testing.assert_close(got[key], ref[key], rtol=0, atol=1e-12)
    assert FeedbackCNN.top_down is original


def test_unknown_update_is_named():
    with pytest.raises(ValueError, match="feedback update 'adam'"):
        FeedbackCNN(update="adam")


def test_target_input_and_its_default():
    net = _random_net()
    x = torch.rand(2, 1, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        default = net.feedback(x)
        top1 = default["logits_first"].argmax(1, keepdim=True)
        same = net.feedback(x, top1)
        other = net.feedback(x, (top1 + 1) % 10)
        minus_one = net.feedback(x, torch.full((2, 1), -1))
    torch.testing.assert_close(same["saliency"], default["saliency"])
    torch.testing.assert_close(minus_one["logits"], default["logits"])
    assert not torch.allclose(other["saliency"], default["saliency"])


def test_zero_iterations_is_the_gradient_saliency_and_training_mode_is_plain():
    net = _random_net(iters=0)
    x = torch.rand(2, 1, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        first, second, saliency, gradient = net(x, torch.full((2, 1), -1))
    torch.testing.assert_close(first, second)
    torch.testing.assert_close(saliency, gradient)
    assert saliency.shape == (2, 1, 64, 64) and saliency.amax(dim=(2, 3)).allclose(torch.ones(2, 1).double())
    net.train()
    logits, again, maps, _ = net(x)
    assert logits.requires_grad and torch.equal(logits, again) and not maps.any()


def test_pointing_game_on_hand_made_maps():
    maps = np.zeros((2, 1, 10, 10), np.float32)
    maps[0, 0, 2, 3] = 1.0  # centre (0.35, 0.25): inside box 0
    maps[1, 0, 9, 9] = 1.0  # centre (0.95, 0.95): outside box 1
    boxes = np.array([[0.3, 0.2, 0.5, 0.4], [0.0, 0.0, 0.5, 0.5]], np.float32)
    assert pointing_hits(maps, boxes).tolist() == [True, False]


@pytest.mark.slow
@pytest.mark.parametrize("side", [64, 80])
def test_trained_unrolled_matches_autograd_at_every_parity_batch(side):
    """The trained weights on real test images: the unrolled top-down pass equals autograd (gates and saliency
    within 1e-5, logits within 1e-4; the run is in float64 so that no ReLU, pool or clamp decision near a
    tie flips between the two computations, which float32 rounding does in a few samples per 64)."""
    require_checkpoint("feedback")
    spec = get_spec("feedback")
    net = load_trained("feedback").double()
    data = make_split("test", max(spec.checks.parity_batches), side, seed=3)
    for batch in spec.checks.parity_batches:
        x = torch.from_numpy(data["image"][:batch]).double()
        target = torch.from_numpy(np.where(np.arange(batch) % 3 == 0, -1, data["label"][:batch]))[:, None]
        with torch.no_grad():
            got = net.feedback(x, target)
        ref = feedback_reference(net, x, target, iters=net.iters, update=net.update)
        for key in ("logits_first", "logits"):
            assert (got[key] - ref[key]).abs().max() <= 1e-4, (key, batch, side)
        for key in ("saliency", "gradient_saliency"):
            assert (got[key] - ref[key]).abs().max() <= 1e-5, (key, batch, side)
        assert max((z - r).abs().max().item() for z, r in zip(got["gates"], ref["gates"], strict=True)) <= 1e-5


def test_shipped_model_measures_the_papers_claims():
    require_checkpoint("feedback")
    from training.checkpoints import load_metrics

    m = load_metrics("feedback")
    assert m["accuracy"] >= 0.95
    assert {"second_look_accuracy", "pointing_feedback", "pointing_gradient"} <= set(m)
    # Cao et al.: the feedback saliency localises better than the plain gradient saliency of the same network.
    assert m["pointing_feedback"] >= m["pointing_gradient"], m
    assert m["second_look_accuracy"] >= 0.95, m
