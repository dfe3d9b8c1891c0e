"""Export-time rewrites that put each attention block's softmax(q k^T * s + bias) v in one ONNX
``Attention`` node (opset 23): ``F.scaled_dot_product_attention``, which the dynamo exporter writes as one, or
the export-only op ``multi_head_attention`` for timm-style [B, N, C] attention (mmdeploy's habit: the rewrite
lives beside the model, and is applied only while exporting).

Why: written out as MatMul -> Mul -> Softmax -> MatMul, with timm's 5-D qkv Split/Squeeze/Transpose in front,
the graph matches none of onnxruntime's attention fusion patterns, so each block runs as separate kernels that
write the [B, heads, N, N] scores to memory; one ``Attention`` node runs as one kernel.

What the served models also return is one query's attention weights (the class token's in the ViT, the
centre query's in the generalized attention CNN), which a fused kernel does not give back. Each rewrite keeps
those weights by computing that single row written out (softmax of one query's logits: O(N) work next to the
block's O(N^2)). The parity gate checks every output of the rewritten graph against the unrewritten torch model.

Registered as ``fused_attention`` in ``export.rewriters.registry``, which patches these methods in only while
exporting, where the model holds an attention block they rewrite.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from onnxscript import opset23 as op23
from torch import nn

from training.models.generalized_attention import GeneralizedAttention, relative_position_embedding
from training.models.vit import Attention

FUSED_ATTENTION = "fused_attention"
_ORIGINAL_CENTRE_ATTENTION = GeneralizedAttention.centre_attention  # the unfusable blocks keep it
MIN_OPSET = 23  # the first opset with the ``Attention`` op


@torch.library.custom_op("attnzoo_export::multi_head_attention", mutates_args=())
def multi_head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int,
                         scale: float) -> torch.Tensor:
    """Multi-head attention on [B, N, heads * d] tensors (heads split from and merged into the channel axis):
    an export-only op, written as one ONNX ``Attention`` with 3-D inputs (``attention_onnx``; the dynamo
    exporter writes F.scaled_dot_product_attention as a 4-D one, between Transposes)."""
    def split(t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (num_heads, t.shape[-1] // num_heads)).transpose(1, 2)

    return F.scaled_dot_product_attention(split(q), split(k), split(v), scale=scale).transpose(1, 2).flatten(2)


@multi_head_attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    return q.new_empty(q.shape)


def attention_onnx(q, k, v, num_heads: int, scale: float):
    """The ONNX translation of ``multi_head_attention`` (``export.rewriters.translation_table``)."""
    y, *_ = op23.Attention(q, k, v, q_num_heads=num_heads, kv_num_heads=num_heads, scale=scale)
    return y


def vit_attention_forward(self: Attention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """timm's ``Attention.forward`` as one 3-D ``Attention`` node; returns (out, the first query's weights
    [B, heads, 1, N]).

    q, k, v are the thirds of the qkv Linear's output (timm's (3, heads, d) channel layout), so the 5-D
    Reshape/Transpose/Split/Squeeze in front of the scores and the Transpose behind them are gone (measured: 15%
    of mhsa's onnxruntime time at batch 32 with them). The ViT reads only the class token's row of the weights
    (``attn[:, :, 0, 1:]``), which indexes the same values in [B, heads, 1, N] as in the full [B, heads, N, N]."""
    q, k, v = self.qkv(x).chunk(3, dim=-1)
    out = multi_head_attention(q, k, v, self.num_heads, self.scale)
    heads, d = self.num_heads, self.head_dim
    q0 = q[:, :1].unflatten(-1, (heads, d)).transpose(1, 2)  # [B, heads, 1, d]
    kt = k.unflatten(-1, (heads, d)).permute(0, 2, 3, 1)  # [B, heads, d, N]
    return self.proj(out), torch.softmax((q0 @ kt) * self.scale, dim=-1)


def _fusable(block: GeneralizedAttention) -> bool:
    """Term sets with the query-key content term E1, no local mask and no query stride. Without E1 (the served
    "0011": E3 + E4) the logits do not depend on the query's content and the written-out block is cheap
    (u . k is one row, the position term one broadcast Add): fused, with u as every query, it measured 1.13x
    faster at batch 1 but 0.80x at batch 32 (onnxruntime, 2 threads), so it stays written out."""
    return bool(block.attention_type[0]) and block.spatial_range < 0 and block.q_downsample is None


def _position_terms(block: GeneralizedAttention, query: torch.Tensor | None, h: int, w: int, h_kv: int,
                    w_kv: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The position terms E2 + E4 (``GeneralizedAttention.energy``'s) as (per key row [n or 1, heads, h*w, h_kv],
    per key column [n or 1, heads, h*w, w_kv]): the logit of key (jy, jx) adds row jy and column jx."""
    _, e2, _, e4 = block.attention_type
    if not (e2 or e4):
        return None
    heads, d = block.num_heads, block.qk_embed_dim
    emb_x, emb_y = relative_position_embedding(h, w, h_kv, w_kv, block.q_stride, block.kv_stride,
                                               block.position_magnitude, block.position_embedding_dim, like)
    pos_x = block.appr_geom_fc_x(emb_x).unflatten(2, (heads, d)).permute(2, 0, 1, 3) / math.sqrt(2)
    pos_y = block.appr_geom_fc_y(emb_y).unflatten(2, (heads, d)).permute(2, 0, 1, 3) / math.sqrt(2)
    if e2:
        q = (query + block.geom_bias.view(1, heads, 1, d) if e4 else query).unflatten(2, (h, w))
        per_col = (q.transpose(2, 3) @ pos_x.transpose(-1, -2)).transpose(2, 3)  # [n, heads, h, w, w_kv]
        per_row = q @ pos_y.transpose(-1, -2)  # [n, heads, h, w, h_kv]
    else:
        v = block.geom_bias.view(heads, 1, 1, d)
        per_col = (pos_x * v).sum(-1)[None, :, None].expand(1, heads, h, w, w_kv)
        per_row = (pos_y * v).sum(-1)[None, :, :, None].expand(1, heads, h, w, h_kv)
    return per_row.flatten(2, 3), per_col.flatten(2, 3)


def _one_hot_rows_cols(h_kv: int, w_kv: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each key j = (jy, jx) in row-major order: one-hot jy [h_kv*w_kv, h_kv] and one-hot jx [h_kv*w_kv, w_kv]
    (built by comparisons: ``%`` on a runtime size does not export)."""
    a, b = torch.arange(h_kv, device=like.device), torch.arange(w_kv, device=like.device)
    rows = (a[:, None, None] == a[None, None, :]).expand(h_kv, w_kv, h_kv).flatten(0, 1)
    cols = (b[None, :, None] == b[None, None, :]).expand(h_kv, w_kv, w_kv).flatten(0, 1)
    return rows.to(like.dtype), cols.to(like.dtype)


def generalized_centre_attention(self: GeneralizedAttention, x_input: torch.Tensor
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``GeneralizedAttention.centre_attention`` with the block as one SDPA and no mask: every term is a dot
    product of an augmented query and key. The content terms are (q + u) . k (E1 + E3, as mmcv folds them); the
    position terms E2 + E4 of query i and key (jy, jx) are a row term P_y[i, jy] plus a column term P_x[i, jx]
    (``_position_terms``), i.e. [P_y[i], P_x[i]] . [onehot(jy), onehot(jx)]. So q_i' = [q_i + u, P_y[i], P_x[i]]
    and k_j' = [k_j, onehot(jy), onehot(jx)] give the block's logits inside the kernel (head size
    d + h_kv + w_kv), instead of a [n, heads, h*w, h_kv*w_kv] mask built by a broadcast Add (measured: the
    same speed at batch 32, 1.11x faster at batch 1)."""
    if not _fusable(self):
        return _ORIGINAL_CENTRE_ATTENTION(self, x_input)
    e3 = self.attention_type[2]
    heads, d = self.num_heads, self.qk_embed_dim
    x_kv = self.kv_downsample(x_input) if self.kv_downsample is not None else x_input
    n, h, w = x_input.shape[0], x_input.shape[-2], x_input.shape[-1]
    h_kv, w_kv = x_kv.shape[-2], x_kv.shape[-1]
    query = self._heads(self.query_conv(x_input), d).transpose(2, 3)  # [n, heads, hw, d]
    key = self._heads(self.key_conv(x_kv), d).transpose(2, 3)  # [n, heads, hw_kv, d]
    value = self._heads(self.value_conv(x_kv), self.v_dim).transpose(2, 3)  # [n, heads, hw_kv, v_dim]
    u = self.appr_bias.view(1, heads, 1, d) if e3 else None
    q = query + u if e3 else query
    k = key
    position = _position_terms(self, query, h, w, h_kv, w_kv, x_input)
    if position is not None:
        per_row, per_col = position
        rows, cols = _one_hot_rows_cols(h_kv, w_kv, key)
        q = torch.cat((q, per_row.expand(n, -1, -1, -1), per_col.expand(n, -1, -1, -1)), dim=-1)
        k = torch.cat((key, rows.expand(n, heads, -1, -1), cols.expand(n, heads, -1, -1)), dim=-1)
    v = value
    if q.shape[-1] != value.shape[-1]:  # TensorRT's attention layer wants one head size for q, k and v: pad v
        v = torch.cat((value, value.new_zeros(1, 1, 1, 1).expand(n, heads, h_kv * w_kv, q.shape[-1] - self.v_dim)),
                      dim=-1)
    out = F.scaled_dot_product_attention(q, k, v, scale=1.0)[..., :self.v_dim]  # mmcv: no 1/sqrt(d)
    out = self.proj_conv(out.transpose(2, 3).flatten(1, 2).unflatten(2, (h, w)))
    centre = (h // 2) * w + w // 2
    row = torch.softmax(q[:, :, centre:centre + 1] @ k.transpose(-1, -2), dim=-1)[:, :, 0]  # [n, heads, hw_kv]
    return self.gamma * out + x_input, row.mean(dim=1).unflatten(1, (h_kv, w_kv)).unsqueeze(1)


def holds_fusable_attention(module: nn.Module) -> bool:
    return any(isinstance(m, Attention) or (isinstance(m, GeneralizedAttention) and _fusable(m))
               for m in module.modules())
