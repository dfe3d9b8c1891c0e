"""Non-local blocks ("Non-local Neural Networks", Wang et al. 2018) in a small CNN classifier.

y_i = 1/C(x) * sum_j f(x_i, x_j) g(x_j),  z = W y + x.  Four pairwise functions f:
  gaussian            exp(x_i . x_j)                        C = sum_j f  (softmax)
  embedded gaussian   exp(theta(x_i) . phi(x_j))            C = sum_j f  (softmax)
  dot product         theta(x_i) . phi(x_j)                 C = N
  concatenation       ReLU(w . [theta(x_i), phi(x_j)])      C = N

Export-minded choices (the "hard ops"):
- N for the dot/concat normalisation is read from the tensor's runtime shape, so the exported graph
  divides by Shape(...) and stays right at any input size; never a constant frozen at export.
- Concatenation never materialises the [N, N, 2C'] pair tensor: w = [w_theta; w_phi] splits the dot
  product into a column term plus a row term that broadcast to [N, N].
- Softmax variants use softmax (max-subtracted in every runtime) rather than exp/sum, so they stay
  finite in fp16; the gaussian's raw x_i . x_j logits are still large, so its affinity and softmax
  are kept in fp32 in FP16 graphs (spec.export.fp16_keep_fp32_ops).
"""

from __future__ import annotations

import torch
from torch import nn

from training.models.common import SmallCNN
from training.registry import (
    Dim,
    ExportOptions,
    ModelSpec,
    TensorSpec,
    TrainRecipe,
    class_logits,
    image_input,
    register_model,
)
from training.tasks import Classification

MODES = ("gaussian", "embedded", "dot", "concat")


class NonLocalBlock(nn.Module):
    def __init__(self, channels: int, mode: str = "embedded", inter_channels: int | None = None,
                 sub_sample: bool = True) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown non-local mode {mode!r}; expected one of {MODES}")
        self.mode = mode
        inter = inter_channels or max(channels // 2, 1)
        self.g = nn.Conv2d(channels, inter, 1)
        if mode != "gaussian":
            self.theta = nn.Conv2d(channels, inter, 1)
            self.phi = nn.Conv2d(channels, inter, 1)
        if mode == "concat":
            # w . [theta_i, phi_j] = w_theta . theta_i + w_phi . phi_j (decomposed weight).
            self.w_theta = nn.Conv2d(inter, 1, 1, bias=False)
            self.w_phi = nn.Conv2d(inter, 1, 1, bias=False)
        self.pool = nn.MaxPool2d(2) if sub_sample else nn.Identity()
        self.W = nn.Conv2d(inter, channels, 1)
        # Zero W: the block starts as the identity and cannot disturb a pretrained path.
        nn.init.zeros_(self.W.weight)
        nn.init.zeros_(self.W.bias)

    def affinity(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised pairwise weights f(x_i, x_j)/C(x): [B, N_i, N_j]."""
        if self.mode == "gaussian":
            q = x.flatten(2).transpose(1, 2)  # [B, N, C]
            k = self.pool(x).flatten(2)  # [B, C, Nj]
            return torch.softmax(q @ k, dim=-1)
        q = self.theta(x).flatten(2).transpose(1, 2)  # [B, N, C']
        kmap = self.pool(self.phi(x))
        if self.mode == "embedded":
            return torch.softmax(q @ kmap.flatten(2), dim=-1)
        n = kmap.shape[-2] * kmap.shape[-1]  # runtime N_j: symbolic in the exported graph
        if self.mode == "dot":
            return (q @ kmap.flatten(2)) / n
        col = self.w_theta(self.theta(x)).flatten(2).transpose(1, 2)  # [B, N, 1]
        row = self.w_phi(kmap).flatten(2)  # [B, 1, Nj]
        return torch.relu(col + row) / n

    def attend(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z = W y + x, and the affinity f(x_i, .)/C of the centre query position over the key positions
        [B, 1, hk, wk] (what the block attends to, for drawing)."""
        f = self.affinity(x)
        v = self.pool(self.g(x)).flatten(2).transpose(1, 2)  # [B, Nj, C']
        y = (f @ v).transpose(1, 2).unflatten(2, x.shape[-2:])  # [B, C', H, W]
        h, w = x.shape[-2], x.shape[-1]
        centre = (h // 2) * w + w // 2  # runtime sizes: symbolic in the exported graph
        keys = (h // 2, w // 2) if isinstance(self.pool, nn.MaxPool2d) else (h, w)  # MaxPool2d(2) floors
        query = f[:, centre].unflatten(1, keys).unsqueeze(1)  # [B, 1, hk, wk]: a Gather, so the 1 stays static
        return x + self.W(y), query

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attend(x)[0]


class NonLocalCNN(SmallCNN):
    """The small CNN with a non-local block at 1/4 resolution; also returns the block's attention map."""

    def __init__(self, mode: str, num_classes: int = 10, in_chans: int = 1) -> None:
        super().__init__(num_classes, mid=NonLocalBlock(32, mode), in_chans=in_chans)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z, attention = self.mid.attend(self.stem(x))
        return self.fc(self.head(z).mean(dim=(2, 3))), attention


def nonlocal_cnn(mode: str, num_classes: int = 10, in_chans: int = 1) -> NonLocalCNN:
    return NonLocalCNN(mode, num_classes, in_chans)


# Keys are the block's input (1/4 of the image) max-pooled once more: 1/8 of the image side.
KEY_GRID = Dim("key_rows", 6, 8, 12), Dim("key_cols", 6, 8, 12)
ATTENTION = TensorSpec("attention", (1, *KEY_GRID), "float32", "map",
                       "the block's weights f(x_i, .)/C of the centre position over the key positions")
_RECIPE = TrainRecipe(steps=1500, batch_size=64, lr=3e-3)

register_model(ModelSpec(
    name="cnn",
    family="cnn",
    builder=SmallCNN,
    description="plain small CNN of the same size: the baseline the attention models are compared with",
    inputs=(image_input(),),
    outputs=(class_logits(),),
    task=Classification(min_accuracy=0.93),
    train=_RECIPE,
))

for _mode in MODES:
    register_model(ModelSpec(
        name=f"nonlocal_{_mode}",
        family="nonlocal",
        builder=lambda m=_mode, **kw: nonlocal_cnn(m, **kw),
        description=f"small CNN with a {_mode} non-local block at 1/4 resolution",
        inputs=(image_input(),),
        outputs=(class_logits(), ATTENTION),
        task=Classification(min_accuracy=0.95),
        train=_RECIPE,
        export=ExportOptions(
            # The gaussian's logits x_i . x_j have no learned scale. Measured (`python -m export.fp16
            # --probe`): they peak at ~182 on test images, far from fp16's 65504, and top-1 agreement is
            # 1.0 with or without this list; kept as cheap insurance against inputs outside the data.
            fp16_keep_fp32_ops=("MatMul", "Softmax") if _mode == "gaussian" else (),
        ),
    ))
