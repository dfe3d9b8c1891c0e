"""A small vision transformer ("An Image is Worth 16x16 Words", Dosovitskiy et al. 2021): multi-head self-attention.

Laid out as timm's ``VisionTransformer`` (parameter names ``patch_embed.proj``, ``cls_token``, ``pos_embed``,
``blocks.i.norm1/attn.qkv/attn.proj/norm2/mlp.fc1/mlp.fc2``, ``norm``, ``head``): 8x8-patch tokens from a
small conv stem (``patch_embed.stem`` + ``patch_embed.proj``, see ``PatchEmbed``), a class token, learned
position embeddings for the 8x8 training grid (class token included, as timm), pre-norm blocks, a final norm
and a linear head on the class token.

Export-minded choices:
- The attention math is written out (softmax(q k^T * scale) v) rather than calling
  ``F.scaled_dot_product_attention`` or ``nn.MultiheadAttention``, so the weights exist as a tensor and
  the served ``attention`` output is a plain graph output (exporters drop MHA's optional weights).
- Any input size (timm's ``dynamic_img_size``): the position-embedding grid is resampled to the runtime
  patch grid, whose size is read from the patch embedding's output shape, so the exported Resize takes
  its sizes from Shape() and never from a Python int frozen at export. At the training grid the bicubic
  resample is the identity (half-pixel, scale 1).
- Reshapes are ``unflatten``/``flatten``: the batch and the token count stay symbolic.

``attention``: the class token's attention over the patches in the last block, mean over heads, with the
class token's weight on itself dropped and the rest renormalised so that the map sums to 1 over patches.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from training.registry import (
    Dim,
    ModelSpec,
    TensorSpec,
    TrainRecipe,
    class_logits,
    image_input,
    register_model,
)
from training.tasks import Classification

PATCH = 8
GRID = 8  # patch grid of the 64 px training canvas


class Attention(nn.Module):
    """timm's ``Attention``: one ``qkv`` Linear split into heads, ``proj`` back; returns (out, weights)."""

    def __init__(self, dim: int, num_heads: int = 4, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, N, C] -> q, k, v, each [B, heads, N, head_dim] (timm's reshape(B, N, 3, h, d).permute(2, 0, 3, 1, 4))."""
        qkv = self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim)).permute(2, 0, 3, 1, 4)
        return qkv.unbind(0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, v = self.qkv_heads(x)
        attn = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)  # [B, heads, N, N]
        out = (attn @ v).transpose(1, 2).flatten(2)  # [B, N, C]
        return self.proj(out), attn


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block; returns (tokens, attention weights [B, heads, N, N])."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 2.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, attn = self.attn(self.norm1(x))
        x = x + y
        return x + self.mlp(self.norm2(x)), attn


class PatchEmbed(nn.Module):
    """Tokens for 8x8 patches from a small convolutional stem (Xiao et al. 2021, "Early Convolutions Help
    Transformers See Better"): three stride-2 3x3 conv-BN-ReLU stages and a 1x1 ``proj`` to the token width.
    Measured here: the plain 8x8 patchify conv trained to 52% test accuracy in 2000 steps on cluttered digits;
    a ViT this small needs the stem's locality to find a 14-28 px digit among clutter."""

    def __init__(self, patch: int, in_chans: int, dim: int) -> None:
        super().__init__()
        stages, chans = [], (in_chans, 16, 32, 64)
        for k in range(int(math.log2(patch))):
            cin, cout = chans[min(k, 3)], chans[min(k + 1, 3)]
            stages += [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
        self.stem = nn.Sequential(*stages)
        self.proj = nn.Conv2d(chans[min(int(math.log2(patch)), 3)], dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.stem(x))  # [B, C, H // patch, W // patch]


class VisionTransformer(nn.Module):
    """Returns (logits [B, classes], attention [B, 1, H // 8, W // 8])."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1, dim: int = 64, depth: int = 4, num_heads: int = 4,
                 mlp_ratio: float = 2.0, patch: int = PATCH, grid: int = GRID) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(patch, in_chans, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + grid * grid, dim) * 0.02)
        self.grid = grid
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.normal_(self.cls_token, std=1e-6)  # timm's init
        self.apply(_init_weights)

    def resampled_pos_embed(self, rows: int, cols: int) -> torch.Tensor:
        """Position embeddings [1, 1 + rows*cols, C] for a rows x cols patch grid (timm's resample_abs_pos_embed,
        without antialiasing): ``rows``/``cols`` come from tensor shapes, so they stay symbolic under export."""
        cls_pos, grid_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        grid_pos = grid_pos.unflatten(1, (self.grid, self.grid)).permute(0, 3, 1, 2)  # [1, C, g, g]
        grid_pos = F.interpolate(grid_pos, size=(rows, cols), mode="bicubic", align_corners=False)
        return torch.cat((cls_pos, grid_pos.flatten(2).transpose(1, 2)), dim=1)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.patch_embed(image)  # [B, C, h, w]
        rows, cols = x.shape[-2], x.shape[-1]
        x = x.flatten(2).transpose(1, 2)  # [B, h*w, C]
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = x + self.resampled_pos_embed(rows, cols)
        attn = None
        for block in self.blocks:
            x, attn = block(x)
        x = self.norm(x)
        logits = self.head(x[:, 0])
        cls_attn = attn[:, :, 0, 1:].mean(dim=1)  # [B, h*w]: the class token over the patches, mean over heads
        cls_attn = cls_attn / cls_attn.sum(dim=-1, keepdim=True)
        return logits, cls_attn.unflatten(1, (rows, cols)).unsqueeze(1)


def _init_weights(m: nn.Module) -> None:
    """timm's ViT init for Linear (truncated normal 0.02, zero bias); LayerNorm and the conv keep torch's."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def vit_tiny_patch8(num_classes: int = 10, in_chans: int = 1, **kwargs) -> VisionTransformer:
    """The served size: dim 64, depth 4, 4 heads, MLP ratio 2."""
    return VisionTransformer(num_classes, in_chans, **kwargs)


PATCH_ROWS, PATCH_COLS = Dim("patch_rows", 6, 8, 12), Dim("patch_cols", 6, 8, 12)  # 48-96 px / 8

register_model(ModelSpec(
    name="mhsa",
    family="vit",
    builder=vit_tiny_patch8,
    description="small vision transformer (patch 8, dim 64, depth 4, 4 heads): multi-head self-attention",
    inputs=(image_input(),),
    outputs=(
        class_logits(),
        TensorSpec("attention", (1, PATCH_ROWS, PATCH_COLS), "float32", "map",
                   "last block's class-token attention over the 8 px patches, mean over heads (sums to 1)"),
    ),
    # Measured: with the 10k-image default split it overfits (train batches 98%, test 90.75% after 2500
    # steps); three times the data and label smoothing are the transformer's usual remedies.
    task=Classification(min_accuracy=0.93, label_smoothing=0.1),
    train=TrainRecipe(steps=3000, batch_size=64, lr=1e-3, weight_decay=0.05, train_size=30_000),
))
