"""Two-level attention ("The Application of Two-level Attention Models in Deep Convolutional Neural Network for
Fine-grained Image Classification", Xiao et al. 2015): bottom-up patch proposals, object-level attention by a
FilterNet and a DomainNet, part-level attention by clustering the DomainNet's mid-layer filters.

  proposals   a fixed multi-scale window grid on the canvas (``SCALES``: the whole canvas plus windows of 48,
              36 and 24 px of 64, P = 51), each cropped and resized to PATCH x PATCH with one hand-made
              sampling grid and ``F.grid_sample`` (bilinear, zeros, align_corners=False): the grid is in
              normalised coordinates, so it holds at any input size
  FilterNet   a small CNN trained on grid patches labelled with their image's class (no boxes: weak
              supervision, as the paper's); a patch's relevance = its max softmax, high where the patch shows
              the digit, low on clutter
  selection   patches with relevance >= THRESHOLD; none passing: the top-scoring patch (a mask, one
              expression: relevance >= min(THRESHOLD, max relevance))
  DomainNet   the same small CNN, started from the trained FilterNet and fine-tuned on the selected patches (the
              paper's); object-level scores = log of its softmax averaged over the selected patches (the paper
              averages the patches' class scores)
  parts       the DomainNet's mid-layer filters (the first conv of its head) grouped by spectral clustering of
              their weights' cosine similarity (the paper's part detectors, fixed after training as a buffer);
              a cluster's response on a patch = the spatial max of its filters' mean activation; for each
              cluster the selected patch it fires most; part-level scores = log-softmax of a linear
              classifier on the concatenated DomainNet features of those K patches
  final       logits = object-level + part-level log-probabilities (the product of the two levels' probabilities)

Served as three ONNX graphs composed by Triton (``filter`` -> ``domain`` -> ``parts``): both data-dependent
steps are masks and argmaxes inside the graphs, so the step count is fixed and the pipeline is an ensemble.

Training (``TrainRecipe.stages``, each stage its own parameters): the FilterNet on random grid patches, then
the DomainNet on the patches the frozen FilterNet selects, then (after the spectral clustering) the part
classifier on the frozen DomainNet's features. The later stages run the frozen nets on every patch of the
first ``SUB_BATCH`` images of a batch (all 51 patches per image): that bounds a step's cost on a 2-core host.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.models.common import SmallCNN
from training.registry import (
    Checks,
    Composition,
    ExportOptions,
    GraphSpec,
    ModelSpec,
    Stage,
    Step,
    TensorSpec,
    TrainRecipe,
    image_input,
    register_model,
)
from training.tasks import Classification, accuracy

# (window side in px of the 64 canvas, windows per axis, evenly spaced from edge to edge): the whole canvas,
# then windows that hold a whole digit (14-28 px) and windows of about one digit half (parts).
SCALES = ((64, 1), (48, 3), (36, 4), (24, 5))
CANVAS = 64
PATCH = 32  # every window is resized to this (px)
THRESHOLD = 0.7  # FilterNet relevance (max softmax) a patch needs to be selected
NUM_PARTS = 4
WIDTHS = (16, 32, 64)  # both nets: the DomainNet starts as a copy of the trained FilterNet (the paper's)
PATCHES_PER_IMAGE = 4  # FilterNet stage: random grid patches per training image
SUB_BATCH = 16  # DomainNet and part stages: images of a batch run through the frozen nets (all patches each)
MAX_SELECTED = 256  # DomainNet stage: at most this many selected patches per step
CLUSTER_SEED = 0


def window_boxes(scales: tuple[tuple[int, int], ...] = SCALES, canvas: int = CANVAS) -> np.ndarray:
    """The proposal grid: [P, 4] boxes (x0, y0, x1, y1) normalised to the image, row-major per scale."""
    boxes = []
    for side, n in scales:
        starts = np.linspace(0, canvas - side, n) if n > 1 else np.array([(canvas - side) / 2])
        boxes += [(x, y, x + side, y + side) for y in starts for x in starts]
    return (np.asarray(boxes, np.float64) / canvas).astype(np.float32)


def sampling_grid(boxes: np.ndarray, patch: int = PATCH) -> torch.Tensor:
    """grid_sample coordinates [1, P * patch, patch, 2] (x, y in [-1, 1]) of every box's patch x patch pixel
    centres, the boxes stacked along the rows: one grid_sample crops every patch of an image at once."""
    u = (torch.arange(patch, dtype=torch.float64) + 0.5) / patch  # pixel centres in [0, 1] of the patch
    b = torch.from_numpy(boxes).double()
    x = b[:, 0, None] + (b[:, 2] - b[:, 0])[:, None] * u  # [P, patch]
    y = b[:, 1, None] + (b[:, 3] - b[:, 1])[:, None] * u
    gx = (2 * x - 1)[:, None, :].expand(-1, patch, -1)  # [P, rows, cols]
    gy = (2 * y - 1)[:, :, None].expand(-1, -1, patch)
    return torch.stack((gx, gy), -1).flatten(0, 1)[None].float()


def select_patches(relevance: torch.Tensor, threshold: float = THRESHOLD) -> torch.Tensor:
    """Object-level attention's selection: 1.0 where relevance >= threshold; where no patch of an image passes,
    its top-scoring patch (ties: all of them). relevance [B, P] -> mask [B, P] float."""
    bar = torch.clamp(relevance.amax(1, keepdim=True), max=threshold)
    return (relevance >= bar).to(relevance.dtype)


def object_scores(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Object level: log of the softmax averaged over the selected patches, from logits [B, P, K] and mask
    [B, P], as a log-mean-exp of log-softmaxes: finite even where a class's probability underflows on every
    patch (a log of the plain mean gives -inf there, which the server refuses as the next graph's input)."""
    logp = torch.where(mask[..., None] > 0, torch.log_softmax(logits, -1), torch.full_like(logits, -1e4))
    return torch.logsumexp(logp, 1) - torch.log(mask.sum(1, keepdim=True))


def best_patch_per_part(response: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Part-level attention's selection: for every part, the selected patch with the highest response.
    response [B, P, K] (>= 0), mask [B, P] -> patch index [B, K] (ties: the first)."""
    return torch.where(mask[..., None] > 0, response, torch.full_like(response, -1.0)).argmax(1)


def filter_affinity(weights: np.ndarray) -> np.ndarray:
    """Affinity of conv filters [C, ...]: (1 + cosine similarity of their weights) / 2, in [0, 1]."""
    w = weights.reshape(len(weights), -1).astype(np.float64)
    w = w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)
    return (1.0 + np.clip(w @ w.T, -1.0, 1.0)) / 2.0


def cluster_filters(weights: np.ndarray, num_parts: int, seed: int = CLUSTER_SEED) -> np.ndarray:
    """Spectral clustering of the filters' affinity into ``num_parts`` part detectors: a label per filter."""
    from sklearn.cluster import SpectralClustering

    sc = SpectralClustering(num_parts, affinity="precomputed", random_state=seed, assign_labels="kmeans")
    return sc.fit_predict(filter_affinity(weights))


def assignment(labels: np.ndarray, num_parts: int) -> torch.Tensor:
    """[K, C] rows averaging each cluster's filters (an empty cluster's row is zero)."""
    a = np.stack([(labels == k).astype(np.float32) for k in range(num_parts)])
    return torch.from_numpy(a / np.maximum(a.sum(1, keepdims=True), 1.0))


# ---------------------------------------------------------------------------------------------- graphs


class FilterStage(nn.Module):
    """Graph ``filter``: image [B, C, H, W] -> (patches [B, P, C, PATCH, PATCH], relevance [B, P])."""

    def __init__(self, in_chans: int, num_classes: int) -> None:
        super().__init__()
        self.register_buffer("grid", sampling_grid(window_boxes()), persistent=False)
        self.num_patches = len(window_boxes())
        self.net = SmallCNN(num_classes, widths=WIDTHS, in_chans=in_chans)

    def crop(self, image: torch.Tensor) -> torch.Tensor:
        grid = self.grid.to(image.dtype).expand(image.shape[0], -1, -1, -1)
        out = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return out.unflatten(2, (self.num_patches, -1)).transpose(1, 2)  # [B, P, C, PATCH, PATCH]

    def relevance(self, patches: torch.Tensor) -> torch.Tensor:
        logits = self.net(patches.flatten(0, 1))[0].unflatten(0, patches.shape[:2])
        return torch.softmax(logits, -1).amax(-1)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        patches = self.crop(image)
        return patches, self.relevance(patches)


class DomainStage(nn.Module):
    """Graph ``domain``: (patches, relevance) -> (object-level log-probabilities [B, K], DomainNet on the whole
    canvas (patch 0) [B, K], selection mask [B, P], patch features [B, P, D], part responses [B, P, parts])."""

    def __init__(self, in_chans: int, num_classes: int, num_parts: int) -> None:
        super().__init__()
        self.net = SmallCNN(num_classes, widths=WIDTHS, in_chans=in_chans)
        c_mid = WIDTHS[2]
        # Part detectors: which mid-layer filters form each part (set by the spectral clustering).
        self.register_buffer("parts", torch.full((num_parts, c_mid), 1.0 / c_mid))

    def run(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """DomainNet on every patch: (logits [B, P, K], features [B, P, D], part responses [B, P, parts])."""
        net, x = self.net, patches.flatten(0, 1)
        mid = net.head[0](net.mid(net.stem(x)))  # the clustered layer's activations (after its ReLU)
        feats = net.head[1:](mid).mean(dim=(2, 3))
        response = torch.einsum("kc,nchw->nkhw", self.parts, mid).amax(dim=(2, 3))
        split = patches.shape[:2]
        return net.fc(feats).unflatten(0, split), feats.unflatten(0, split), response.unflatten(0, split)

    def forward(self, patches: torch.Tensor, relevance: torch.Tensor):
        logits, feats, response = self.run(patches)
        mask = select_patches(relevance)
        object_logits = object_scores(logits, mask)
        whole_logits = torch.log_softmax(logits[:, 0], -1)
        return object_logits, whole_logits, mask, feats, response


class PartStage(nn.Module):
    """Graph ``parts``: (features, responses, mask, object-level scores) -> (final logits, part-level
    log-probabilities, selected patch boxes [B, P, 4] (unselected: zeros), part boxes [B, parts, 4])."""

    def __init__(self, num_classes: int, num_parts: int) -> None:
        super().__init__()
        self.register_buffer("boxes", torch.from_numpy(window_boxes()), persistent=False)
        self.fc = nn.Linear(num_parts * WIDTHS[2], num_classes)

    def forward(self, feats: torch.Tensor, response: torch.Tensor, mask: torch.Tensor, object_logits: torch.Tensor):
        best = best_patch_per_part(response, mask)  # [B, parts]
        part_feats = torch.gather(feats, 1, best[..., None].expand(-1, -1, feats.shape[-1]))
        part_logits = torch.log_softmax(self.fc(part_feats.flatten(1)), -1)
        boxes = self.boxes.to(feats.dtype)[None].expand(feats.shape[0], -1, -1)
        part_boxes = torch.gather(boxes, 1, best[..., None].expand(-1, -1, 4))
        return object_logits + part_logits, part_logits, boxes * mask[..., None], part_boxes


class TwoLevel(nn.Module):
    """Returns (logits, object_logits, part_logits, whole_logits, patch_mask, patch_boxes, part_boxes)."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1, num_parts: int = NUM_PARTS) -> None:
        super().__init__()
        self.filter = FilterStage(in_chans, num_classes)
        self.domain = DomainStage(in_chans, num_classes, num_parts)
        self.head = PartStage(num_classes, num_parts)
        self.num_parts = num_parts
        self.phase = "filter"  # which stage training_outputs serves (set by each stage's setup)

    def forward(self, image: torch.Tensor):
        patches, relevance = self.filter(image)
        object_logits, whole_logits, mask, feats, response = self.domain(patches, relevance)
        logits, part_logits, patch_boxes, part_boxes = self.head(feats, response, mask, object_logits)
        return logits, object_logits, part_logits, whole_logits, mask, patch_boxes, part_boxes

    def training_outputs(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per phase: the trained net's logits and, per logit row, the index of its image in the batch."""
        if self.phase == "filter":
            patches = self.filter.crop(image)
            b, p = patches.shape[:2]
            pick = torch.randint(0, p, (b, PATCHES_PER_IMAGE))
            rows = torch.arange(b)[:, None].expand(-1, PATCHES_PER_IMAGE)
            return {"logits": self.filter.net(patches[rows, pick].flatten(0, 1))[0], "index": rows.flatten()}
        image = image[:SUB_BATCH]
        self.filter.eval()
        with torch.no_grad():
            patches, relevance = self.filter(image)
            mask = select_patches(relevance)
        if self.phase == "domain":
            rows, cols = mask.nonzero(as_tuple=True)
            if len(rows) > MAX_SELECTED:
                keep = torch.randperm(len(rows))[:MAX_SELECTED]
                rows, cols = rows[keep], cols[keep]
            return {"logits": self.domain.net(patches[rows, cols])[0], "index": rows}
        self.domain.eval()
        with torch.no_grad():
            object_logits, _, mask, feats, response = self.domain(patches, relevance)
        _, part_logits, _, _ = self.head(feats, response, mask, object_logits)
        return {"logits": part_logits, "index": torch.arange(len(image))}


# --------------------------------------------------------------------------------------- training stages


def stage_loss(outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """Cross-entropy of the phase's logits against their images' labels."""
    y = batch["label"][outputs["index"]]
    loss = F.cross_entropy(outputs["logits"], y)
    return loss, {"loss": loss.item(), "acc": float((outputs["logits"].argmax(-1) == y).float().mean())}


def _phase(name: str):
    def setup(model: TwoLevel, train: dict[str, np.ndarray]) -> None:
        model.phase = name

    return setup


def domain_setup(model: TwoLevel, train: dict[str, np.ndarray]) -> None:
    """The DomainNet starts from the trained FilterNet and is fine-tuned on the patches it selects."""
    model.phase = "domain"
    model.domain.net.load_state_dict(model.filter.net.state_dict())


def parts_setup(model: TwoLevel, train: dict[str, np.ndarray]) -> None:
    """Group the trained DomainNet's mid-layer filters into part detectors (spectral clustering)."""
    model.phase = "parts"
    weights = model.domain.net.head[0][0].weight.detach().numpy()
    labels = cluster_filters(weights, model.num_parts)
    model.domain.parts.copy_(assignment(labels, model.num_parts))


def _stages(filter_steps: int = 800, domain_steps: int = 400, part_steps: int = 150) -> tuple[Stage, ...]:
    return (
        Stage("filter", filter_steps, params=lambda m: list(m.filter.parameters()), setup=_phase("filter")),
        Stage("domain", domain_steps, params=lambda m: list(m.domain.parameters()), setup=domain_setup),
        Stage("parts", part_steps, params=lambda m: list(m.head.parameters()), lr=1e-2, setup=parts_setup),
    )


# ------------------------------------------------------------------------------------------ test metrics


def _covers(boxes: np.ndarray, digit: np.ndarray, fraction: float = 0.5) -> np.ndarray:
    """Whether each box [..., 4] holds at least ``fraction`` of its image's digit box [n, 4]."""
    d = digit.reshape(len(digit), *([1] * (boxes.ndim - 2)), 4)
    w = np.clip(np.minimum(boxes[..., 2], d[..., 2]) - np.maximum(boxes[..., 0], d[..., 0]), 0, None)
    h = np.clip(np.minimum(boxes[..., 3], d[..., 3]) - np.maximum(boxes[..., 1], d[..., 1]), 0, None)
    area = (d[..., 2] - d[..., 0]) * (d[..., 3] - d[..., 1])
    return w * h >= fraction * area


def two_level_metrics(outputs: dict[str, np.ndarray], data: dict[str, np.ndarray]) -> dict[str, float]:
    """Accuracy of each level alone, of both, of the DomainNet on the whole canvas; how many patches are
    selected and how many of them (and of the part patches) hold at least half of the digit."""
    y = data["label"]
    mask = outputs["patch_mask"] > 0
    m = {"acc_object": accuracy(outputs["object_logits"], y), "acc_part": accuracy(outputs["part_logits"], y),
         "acc_combined": accuracy(outputs["logits"], y), "acc_whole_image": accuracy(outputs["whole_logits"], y),
         "selected_per_image": float(mask.sum(1).mean())}
    if "box" in data:
        hits = _covers(outputs["patch_boxes"], data["box"])
        m["selected_on_digit"] = float(hits[mask].mean())
        m["part_on_digit"] = float(_covers(outputs["part_boxes"], data["box"]).mean())
    return m


# ----------------------------------------------------------------------------------------------- the spec

P = len(window_boxes())
_image = image_input()
_patches = TensorSpec("patches", (P, 1, PATCH, PATCH), "float32", "tensor", "every proposal window resized")
_relevance = TensorSpec("relevance", (P,), "float32", "tensor", "FilterNet's max softmax per patch")
_object = TensorSpec("object_logits", (10,), "float32", "logits",
                     "object level: log of the DomainNet's softmax averaged over the selected patches")
_whole = TensorSpec("whole_logits", (10,), "float32", "logits", "the DomainNet on the whole canvas (log-softmax)")
_mask = TensorSpec("patch_mask", (P,), "float32", "tensor", "1 where a proposal window is selected")
_feats = TensorSpec("patch_features", (P, WIDTHS[2]), "float32", "tensor", "DomainNet features per patch")
_response = TensorSpec("part_response", (P, NUM_PARTS), "float32", "tensor", "each part detector's response")
_part = TensorSpec("part_logits", (10,), "float32", "logits",
                   "part level: log-softmax of the classifier on the parts' best patches")
_logits = TensorSpec("logits", (10,), "float32", "logits", "object level + part level (log-probabilities)")
_patch_boxes = TensorSpec("patch_boxes", (P, 4), "float32", "boxes",
                          "proposal windows (x0, y0, x1, y1) of the input; unselected ones all zero")
_part_boxes = TensorSpec("part_boxes", (NUM_PARTS, 4), "float32", "boxes", "each part's best window")


def _same(*names: str) -> dict[str, str]:
    return {n: n for n in names}


register_model(ModelSpec(
    name="two_level",
    family="two_level",
    builder=TwoLevel,
    description="Two-level attention: FilterNet-selected proposal windows averaged by a DomainNet (object level) "
                "plus a classifier on the windows of spectrally clustered part detectors (part level)",
    inputs=(_image,),
    outputs=(_logits, _object, _part, _whole, _mask, _patch_boxes, _part_boxes),
    task=Classification(min_accuracy=0.95),
    train=TrainRecipe(lr=3e-3, loss=stage_loss, metrics=two_level_metrics, stages=_stages()),
    export=ExportOptions(opset=18, fp16_keep_fp32_ops=("GridSample",)),
    # The second bar, "combined >= each level alone", is the paper's claim and is measured with seeds in
    # reports/study_two_level.md rather than gated here: it does not hold on cluttered digits (combined 96.25 /
    # 95.45 vs object level 96.40 / 96.05 at seeds 0 / 1), and a gate would fail every `make export`.
    checks=Checks(),
    graphs=(
        GraphSpec("filter", (_image,), (_patches, _relevance), module=lambda m: m.filter),
        GraphSpec("domain", (_patches, _relevance), (_object, _whole, _mask, _feats, _response),
                  module=lambda m: m.domain),
        GraphSpec("parts", (_feats, _response, _mask, _object), (_logits, _part, _patch_boxes, _part_boxes),
                  module=lambda m: m.head),
    ),
    composition=Composition("ensemble", (
        Step("filter", _same("image"), _same("patches", "relevance")),
        Step("domain", _same("patches", "relevance"),
             _same("object_logits", "whole_logits", "patch_mask", "patch_features", "part_response")),
        Step("parts", _same("patch_features", "part_response", "patch_mask", "object_logits"),
             _same("logits", "part_logits", "patch_boxes", "part_boxes")),
    )),
))
