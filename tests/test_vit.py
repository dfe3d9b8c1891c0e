"""The small vision transformer (``mhsa``): attention against its formula and torch's, any input size, ONNX export."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

from training import create_model, get_spec
from training.models.vit import Attention, Block

NAME = "mhsa"


def _randomize(module: torch.nn.Module, std: float = 0.2, seed: int = 0) -> torch.nn.Module:
    """Weights far from init (timm's 0.02 makes the attention almost uniform): every parameter gets noise."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.add_(torch.randn_like(p) * std)
            else:
                p.normal_(0, std)
    return module.eval()


def _model(seed: int = 0) -> torch.nn.Module:
    return _randomize(create_model(NAME), seed=seed)


def test_attention_is_softmax_qk_scaled_times_v_and_matches_sdpa():
    attn = _randomize(Attention(16, num_heads=4), std=0.5)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        out, weights = attn(x)
        q, k, v = attn.qkv_heads(x)  # [B, heads, N, d]
        d = q.shape[-1]
        hand_w = torch.zeros(2, 4, 5, 5, dtype=torch.float64)
        hand_y = torch.zeros(2, 4, 5, d, dtype=torch.float64)
        for b in range(2):
            for h in range(4):
                qd, kd, vd = q[b, h].double(), k[b, h].double(), v[b, h].double()
                s = qd @ kd.T / np.sqrt(d)
                w = torch.exp(s - s.max(-1, keepdim=True).values)
                hand_w[b, h] = w / w.sum(-1, keepdim=True)
                hand_y[b, h] = hand_w[b, h] @ vd
        hand_out = attn.proj(hand_y.float().transpose(1, 2).flatten(2))
        sdpa_out = attn.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))
    assert weights.max() > 0.5  # not near-uniform: the test means something
    torch.testing.assert_close(weights, hand_w.float(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out, hand_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, sdpa_out, atol=1e-5, rtol=1e-5)


def test_qkv_split_is_timms_reshape():
    attn = _randomize(Attention(12, num_heads=3))
    x = torch.randn(2, 7, 12)
    q, k, v = attn.qkv_heads(x)
    ref = attn.qkv(x).reshape(2, 7, 3, 3, 4).permute(2, 0, 3, 1, 4)
    for got, want in zip((q, k, v), ref, strict=True):
        torch.testing.assert_close(got, want)


def test_block_matches_torch_multihead_attention():
    dim, heads = 16, 4
    block = _randomize(Block(dim, heads), std=0.3)
    mha = torch.nn.MultiheadAttention(dim, heads, batch_first=True).eval()
    with torch.no_grad():
        mha.in_proj_weight.copy_(block.attn.qkv.weight)
        mha.in_proj_bias.copy_(block.attn.qkv.bias)
        mha.out_proj.weight.copy_(block.attn.proj.weight)
        mha.out_proj.bias.copy_(block.attn.proj.bias)
        x = torch.randn(3, 9, dim)
        y = block.norm1(x)
        ref_out, ref_w = mha(y, y, y, need_weights=True, average_attn_weights=False)
        out, weights = block.attn(y)
        torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(weights, ref_w, atol=1e-6, rtol=1e-5)
        z = x + ref_out
        z = z + block.mlp(block.norm2(z))
        torch.testing.assert_close(block(x)[0], z, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("side", [64, 80])
def test_forward_shapes_match_spec(batch, side):
    spec = get_spec(NAME)
    with torch.no_grad():
        outputs = _model()(torch.rand(batch, 1, side, side))
    assert len(outputs) == len(spec.outputs)
    grid = {"patch_rows": side // 8, "patch_cols": side // 8}
    for out, ts in zip(outputs, spec.outputs, strict=True):
        assert tuple(out.shape) == (batch, *ts.concrete(grid)), ts.name
        assert torch.isfinite(out).all(), ts.name


def test_non_square_input():
    with torch.no_grad():
        logits, attention = _model()(torch.rand(2, 1, 96, 56))
    assert logits.shape == (2, 10) and attention.shape == (2, 1, 12, 7)


@pytest.mark.parametrize("side", [48, 64, 96])
def test_attention_output_is_a_distribution_over_patches(side):
    with torch.no_grad():
        _, attention = _model()(torch.rand(4, 1, side, side))
    assert (attention >= 0).all()
    torch.testing.assert_close(attention.sum(dim=(1, 2, 3)), torch.ones(4))
    assert (attention.flatten(1).std(1) * (side // 8) ** 2).min() > 0.05  # not uniform: std > 5% of the mean


def test_attention_output_is_the_last_blocks_class_token_row():
    model = _model()
    x = torch.rand(2, 1, 64, 64)
    seen = []
    hook = model.blocks[-1].attn.register_forward_hook(lambda m, i, o: seen.append(o[1]))
    with torch.no_grad():
        _, attention = model(x)
    hook.remove()
    row = seen[0][:, :, 0, 1:].mean(1)
    torch.testing.assert_close(attention.flatten(1), row / row.sum(-1, keepdim=True))


def test_position_embedding_is_the_learned_grid_at_the_training_size():
    model = _model()
    with torch.no_grad():
        torch.testing.assert_close(model.resampled_pos_embed(8, 8), model.pos_embed, atol=1e-6, rtol=0)
        assert model.resampled_pos_embed(10, 6).shape == (1, 61, model.pos_embed.shape[-1])


def test_tiny_training_run():
    from training.train import train_model

    record = train_model(NAME, steps=3, train_size=32, test_size=16, save=False, progress=False)
    assert np.isfinite(record["metrics"]["accuracy"])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from export.onnx_export import export_onnx

    model = _model(seed=1)
    path = export_onnx(get_spec(NAME), model, tmp_path_factory.mktemp("vit") / "mhsa.onnx")
    return model, path


def test_onnx_keeps_both_outputs_with_dynamic_sizes(exported):
    _, path = exported
    graph = onnx.load(path).graph
    outputs = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in graph.output}
    assert list(outputs) == ["logits", "attention"]
    assert outputs["logits"][1] == 10
    assert outputs["attention"][1] == 1
    assert all(isinstance(d, str) for d in outputs["attention"][2:]), outputs  # not frozen at 8x8
    resize = [n for n in graph.node if n.op_type == "Resize"]
    assert resize, "the position embedding grid is resampled in the graph"


def test_onnx_parity_dynamic_batch_and_size(exported):
    from export.parity import check_parity

    model, path = exported
    spec = get_spec(NAME)
    spec = dataclasses.replace(spec, checks=dataclasses.replace(spec.checks, parity_batches=(1, 3),
                                                                parity_sides=(64, 80)))
    result = check_parity(spec, model, path)
    assert result.worst <= 1e-4 and not result.failures
    assert {c["side"] for c in result.cases} == {64, 80} and set(result.max_abs) == {"logits", "attention"}


def test_onnx_parity_non_square(exported):
    from export.compare import Tolerance, compare
    from export.runners import OnnxRuntimeRunner, TorchRunner

    model, path = exported
    spec = get_spec(NAME)
    feeds = {"image": np.random.default_rng(0).uniform(0, 1, (3, 1, 72, 96)).astype(np.float32)}
    ref = TorchRunner.for_spec(spec, model).infer(feeds)
    got = OnnxRuntimeRunner(path).infer(feeds)
    assert got["attention"].shape == (3, 1, 9, 12)
    c = compare(ref, got, spec.outputs, Tolerance(1e-4, 1.0))
    assert c.ok, c.failures


def test_tensorrt_parses_the_graph(exported):
    from export.tensorrt import parse_onnx, trt_available

    if not trt_available():
        pytest.skip("neither tensorrt nor tensorrt_rtx is installed")
    report = parse_onnx(exported[1])
    assert [o["name"] for o in report.outputs] == ["logits", "attention"]
    assert report.inputs[0]["shape"] == [-1, 1, -1, -1]
