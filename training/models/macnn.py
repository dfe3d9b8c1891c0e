"""MA-CNN ("Learning Multi-Attention Convolutional Neural Network for Fine-Grained Image Recognition", Zheng
et al. 2017): channel grouping into part attention maps, part features pooled under each map, a classifier per
part and one over all parts.

  features   F = conv backbone (1/4 resolution, C channels); F^ the last conv's response before the ReLU
  grouping   d_i = sigmoid(FC(ReLU(FC(GAP(F)))))  in [0, 1]^C, one pair of FC layers per part i
  part map   M_i = sigmoid(a_i * sum_j d_ij F^_j / sum_j d_ij + b_i)
  part feat  p_i = sum_xy F(x, y) M_i(x, y) / sum_xy M_i(x, y)
  logits     per part: W_i p_i;  fused: W [p_1, ..., p_P]

The paper writes M_i = sigmoid(sum_j d_ij [W * X]_j) on VGG conv5 features. Here the sum is a weighted mean
of batch-normalised responses (zero mean per channel over the data): in a 64-channel net the raw sum of
non-negative responses saturates the sigmoid everywhere, which leaves the grouping loss no gradient; a
learned contrast a_i, b_i per part (initially 4 and -4) lets a map be compact.

Measured deviation from the paper's alternation: with the backbone frozen while the grouping loss trains,
every part map converged to the same place (mean peak distance 0.001 of the image side, soft overlap 0.995)
because all channels of the small backbone respond to the one digit. The grouping stages therefore also
train the last conv layer (``grouping_parameters``), so channels can specialise to parts.

Training, as the paper: (1) the classification losses train the backbone and classifiers; (2) the channels'
peak positions on training images are clustered with k-means into P groups, and each part's grouping layers
are initialised to output its cluster's indicator vector; (3) the channel-grouping loss (``grouping_loss``:
distance + lambda * diversity, with margin ``MARGIN``) trains the grouping layers alone, then the
classification losses train the rest, alternately (``TrainRecipe.stages``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.models.common import conv_bn_relu
from training.registry import (
    Dim,
    ModelSpec,
    Stage,
    TensorSpec,
    TrainRecipe,
    class_logits,
    image_input,
    register_model,
)
from training.tasks import Classification, accuracy

MARGIN = 0.02  # the paper's mrg in the diversity term
DIVERSITY_WEIGHT = 2.0  # lambda
MAP_SCALE = 4.0  # initial contrast: sigmoid(4 * (r - 1)) of the standardised weighted response r
INDICATOR_LOGIT = 3.0  # the grouping's initial output: sigmoid(+-3) = 0.95 for a cluster's channels, 0.05 else
KMEANS_IMAGES = 512


class ChannelGrouping(nn.Module):
    """One part's two FC layers over the channels' global responses: d_i in [0, 1]^C."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(channels, channels)
        self.fc2 = nn.Linear(channels, channels)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc2(F.relu(self.fc1(pooled))))


class MACNN(nn.Module):
    """Returns (fused logits [B, K], per-part logits [B, P, K], part maps [B, P, H/4, W/4])."""

    def __init__(self, num_parts: int = 4, num_classes: int = 10, in_chans: int = 1,
                 widths: tuple[int, int, int] = (16, 32, 64)) -> None:
        super().__init__()
        c1, c2, c3 = widths
        self.num_parts = num_parts
        self.stem = nn.Sequential(conv_bn_relu(in_chans, c1), nn.MaxPool2d(2), conv_bn_relu(c1, c2), nn.MaxPool2d(2),
                                  conv_bn_relu(c2, c3))
        self.conv = nn.Conv2d(c3, c3, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c3)
        self.grouping = nn.ModuleList(ChannelGrouping(c3) for _ in range(num_parts))
        # Per-part contrast of the map (see the module docstring): starts sharp, background near 0.
        self.map_scale = nn.Parameter(torch.full((num_parts, 1), MAP_SCALE))
        self.map_bias = nn.Parameter(torch.full((num_parts, 1), -MAP_SCALE))
        self.part_fc = nn.ModuleList(nn.Linear(c3, num_classes) for _ in range(num_parts))
        self.fc = nn.Linear(num_parts * c3, num_classes)

    def parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(features F [B, C, h, w], channel weights d [B, P, C], part maps M [B, P, h, w])."""
        response = self.bn(self.conv(self.stem(x)))
        feats = F.relu(response)
        d = torch.stack([g(feats.mean(dim=(2, 3))) for g in self.grouping], dim=1)  # [B, P, C]
        weighted = (d @ response.flatten(2)) / d.sum(dim=2, keepdim=True)  # [B, P, h*w]
        maps = torch.sigmoid(self.map_scale * weighted + self.map_bias)
        return feats, d, maps.unflatten(2, response.shape[-2:])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feats, _, maps = self.parts(x)
        m = maps.flatten(2)
        pooled = (m @ feats.flatten(2).transpose(1, 2)) / m.sum(dim=2, keepdim=True)  # [B, P, C]
        part_logits = torch.stack([fc(pooled[:, i]) for i, fc in enumerate(self.part_fc)], dim=1)
        return self.fc(pooled.flatten(1)), part_logits, maps

    def grouping_parameters(self) -> list[nn.Parameter]:
        """What the grouping loss trains: the grouping layers, the maps' contrast and the last conv layer."""
        return [*self.grouping.parameters(), self.map_scale, self.map_bias, *self.conv.parameters(),
                *self.bn.parameters()]

    def classifier_parameters(self) -> list[nn.Parameter]:
        """What the classification stages train after the first: everything but the grouping and contrast."""
        grouping = {id(p) for p in (*self.grouping.parameters(), self.map_scale, self.map_bias)}
        return [p for p in self.parameters() if id(p) not in grouping]


# ----------------------------------------------------------------------------------------------- losses


def _peaks(maps: torch.Tensor) -> torch.Tensor:
    """Each map's argmax as normalised (y, x) cell centres in [0, 1]: [B, P, 2] (no gradient)."""
    h, w = maps.shape[-2:]
    idx = maps.detach().flatten(2).argmax(-1)
    rows, cols = (idx // w).to(maps.dtype), (idx % w).to(maps.dtype)
    return torch.stack(((rows + 0.5) / h, (cols + 0.5) / w), dim=-1)


def distance_loss(maps: torch.Tensor) -> torch.Tensor:
    """Dis(M_i) = sum_xy m_i(x, y) * ||(x, y) - t_i||^2, t_i the map's peak; averaged over cells, parts, batch.
    Coordinates are normalised to [0, 1] so the loss does not depend on the map's size."""
    h, w = maps.shape[-2:]
    ys = ((torch.arange(h, dtype=maps.dtype) + 0.5) / h)[:, None]
    xs = ((torch.arange(w, dtype=maps.dtype) + 0.5) / w)[None, :]
    t = _peaks(maps)
    d2 = (ys - t[..., 0, None, None]) ** 2 + (xs - t[..., 1, None, None]) ** 2  # [B, P, h, w]
    return (maps * d2).mean()


def diversity_loss(maps: torch.Tensor, margin: float = MARGIN) -> torch.Tensor:
    """Div(M_i) = sum_xy m_i(x, y) * (max_{k != i} m_k(x, y) - margin); averaged like ``distance_loss``."""
    p = maps.shape[1]
    if p < 2:
        return maps.new_zeros(())
    others = torch.stack([torch.cat((maps[:, :i], maps[:, i + 1:]), 1).amax(1) for i in range(p)], dim=1)
    return (maps * (others - margin)).mean()


def grouping_loss(outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    maps = outputs["part_maps"]
    dis, div = distance_loss(maps), diversity_loss(maps)
    loss = dis + DIVERSITY_WEIGHT * div
    return loss, {"dis": dis.item(), "div": div.item()}


def classification_loss(outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """Cross-entropy on the fused logits plus the mean over parts."""
    y = batch["label"]
    fused = F.cross_entropy(outputs["logits"], y)
    parts = outputs["part_logits"]
    part = F.cross_entropy(parts.flatten(0, 1), y.repeat_interleave(parts.shape[1]))
    return fused + part, {"fused": fused.item(), "part": part.item(),
                          "acc": float((outputs["logits"].argmax(-1) == y).float().mean())}


# ------------------------------------------------------------------------------------- k-means channel init


@torch.no_grad()
def channel_peaks(model: MACNN, images: np.ndarray) -> np.ndarray:
    """Each channel's peak position over the images: [C, 2 * n] (normalised y, x per image)."""
    model.eval()
    feats = model.parts(torch.from_numpy(images))[0]  # [n, C, h, w]
    h, w = feats.shape[-2:]
    idx = feats.flatten(2).argmax(-1)  # [n, C]
    pos = torch.stack(((idx // w + 0.5) / h, (idx % w + 0.5) / w), dim=-1)  # [n, C, 2]
    model.train()
    return pos.permute(1, 0, 2).flatten(1).numpy()


def cluster_channels(peaks: np.ndarray, num_parts: int, seed: int = 0) -> np.ndarray:
    """k-means of the channels' peak-position vectors into ``num_parts`` groups: a label per channel."""
    from sklearn.cluster import KMeans

    return KMeans(num_parts, n_init=10, random_state=seed).fit_predict(peaks)


def init_grouping_from_clusters(model: MACNN, labels: np.ndarray) -> None:
    """Each part's grouping layers output its cluster's indicator (0.95 in the cluster, 0.05 outside): the
    paper pre-trains the FC layers toward it; a zero output layer with indicator biases gives it at once."""
    with torch.no_grad():
        for i, g in enumerate(model.grouping):
            g.fc2.weight.zero_()
            g.fc2.bias.copy_(torch.from_numpy(np.where(labels == i, INDICATOR_LOGIT, -INDICATOR_LOGIT)))


def kmeans_setup(model: MACNN, train: dict[str, np.ndarray]) -> None:
    images = train["image"][:KMEANS_IMAGES]
    init_grouping_from_clusters(model, cluster_channels(channel_peaks(model, images), model.num_parts))


# ------------------------------------------------------------------------------------------ test metrics


def part_metrics(outputs: dict[str, np.ndarray], data: dict[str, np.ndarray]) -> dict[str, float]:
    """Per-part accuracy, the mean distance between part peaks (normalised image units) and the mean soft
    overlap (sum of min / sum of max) between the maps of different parts, on the split."""
    maps, parts = outputs["part_maps"], outputs["part_logits"]
    p, (h, w) = maps.shape[1], maps.shape[-2:]
    metrics = {f"part{i}_accuracy": accuracy(parts[:, i], data["label"]) for i in range(p)}
    flat = maps.reshape(len(maps), p, -1)
    idx = flat.argmax(-1)
    peaks = np.stack(((idx // w + 0.5) / h, (idx % w + 0.5) / w), -1)  # [n, P, 2]
    pairs = [(i, k) for i in range(p) for k in range(i + 1, p)]
    if pairs:
        metrics["peak_distance"] = float(np.mean([np.linalg.norm(peaks[:, i] - peaks[:, k], axis=-1).mean()
                                                  for i, k in pairs]))
        metrics["map_overlap"] = float(np.mean([(np.minimum(flat[:, i], flat[:, k]).sum(-1)
                                                 / np.maximum(flat[:, i], flat[:, k]).sum(-1)).mean()
                                                for i, k in pairs]))
    metrics["best_part_accuracy"] = max(metrics[f"part{i}_accuracy"] for i in range(p))
    return metrics


def _stages(rounds: int = 3, classify: int = 200, group: int = 100, warm: int = 400) -> tuple[Stage, ...]:
    grouping = Stage("grouping", group, grouping_loss, params=MACNN.grouping_parameters)
    out = [Stage("classify", warm, classification_loss), Stage("grouping", group, grouping_loss,
                                                               params=MACNN.grouping_parameters, setup=kmeans_setup)]
    for _ in range(rounds - 1):
        out += [Stage("classify", classify, classification_loss, params=MACNN.classifier_parameters), grouping]
    return (*out, Stage("classify", classify, classification_loss, params=MACNN.classifier_parameters))


def macnn(num_parts: int = 4, num_classes: int = 10, in_chans: int = 1) -> MACNN:
    return MACNN(num_parts, num_classes, in_chans)


PART_GRID = Dim("map_rows", 12, 16, 24), Dim("map_cols", 12, 16, 24)


def variant_spec(num_parts: int = 4, name: str | None = None) -> ModelSpec:
    """The served MA-CNN (``num_parts`` 4), or another part count for ``bench.studies``."""
    return ModelSpec(
        name=name or "macnn",
        family="macnn",
        builder=lambda p=num_parts, **kw: macnn(p, **kw),
        description=f"MA-CNN: {num_parts} part attention maps from channel grouping, a classifier per part and "
                    "a fused one",
        inputs=(image_input(),),
        outputs=(class_logits(),
                 TensorSpec("part_logits", (num_parts, 10), "float32", "logits", "each part's class logits"),
                 TensorSpec("part_maps", (num_parts, *PART_GRID), "float32", "map",
                            "the part attention maps M_i (1/4 resolution)")),
        task=Classification(min_accuracy=0.96),
        train=TrainRecipe(lr=3e-3, loss=classification_loss, metrics=part_metrics, stages=_stages()),
    )


register_model(variant_spec())
