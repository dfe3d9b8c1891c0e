"""Two-level attention (training/models/two_level.py): the proposal grid and crops, both selection steps and the
filter clustering on small hand-made inputs; the composed graphs against the torch pipeline at batches 1, 8 and
64, and the served pipeline (ensemble and BLS) over gRPC and HTTP."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from export.compare import compare
from export.onnx_export import export_onnx
from export.parity import deployed_runner
from export.runners import TorchRunner
from serving import repository as rep
from serving.client import PROTOCOLS, Client
from serving.server import TritonServer, free_ports
from tests.conftest import require_checkpoint, stop_in_background
from training import layout
from training.feeds import sample_feeds
from training.models.two_level import (
    PATCH,
    SCALES,
    FilterStage,
    assignment,
    best_patch_per_part,
    cluster_filters,
    filter_affinity,
    object_scores,
    select_patches,
    window_boxes,
)
from training.registry import Composition, get_spec

NAME = "two_level"


# ------------------------------------------------------------------------------------- proposals and crops


def test_window_grid_covers_the_canvas_at_every_scale():
    boxes = window_boxes()
    assert boxes.shape == (sum(n * n for _, n in SCALES), 4)
    assert np.allclose(boxes[0], [0, 0, 1, 1])  # patch 0: the whole canvas (the DomainNet-on-image baseline)
    assert boxes.min() >= 0 and boxes.max() <= 1
    sides = np.round((boxes[:, 2] - boxes[:, 0]) * 64).astype(int)
    assert sorted(set(sides)) == sorted(s for s, _ in SCALES)
    assert np.allclose(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])  # square windows


def test_a_pixel_aligned_window_of_the_patch_size_crops_exactly_its_pixels():
    image = torch.rand(2, 1, 64, 64)
    patches = FilterStage(1, 10).crop(image)
    boxes = window_boxes() * 64
    for i in np.flatnonzero(np.isclose(boxes[:, 2] - boxes[:, 0], PATCH)):
        x0, y0 = (round(float(v)) for v in boxes[i, :2])
        if x0 == boxes[i, 0] and y0 == boxes[i, 1]:
            torch.testing.assert_close(patches[:, i], image[..., y0:y0 + PATCH, x0:x0 + PATCH], atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------- selection


def test_threshold_selects_every_patch_at_or_above_it():
    rel = torch.tensor([[0.2, 0.95, 0.9, 0.89, 0.99]])
    assert select_patches(rel, 0.9).tolist() == [[0, 1, 1, 0, 1]]


def test_no_patch_passing_falls_back_to_the_top_scoring_patch():
    rel = torch.tensor([[0.2, 0.5, 0.3], [0.95, 0.1, 0.2], [0.4, 0.4, 0.1]])
    # row 0: none passes -> the top one; row 1: threshold; row 2: a tie at the top keeps both
    assert select_patches(rel, 0.9).tolist() == [[0, 1, 0], [1, 0, 0], [1, 1, 0]]


def test_object_level_averages_the_softmax_of_only_the_selected_patches():
    logits = torch.log(torch.tensor([[[0.9, 0.1], [0.0, 1.0], [0.5, 0.5]]]))
    mask = torch.tensor([[1.0, 0.0, 1.0]])
    torch.testing.assert_close(object_scores(logits, mask).exp(), torch.tensor([[0.7, 0.3]]))


def test_object_level_stays_finite_where_a_class_underflows_on_every_patch():
    logits = torch.tensor([[[200.0, 0.0], [300.0, 0.0]]])  # softmax of class 1: exp(-200) = 0 in float32
    got = object_scores(logits, torch.ones(1, 2))
    assert torch.isfinite(got).all() and got[0, 0].item() == pytest.approx(0.0, abs=1e-6)


def test_best_patch_per_part_ignores_unselected_patches():
    response = torch.tensor([[[5.0, 0.0], [1.0, 2.0], [3.0, 1.0]]])  # [B=1, P=3, K=2]
    assert best_patch_per_part(response, torch.ones(1, 3)).tolist() == [[0, 1]]
    # patch 0 fires part 0 most but is not selected: part 0 takes the best selected one (patch 2)
    assert best_patch_per_part(response, torch.tensor([[0.0, 1.0, 1.0]])).tolist() == [[2, 1]]
    # a part that fires nowhere (all zero) takes the first selected patch
    assert best_patch_per_part(torch.zeros(1, 3, 1), torch.tensor([[0.0, 1.0, 1.0]])).tolist() == [[1]]


# --------------------------------------------------------------------------------------------- clustering


def _grouped_filters(groups: int = 3, per_group: int = 5, noise: float = 0.05, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(groups, 8, 3, 3))
    labels = np.repeat(np.arange(groups), per_group)
    filters = centres[labels] + noise * rng.normal(size=(len(labels), 8, 3, 3))
    order = rng.permutation(len(labels))  # shuffled, so that clusters are not contiguous
    return filters[order], labels[order]


def test_affinity_is_one_for_parallel_filters_and_half_for_orthogonal_ones():
    w = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]])
    a = filter_affinity(w)
    assert np.allclose(np.diag(a), 1) and np.isclose(a[0, 1], 1) and np.isclose(a[0, 2], 0.5)
    assert np.isclose(a[0, 3], 0)


def test_spectral_clustering_recovers_filters_with_obvious_groups():
    filters, truth = _grouped_filters()
    got = cluster_filters(filters, 3)
    # the same partition up to the clusters' numbering
    pairs = {(t, g) for t, g in zip(truth, got, strict=True)}
    assert len(pairs) == 3 and len({g for _, g in pairs}) == 3


def test_assignment_averages_each_cluster_and_leaves_an_empty_one_zero():
    a = assignment(np.array([0, 0, 2, 0]), 3)
    torch.testing.assert_close(a, torch.tensor([[1 / 3, 1 / 3, 0, 1 / 3], [0, 0, 0, 0], [0, 0, 1, 0]]))


# ------------------------------------------------------------------------------ composed and served parity


@pytest.fixture(scope="module")
def trained():
    from training import load_trained

    require_checkpoint(NAME)
    return get_spec(NAME), load_trained(NAME)


@pytest.fixture(scope="module")
def graphs(trained, tmp_path_factory):
    spec, model = trained
    repo = tmp_path_factory.mktemp("two-level-repo")
    return repo, {g.name: export_onnx(spec, model, layout.onnx_path(spec.graph_model_name(g), repo), graph=g)
                  for g in spec.deploy_graphs()}


def _check(spec, ref: dict, got: dict, where: str) -> None:
    """Final logits within 1e-4 and the same top-1; the same selected patches and part windows, exactly."""
    c = compare(ref, got, spec.outputs, rep_tolerance(), where=where)
    assert c.ok, c.failures
    assert (ref["logits"].argmax(1) == got["logits"].argmax(1)).all(), where
    np.testing.assert_array_equal(ref["patch_mask"], got["patch_mask"], err_msg=where)
    np.testing.assert_array_equal(ref["part_boxes"], got["part_boxes"], err_msg=where)


def rep_tolerance():
    from export.compare import Tolerance

    return Tolerance(1e-4, 1.0)


@pytest.mark.parametrize("batch", [1, 8, 64])
def test_composed_graphs_equal_the_torch_pipeline(trained, graphs, batch):
    spec, model = trained
    _, files = graphs
    feeds = sample_feeds(spec, batch, 64, seed=3)
    _check(spec, TorchRunner.for_spec(spec, model).infer(feeds), deployed_runner(spec, files).infer(feeds),
           f"onnxruntime {spec.composition.kind} at batch {batch}")


def _bls(spec):
    return dataclasses.replace(spec, composition=Composition("bls", spec.composition.steps))


@pytest.fixture(scope="module")
def served(trained, graphs):
    """The spec's ensemble under its own name and the same graphs composed by the generic BLS model."""
    spec, _ = trained
    repo, _ = graphs
    rep.write_model(spec, "cpu", repo)
    cfg = rep.composition_config(_bls(spec))
    cfg.name = f"{spec.name}_bls"
    rep.write_text(layout.config_path(cfg.name, repo), rep.config_text(cfg))
    rep.copy_file(rep.BACKEND_PIPELINE_PY, layout.version_dir(cfg.name, repo) / layout.BACKEND_FILE)
    http, grpc, metrics = free_ports(3)
    # Its own server, not a shared one: this module's freshly exported graphs and a BLS variant of the ensemble.
    server = TritonServer(repo, http_port=http, grpc_port=grpc, metrics_port=metrics, require_all=True).start()
    yield server
    stop_in_background(server, "test_two_level.py served")


@pytest.mark.server
@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("composed", ["", "_bls"], ids=["ensemble", "bls"])
def test_served_pipeline_equals_torch(trained, served, protocol, composed):
    spec, model = trained
    url = served.grpc_url if protocol == "grpc" else served.http_url
    with Client(spec.name + composed, protocol, url) as client:
        for batch, side in ((1, 64), (8, 64), (64, 64), (5, 80)):
            feeds = sample_feeds(spec, batch, side, seed=7)
            _check(spec, TorchRunner.for_spec(spec, model).infer(feeds), client.infer(feeds),
                   f"{spec.name + composed} over {protocol} at batch {batch}, {side}x{side}")


def test_unselected_windows_are_not_shown_by_the_client():
    from training.tasks import output_kind

    boxes = np.array([[0, 0, 0, 0], [0.1, 0.2, 0.5, 0.6], [0, 0, 0, 0]], np.float32)
    assert output_kind("boxes").present(boxes) == {"boxes": [[0.1, 0.2, 0.5, 0.6]]}
