"""The int8 roofline (``bench.int8_roofline``): the single-conv graphs, the layer census and the arithmetic that
turns them into an expected speed-up. Timings themselves are not asserted (a loaded host would fail them)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from bench.int8_roofline import ceiling, conv_graph, conv_speedups, layer_widths, speedup_at, width_shares

SPEEDUPS = {"16": {"speedup": 1.0}, "64": {"speedup": 2.0}, "256": {"speedup": 3.0}}


def test_conv_graph_computes_relu_of_a_3x3_convolution(tmp_path):
    import onnxruntime as ort
    import torch

    path = conv_graph(4, tmp_path / "c.onnx")
    w = onnx.numpy_helper.to_array(onnx.load(str(path)).graph.initializer[0])
    x = np.random.default_rng(0).random((2, 4, 5, 7), dtype=np.float32)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    want = torch.relu(torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), padding=1)).numpy()
    assert got.shape == (2, 4, 5, 7)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_conv_speedups_quantizes_and_times_each_width():
    r = conv_speedups(widths=(8, 16), batch=2, side=8, rounds=2)
    assert list(r) == ["8", "16"]
    for c in r.values():
        assert c["latency"]["fp32"]["p50"] > 0 and c["latency"]["int8"]["p50"] > 0
        assert c["speedup"] == pytest.approx(c["latency"]["fp32"]["p50"] / c["latency"]["int8"]["p50"])


def test_speedup_at_interpolates_in_log2_width_and_holds_flat_outside():
    assert speedup_at(64, SPEEDUPS) == pytest.approx(2.0)
    assert speedup_at(32, SPEEDUPS) == pytest.approx(1.5)  # halfway between 16 and 64 in log2
    assert speedup_at(1, SPEEDUPS) == pytest.approx(1.0)
    assert speedup_at(1024, SPEEDUPS) == pytest.approx(3.0)


def test_ceiling_is_amdahl_over_multiply_accumulates():
    layers = [{"width": 16, "macs": 100}, {"width": 256, "macs": 300}]
    assert ceiling(layers, SPEEDUPS) == pytest.approx(400 / (100 / 1.0 + 300 / 3.0))
    assert ceiling([{"width": 64, "macs": 5}], SPEEDUPS) == pytest.approx(2.0)


def test_layer_widths_counts_the_small_cnn_layer_by_layer():
    layers = layer_widths("cnn")  # SmallCNN (16, 32, 64) on the 64 px canvas, one grey channel
    convs = [x for x in layers if x["op"] == "Conv"]
    assert [x["width"] for x in convs] == [1, 16, 32, 64]
    assert convs[0]["macs"] == 16 * 64 * 64 * 1 * 9  # 16 filters of 1x3x3 at every pixel of 64x64
    assert convs[1]["macs"] == 32 * 32 * 32 * 16 * 9
    shares = width_shares(layers)
    assert sum(shares.values()) == pytest.approx(1.0)
    assert shares[">64"] == 0.0 and shares["<=16"] > 0.4
