"""Generalized attention (Zhu et al. 2019, mmcv's parametrisation): each term against a per-position computation,
mmcv's init and parameter names, the runtime position embedding, and ONNX export with dynamic sizes."""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

from training import create_model, get_spec, list_models
from training.models.common import SmallCNN
from training.models.generalized_attention import (
    SERVED,
    GeneralizedAttention,
    ablation_spec,
    local_constraint_mask,
    relative_position_embedding,
)

ALL_TYPES = ["".join(b) for b in itertools.product("01", repeat=4) if "1" in b]


def _randomized(bits: str, channels: int = 8, heads: int = 2, kv_stride: int = 2, q_stride: int = 1,
                magnitude: int = 1, spatial_range: int = -1, seed: int = 0) -> GeneralizedAttention:
    torch.manual_seed(seed)
    block = GeneralizedAttention(channels, spatial_range=spatial_range, num_heads=heads, position_magnitude=magnitude,
                                 kv_stride=kv_stride, q_stride=q_stride, attention_type=bits).eval()
    with torch.no_grad():
        for p in block.parameters():  # gamma starts at 0 (identity block): give everything weights to test
            p.normal_(0, 0.5)
    return block


def _emb(diff: float, dim: int) -> np.ndarray:
    """Sinusoidal embedding of one coordinate difference (the paper / mmcv): [sin(d / 1000^(4k/D)), cos(...)]."""
    f = diff / 1000.0 ** (4 * np.arange(dim // 4) / dim)
    return np.concatenate([np.sin(f), np.cos(f)])


def _naive(block: GeneralizedAttention, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The block on one image, one (head, query, key) at a time, in float64 from the paper's four terms.
    Returns (output [C, H, W], attention [heads, Nq, Nkv])."""
    e1, e2, e3, e4 = block.attention_type
    heads, d, dv, dim = block.num_heads, block.qk_embed_dim, block.v_dim, block.position_embedding_dim
    qs, s, mag = block.q_stride, block.kv_stride, block.position_magnitude

    def w(name):
        return getattr(block, name).weight.detach().double().numpy().reshape(getattr(block, name).weight.shape[0], -1)

    X = x[0].double().numpy()
    Xq, Xkv = X[:, ::qs, ::qs], X[:, ::s, ::s]  # 1x1 average pools with a stride: strided sampling
    _, h, wq = Xq.shape
    _, hk, wk = Xkv.shape
    Wq = w("query_conv") if e1 or e2 else None
    Wk = w("key_conv") if e1 or e3 else None
    Wv, Wp = w("value_conv"), w("proj_conv")
    bp = block.proj_conv.bias.detach().double().numpy()
    Wx, Wy = (w("appr_geom_fc_x"), w("appr_geom_fc_y")) if e2 or e4 else (None, None)
    u = block.appr_bias.detach().double().numpy() if e3 else None
    v = block.geom_bias.detach().double().numpy() if e4 else None
    energy = np.zeros((heads, h * wq, hk * wk))
    for m in range(heads):
        sl = slice(m * d, (m + 1) * d)
        for i, j, a, b in itertools.product(range(h), range(wq), range(hk), range(wk)):
            xq, xk = Xq[:, i, j], Xkv[:, a, b]
            e = 0.0
            if e1 or e2:
                q = Wq[sl] @ xq
            if e1 or e3:
                k = Wk[sl] @ xk
            if e2 or e4:
                rx, ry = _emb((j * qs - b * s) * mag, dim), _emb((i * qs - a * s) * mag, dim)
                r = (Wx[sl] @ rx + Wy[sl] @ ry) / np.sqrt(2)
            if e1:
                e += q @ k
            if e2:
                e += q @ r
            if e3:
                e += u[sl] @ k
            if e4:
                e += v[sl] @ r
            energy[m, i * wq + j, a * wk + b] = e
    att = np.exp(energy - energy.max(-1, keepdims=True))
    att /= att.sum(-1, keepdims=True)
    values = Wv @ Xkv.reshape(Xkv.shape[0], -1)  # [heads*dv, Nkv]
    y = np.concatenate([att[m] @ values[m * dv:(m + 1) * dv].T for m in range(heads)], axis=1)  # [Nq, heads*dv]
    out = (y @ Wp.T + bp).T.reshape(-1, h, wq)
    if qs > 1:
        out = F.interpolate(torch.from_numpy(out)[None], size=X.shape[1:], mode="bilinear", align_corners=False)[0]
        out = out.numpy()
    return X + block.gamma.item() * out, att


@pytest.mark.parametrize("bits", ["1000", "0100", "0010", "0001", "1111", "0111", "0101", "0011", "1010"])
@pytest.mark.parametrize("kv_stride", [1, 2])
def test_block_matches_the_papers_terms(bits, kv_stride):
    block = _randomized(bits, kv_stride=kv_stride)
    x = torch.randn(1, 8, 5, 6)
    with torch.no_grad():
        out, att = block.forward_with_attention(x)
    ref_out, ref_att = _naive(block, x)
    np.testing.assert_allclose(out[0].numpy(), ref_out, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.broadcast_to(att[0].numpy(), ref_att.shape), ref_att, atol=1e-5, rtol=1e-4)
    assert ref_att.max() > 1.3 / ref_att.shape[-1]  # weights not uniform: the test means something


@pytest.mark.parametrize("bits", ["1111", "0101"])
def test_strides_and_magnitude(bits):
    block = _randomized(bits, kv_stride=2, q_stride=2, magnitude=3)
    x = torch.randn(1, 8, 7, 6)
    with torch.no_grad():
        out = block(x)
    np.testing.assert_allclose(out[0].numpy(), _naive(block, x)[0], atol=1e-4, rtol=1e-4)


def test_batch_items_are_independent():
    block = _randomized("1111")
    x = torch.randn(3, 8, 6, 6)
    with torch.no_grad():
        out = block(x)
        for i in range(3):
            torch.testing.assert_close(out[i:i + 1], block(x[i:i + 1]))


@pytest.mark.parametrize("bits", ["0000", "111", "11111", "012a", "1x11"])
def test_bad_attention_type_is_rejected(bits):
    with pytest.raises(ValueError, match="attention_type"):
        GeneralizedAttention(8, num_heads=2, attention_type=bits)


@pytest.mark.parametrize("bits", ALL_TYPES)
def test_block_starts_as_identity_like_mmcv(bits):
    """mmcv: gamma = zeros(1), so out = 0 * proj + x = x exactly; kaiming uniform (fan_in, a=1: bound
    sqrt(3 / fan_in)) on the convs and position FCs with zero proj bias; appr/geom biases in +-1/sqrt(2d)."""
    torch.manual_seed(0)
    block = GeneralizedAttention(32, num_heads=4, attention_type=bits).eval()
    assert block.gamma.shape == (1,) and block.gamma.item() == 0.0
    x = torch.randn(2, 32, 12, 10)
    with torch.no_grad():
        torch.testing.assert_close(block(x), x, atol=0, rtol=0)
    for name, m in block.named_children():
        if isinstance(m, torch.nn.Conv2d | torch.nn.Linear):
            fan_in = m.weight[0].numel()
            bound = math.sqrt(3.0 / fan_in)
            assert m.weight.abs().max() <= bound, name
            assert m.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.15), name
    assert not block.proj_conv.bias.any()
    stdv = 1 / math.sqrt(2 * block.qk_embed_dim)
    for name in ("appr_bias", "geom_bias"):
        if hasattr(block, name):
            assert getattr(block, name).abs().max() <= stdv


def _mmcv_keys(bits: str, c: int, heads: int, pos_dim: int) -> dict[str, tuple[int, ...]]:
    """The state_dict of mmcv v2.2.0's GeneralizedAttention(c, num_heads=heads, position_embedding_dim=pos_dim,
    attention_type=bits), spatial_range=-1, as read from its __init__ (query_conv if E1|E2, key_conv if E1|E3,
    appr_geom_fc_x/y if E2|E4, appr_bias if E3, geom_bias if E4)."""
    e1, e2, e3, e4 = (b == "1" for b in bits)
    d = c // heads
    out_c, pe = d * heads, pos_dim if pos_dim > 0 else c
    keys = {}
    if e1 or e2:
        keys["query_conv.weight"] = (out_c, c, 1, 1)
    if e1 or e3:
        keys["key_conv.weight"] = (out_c, c, 1, 1)
    keys["value_conv.weight"] = (out_c, c, 1, 1)
    if e2 or e4:
        keys["appr_geom_fc_x.weight"] = (out_c, pe // 2)
        keys["appr_geom_fc_y.weight"] = (out_c, pe // 2)
    if e3:
        keys["appr_bias"] = (out_c,)
    if e4:
        keys["geom_bias"] = (out_c,)
    keys["proj_conv.weight"] = (c, out_c, 1, 1)
    keys["proj_conv.bias"] = (c,)
    keys["gamma"] = (1,)
    return keys


@pytest.mark.parametrize("bits", ALL_TYPES)
@pytest.mark.parametrize(("c", "heads", "pos_dim"), [(32, 4, -1), (32, 9, -1), (64, 8, 16)])
def test_state_dict_names_and_shapes_are_mmcvs(bits, c, heads, pos_dim):
    block = GeneralizedAttention(c, num_heads=heads, position_embedding_dim=pos_dim, attention_type=bits)
    got = {k: tuple(v.shape) for k, v in block.state_dict().items()}
    assert got == _mmcv_keys(bits, c, heads, pos_dim)


def _np_embedding(h, w, hk, wk, qs, kvs, mag, dim):
    wl = 1000.0 ** (4 * np.arange(dim // 4) / dim)

    def emb(n, nk):
        diff = (np.arange(n)[:, None] * qs - np.arange(nk)[None, :] * kvs) * mag
        f = diff[..., None] / wl
        return np.concatenate([np.sin(f), np.cos(f)], axis=-1)

    return emb(w, wk), emb(h, hk)


@pytest.mark.parametrize(("h", "w", "hk", "wk", "qs", "kvs", "mag", "dim"),
                         [(16, 16, 8, 8, 1, 2, 1, 32), (12, 20, 6, 10, 1, 2, 2, 16), (9, 7, 9, 7, 1, 1, 1, 32)])
def test_relative_position_embedding_matches_numpy(h, w, hk, wk, qs, kvs, mag, dim):
    ex, ey = relative_position_embedding(h, w, hk, wk, qs, kvs, mag, dim, torch.zeros(1))
    nx, ny = _np_embedding(h, w, hk, wk, qs, kvs, mag, dim)
    assert ex.shape == (w, wk, dim // 2) and ey.shape == (h, hk, dim // 2)
    np.testing.assert_allclose(ex.numpy(), nx, atol=2e-6)
    np.testing.assert_allclose(ey.numpy(), ny, atol=2e-6)


@pytest.mark.parametrize(("h", "w", "r", "s"), [(9, 11, 2, 2), (8, 6, 1, 1), (7, 7, 0, 2)])
def test_local_constraint_mask_matches_mmcvs_rule(h, w, r, s):
    hk, wk = (h - 1) // s + 1, (w - 1) // s + 1
    ref = np.ones((h, w, hk, wk), dtype=bool)  # True: masked (mmcv's 1)
    for iy, ix in itertools.product(range(h), range(w)):
        ref[iy, ix, max((iy - r) // s, 0):(iy + r + 1) // s + 1, max((ix - r) // s, 0):(ix + r + 1) // s + 1] = False
    got = local_constraint_mask(h, w, hk, wk, r, s, torch.zeros(1))
    np.testing.assert_array_equal(got.numpy(), ref)


def test_spatial_range_zeroes_attention_outside_the_window():
    block = _randomized("1111", spatial_range=1, kv_stride=1)
    x = torch.randn(2, 8, 6, 7)
    with torch.no_grad():
        _, att = block.forward_with_attention(x)
    mask = local_constraint_mask(6, 7, 6, 7, 1, 1, x).flatten(2).flatten(0, 1)
    assert (att[:, :, mask] == 0).all() and (att[:, :, ~mask] > 0).all()
    torch.testing.assert_close(att.sum(-1), torch.ones(2, 2, 42))


# ------------------------------------------------------------------------------------------- served models


def test_served_variants_are_registered():
    names = [f"gen_attention_{b}" for b in SERVED]
    assert set(names) <= set(list_models()) and "gen_attention_1111" in names and len(names) == 2
    for name in names:
        spec, model = get_spec(name), create_model(name)
        assert spec.task.min_accuracy == 0.95 and spec.output_names == ("logits", "attention")
        assert isinstance(model, SmallCNN) and isinstance(model.mid, GeneralizedAttention)
        assert model.mid.in_channels == 32 and "".join(str(int(b)) for b in model.mid.attention_type) == name[-4:]


def test_ablation_spec():
    spec = ablation_spec("0010", seed=3)
    served = get_spec("gen_attention_1111")
    assert spec.name == "gen_attention_0010_seed3" and spec.name not in list_models()
    assert spec.train == dataclasses.replace(served.train, seed=3)
    assert spec.task == served.task and spec.outputs == served.outputs
    model = spec.builder()
    assert "".join(str(int(b)) for b in model.mid.attention_type) == "0010"
    with torch.no_grad():
        logits, attention = model(torch.rand(2, 1, 64, 64))
    assert logits.shape == (2, 10) and attention.shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match="attention_type"):
        ablation_spec("0000", seed=0)


def _model(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = create_model(name).eval()
    with torch.no_grad():
        for p in model.mid.parameters():
            p.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("name", [f"gen_attention_{b}" for b in SERVED])
@pytest.mark.parametrize(("height", "width"), [(64, 64), (80, 80), (96, 72), (57, 71)])
def test_forward_shapes_and_attention_sums_to_one(name, height, width):
    spec = get_spec(name)
    with torch.no_grad():
        logits, attention = _model(name)(torch.rand(3, 1, height, width))
    h_kv, w_kv = (height // 4 + 1) // 2, (width // 4 + 1) // 2
    assert logits.shape == (3, *spec.outputs[0].shape)
    assert attention.shape == (3, *spec.outputs[1].concrete({"key_rows": h_kv, "key_cols": w_kv}))
    assert (attention >= 0).all()
    torch.testing.assert_close(attention.sum(dim=(1, 2, 3)), torch.ones(3))


def test_attention_output_is_the_centre_query_mean_over_heads():
    model = _model("gen_attention_1111")
    x = torch.rand(2, 1, 64, 80)
    with torch.no_grad():
        feat = model.stem(x)  # [2, 32, 16, 20]
        _, att = model.mid.forward_with_attention(feat)
        _, attention = model(x)
    centre = 8 * 20 + 10
    torch.testing.assert_close(attention.flatten(1), att[:, :, centre].mean(1))


@pytest.mark.parametrize("name", [f"gen_attention_{b}" for b in SERVED])
def test_tiny_training_run(name):
    from training.train import train_model

    record = train_model(name, steps=3, train_size=32, test_size=16, save=False, progress=False)
    assert np.isfinite(record["metrics"]["accuracy"])


@pytest.fixture(scope="module", params=[f"gen_attention_{b}" for b in SERVED])
def exported(request, tmp_path_factory):
    from export.onnx_export import export_onnx

    model = _model(request.param, seed=1)
    path = export_onnx(get_spec(request.param), model, tmp_path_factory.mktemp("ga") / f"{request.param}.onnx")
    return request.param, model, path


def test_onnx_keeps_both_outputs_with_dynamic_sizes(exported):
    _, _, path = exported
    outputs = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim]
               for o in onnx.load(path).graph.output}
    assert list(outputs) == ["logits", "attention"]
    assert all(isinstance(d, str) for d in outputs["attention"][2:]), outputs


def test_onnx_parity_square_sizes(exported):
    from export.parity import check_parity

    name, model, path = exported
    spec = get_spec(name)
    spec = dataclasses.replace(spec, checks=dataclasses.replace(spec.checks, parity_batches=(1, 3),
                                                                parity_sides=(64, 80)))
    result = check_parity(spec, model, path)
    assert result.worst <= 1e-4 and not result.failures


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize(("height", "width"), [(96, 72), (57, 71)])
def test_onnx_parity_non_square(exported, batch, height, width):
    from export.compare import Tolerance, compare
    from export.runners import OnnxRuntimeRunner, TorchRunner

    name, model, path = exported
    spec = get_spec(name)
    feeds = {"image": np.random.default_rng(batch).uniform(0, 1, (batch, 1, height, width)).astype(np.float32)}
    ref = TorchRunner.for_spec(spec, model).infer(feeds)
    got = OnnxRuntimeRunner(path).infer(feeds)
    assert got["attention"].shape == ref["attention"].shape
    assert ref["attention"].max() > 1.5 * ref["attention"].min()  # a map with structure, not a uniform one
    c = compare(ref, got, spec.outputs, Tolerance(1e-4, 1.0))
    assert c.ok, c.failures


def test_tensorrt_parses_the_graph(exported):
    from export.tensorrt import parse_onnx, trt_available

    if not trt_available():
        pytest.skip("neither tensorrt nor tensorrt_rtx is installed")
    report = parse_onnx(exported[2])
    assert [o["name"] for o in report.outputs] == ["logits", "attention"]
