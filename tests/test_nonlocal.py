"""Non-local blocks against the seed paper's formula, and their export-specific handling."""

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from export.onnx_export import export_onnx
from export.runners import OnnxRuntimeRunner
from training import create_model, get_spec
from training.models.nonlocal_net import MODES, NonLocalBlock


def _randomized_block(mode: str, channels: int = 6, sub_sample: bool = True) -> NonLocalBlock:
    torch.manual_seed(0)
    block = NonLocalBlock(channels, mode, sub_sample=sub_sample).eval()
    for p in block.parameters():  # W starts at zero (identity block): give it weights to test
        torch.nn.init.normal_(p, std=0.3)
    return block


def _naive(block: NonLocalBlock, x: torch.Tensor) -> torch.Tensor:
    """y_i = 1/C(x) sum_j f(x_i, x_j) g(x_j), one position at a time, straight from the paper."""
    mode = block.mode
    xs = block.pool(x)  # phi and g see the sub-sampled positions
    g = block.pool(block.g(x))[0].flatten(1).T  # [Nj, C']
    if mode == "gaussian":
        q, k = x[0].flatten(1).T, xs[0].flatten(1).T
    else:
        q = block.theta(x)[0].flatten(1).T
        k = block.pool(block.phi(x))[0].flatten(1).T
    n, nj = q.shape[0], k.shape[0]
    y = torch.zeros(n, g.shape[1], dtype=torch.float64)
    for i in range(n):
        f = torch.zeros(nj, dtype=torch.float64)
        for j in range(nj):
            if mode in ("gaussian", "embedded"):
                f[j] = torch.exp(q[i].double() @ k[j].double())
            elif mode == "dot":
                f[j] = q[i].double() @ k[j].double()
            else:
                w = torch.cat([block.w_theta.weight.flatten(), block.w_phi.weight.flatten()]).double()
                f[j] = torch.relu(w @ torch.cat([q[i], k[j]]).double())
        c = f.sum() if mode in ("gaussian", "embedded") else nj
        y[i] = (f[:, None] * g.double()).sum(0) / c
    y = y.T.reshape(1, -1, *x.shape[-2:]).float()
    return x + block.W(y)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sub_sample", [True, False])
def test_block_matches_the_papers_formula(mode, sub_sample):
    block = _randomized_block(mode, sub_sample=sub_sample)
    x = torch.rand(1, 6, 6, 4) * 0.5
    with torch.no_grad():
        torch.testing.assert_close(block(x), _naive(block, x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", MODES)
def test_block_starts_as_identity(mode):
    block = NonLocalBlock(8, mode).eval()
    x = torch.randn(2, 8, 8, 8)
    torch.testing.assert_close(block(x), x)


def test_unknown_mode_is_named():
    with pytest.raises(ValueError, match="unknown non-local mode 'cosine'"):
        NonLocalBlock(8, "cosine")


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_concat_never_materialises_the_pair_tensor():
    block = _randomized_block("concat", channels=16)
    x = torch.rand(2, 16, 12, 12)
    n, nj, inter = 144, 36, 8
    with torch.no_grad(), _LargestTensor() as probe:
        block(x)
    assert probe.largest <= 2 * n * nj  # the [B, N, Nj] affinity itself ...
    assert probe.largest < 2 * n * nj * 2 * inter  # ... never [B, N, Nj, 2C']


@pytest.mark.parametrize("mode", ["dot", "concat"])
def test_normalisation_uses_the_runtime_size(mode, tmp_path):
    """1/N must come from Shape() in the graph: a constant frozen at 64x64 would be wrong at 96x80."""
    name = f"nonlocal_{mode}"
    spec, model = get_spec(name), create_model(name).eval()
    torch.manual_seed(0)
    torch.nn.init.normal_(model.mid.W.weight, std=0.5)
    path = export_onnx(spec, model, tmp_path / "m.onnx")
    runner = OnnxRuntimeRunner(path)
    for shape in [(2, 1, 64, 64), (3, 1, 96, 80)]:
        x = torch.rand(shape)
        with torch.no_grad():
            ref = model(x)[0].numpy()
        np.testing.assert_allclose(runner.infer({"image": x.numpy()})["logits"], ref, atol=1e-5)


@pytest.mark.parametrize("mode", ["gaussian", "embedded"])
def test_softmax_affinity_stays_finite_in_fp16(mode):
    """The block's own affinity, run in half precision on logits whose exp overflows fp16 (exp(30) > 65504),
    stays finite, normalised and close to fp32: the softmax variants are max-subtracted. An exp/sum
    normalisation in the block would give inf/NaN here. (Close, not equal: fp16 rounds logits near 40 to
    steps of 0.03, which moves the weights by a few percent: why the gaussian keeps them in fp32.)"""
    block = _randomized_block(mode, channels=6)
    x = torch.rand(1, 6, 8, 8) * 4 + 2
    with torch.no_grad():
        logits = (x.flatten(2).transpose(1, 2) @ block.pool(x).flatten(2)) if mode == "gaussian" else \
            block.theta(x).flatten(2).transpose(1, 2) @ block.pool(block.phi(x)).flatten(2)
        assert logits.max() > 12  # exp(logits) overflows fp16
        ref = block.affinity(x)
        half = block.half().affinity(x.half())
    assert torch.isfinite(half).all()
    torch.testing.assert_close(half.float().sum(-1), torch.ones_like(ref.sum(-1)), atol=1e-2, rtol=0)
    assert (half.float() - ref).abs().max() < 5e-2


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", [(16, 16), (12, 18)])
def test_attention_output_is_the_centre_query_row_of_the_affinity(mode, size):
    """The served map is f(x_c, .)/C for the centre position c, laid out on the key grid."""
    block = _randomized_block(mode, channels=6)
    x = torch.rand(2, 6, *size)
    with torch.no_grad():
        z, query = block.attend(x)
        f = block.affinity(x)
        torch.testing.assert_close(z, block(x))
    h, w = size
    assert query.shape == (2, 1, h // 2, w // 2)
    torch.testing.assert_close(query.flatten(1), f[:, (h // 2) * w + w // 2])
    if mode in ("gaussian", "embedded"):
        torch.testing.assert_close(query.sum(dim=(1, 2, 3)), torch.ones(2))
