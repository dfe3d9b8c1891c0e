"""attnzoo::crop_zoom: values against an independent numpy crop-and-resize, gradients, ONNX translations."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from export.ort_custom_ops import crop_zoom_numpy
from export.rewriters import CUSTOM_DOMAIN, CUSTOM_OP_TYPE, translation_table
from export.runners import OnnxRuntimeRunner
from training.ops import crop_zoom, crop_zoom_reference

TOL = 1e-4


def numpy_crop_resize(image: np.ndarray, box: np.ndarray) -> np.ndarray:
    """Plain per-pixel crop-and-resize: bilinear, zeros outside, pixel centres at k + 0.5."""
    b, _, h, w = image.shape
    out = np.zeros_like(image, dtype=np.float64)
    for n in range(b):
        tx, ty, tl = (float(v) for v in box[n])
        # the box spans [tx - tl, tx + tl] of the width: W output pixels over 2*tl*W input pixels
        x0, y0, side = (tx - tl) * w, (ty - tl) * h, 2 * tl
        for i in range(h):
            for j in range(w):
                px = x0 + (j + 0.5) * side - 0.5  # continuous input pixel index (centre of pixel k is k)
                py = y0 + (i + 0.5) * side - 0.5
                fx, fy = int(np.floor(px)), int(np.floor(py))
                for yy, wy in ((fy, 1 - (py - fy)), (fy + 1, py - fy)):
                    for xx, wx in ((fx, 1 - (px - fx)), (fx + 1, px - fx)):
                        if 0 <= yy < h and 0 <= xx < w:
                            out[n, :, i, j] += wy * wx * image[n, :, yy, xx]
    return out


def _random_case(b: int, c: int, h: int, w: int, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(b, c, h, w, generator=g, dtype=dtype)
    # centres partly near/over the border so zero padding is exercised, half sides 0.05-0.5
    centre = torch.rand(b, 2, generator=g, dtype=dtype) * 1.2 - 0.1
    half = torch.rand(b, 1, generator=g, dtype=dtype) * 0.45 + 0.05
    return image, torch.cat((centre, half), dim=1)


@pytest.mark.parametrize("shape", [(2, 1, 12, 12), (3, 2, 9, 14), (2, 3, 16, 7)])
def test_matches_numpy_crop_resize(shape):
    image, box = _random_case(*shape, seed=sum(shape))
    ref = numpy_crop_resize(image.double().numpy(), box.double().numpy())
    np.testing.assert_allclose(crop_zoom(image, box).numpy(), ref, atol=1e-5)


def test_known_boxes():
    image = torch.rand(1, 1, 8, 10)
    # the whole image is the identity
    whole = torch.tensor([[0.5, 0.5, 0.5]])
    torch.testing.assert_close(crop_zoom(image, whole), image, atol=1e-6, rtol=0)
    # the top-left quadrant of a 2x2-block image is one block, zoomed: constant in the interior
    blocks = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).repeat_interleave(4, 0).repeat_interleave(5, 1)[None, None]
    out = crop_zoom(blocks, torch.tensor([[0.25, 0.25, 0.25]]))
    assert torch.allclose(out[..., 1:-1, 1:-1], torch.ones(1), atol=1e-6)
    # a box entirely outside samples only zero padding
    assert crop_zoom(image, torch.tensor([[2.0, 2.0, 0.2]])).abs().max() == 0


def test_matches_numpy_kernel_used_by_onnxruntime():
    image, box = _random_case(3, 2, 20, 27, seed=3)
    np.testing.assert_allclose(crop_zoom_numpy(image.numpy(), box.numpy()), crop_zoom(image, box).numpy(), atol=1e-5)


def test_gradcheck():
    image, box = _random_case(2, 2, 6, 7, seed=1, dtype=torch.float64)
    image.requires_grad_(True)
    box.requires_grad_(True)
    assert torch.autograd.gradcheck(crop_zoom, (image, box))


def test_backward_matches_autograd_of_reference():
    image, box = _random_case(3, 2, 11, 13, seed=2, dtype=torch.float64)
    image.requires_grad_(True)
    box.requires_grad_(True)
    grad_out = torch.rand(3, 2, 11, 13, dtype=torch.float64)
    got = torch.autograd.grad(crop_zoom(image, box), (image, box), grad_out)
    ref = torch.autograd.grad(crop_zoom_reference(image, box), (image, box), grad_out)
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g, r, atol=1e-10, rtol=1e-10)


def test_box_only_gradient():
    image, box = _random_case(2, 1, 8, 8, seed=4)
    box.requires_grad_(True)
    (grad,) = torch.autograd.grad(crop_zoom(image, box).sum(), (box,))
    assert grad.shape == (2, 3) and torch.isfinite(grad).all()


def test_opcheck_fake_and_autograd_registration():
    image, box = _random_case(2, 1, 8, 9, seed=5)
    torch.library.opcheck(torch.ops.attnzoo.crop_zoom.default, (image, box.requires_grad_(True)))


def test_bad_box_shape_names_the_shape():
    with pytest.raises(ValueError, match=r"box must be \[B,3\].*\(2, 4\)"):
        crop_zoom(torch.rand(2, 1, 8, 8), torch.rand(2, 4))


# ---------------------------------------------------------------- ONNX (dynamo, opset 18)


class _Tiny(torch.nn.Module):
    """The op between other ops, so the translation has to connect to the rest of the graph."""

    def forward(self, image: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
        return crop_zoom(image * 2.0, box) + 1.0


@pytest.fixture(scope="module", params=[False, True], ids=["standard", "custom"])
def exported(request, tmp_path_factory):
    custom = request.param
    path = tmp_path_factory.mktemp("cz") / f"crop_zoom_{'custom' if custom else 'standard'}.onnx"
    image, box = _random_case(2, 1, 64, 64, seed=6)  # batch > 1, else the exporter fixes it to 1
    dyn = torch.export.Dim.DYNAMIC
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation chatter
        torch.onnx.export(
            _Tiny().eval(), (image, box), path, dynamo=True, opset_version=18, external_data=False,
            input_names=["image", "box"], dynamic_shapes=({0: dyn, 2: dyn, 3: dyn}, {0: dyn}),
            custom_translation_table=translation_table(custom), verbose=False,
        )
    return custom, path


def test_onnx_graph_ops(exported):
    import onnx

    custom, path = exported
    model = onnx.load(path)
    ops = {(n.domain, n.op_type) for n in model.graph.node}
    if custom:
        assert (CUSTOM_DOMAIN, CUSTOM_OP_TYPE) in ops
        assert not any(t == "GridSample" for _, t in ops)
    else:
        assert ("", "GridSample") in ops
        assert all(d in ("", "ai.onnx") for d, _ in ops)
        assert not any(t == "AffineGrid" for _, t in ops)  # TensorRT cannot parse AffineGrid
        onnx.checker.check_model(model, full_check=True)
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 18


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("size", [(64, 64), (80, 72)])
def test_onnxruntime_parity(exported, batch, size):
    custom, path = exported
    runner = OnnxRuntimeRunner(path, custom_ops=custom)
    image, box = _random_case(batch, 1, *size, seed=batch * 100 + size[1])
    got = next(iter(runner.infer({"image": image.numpy(), "box": box.numpy()}).values()))
    ref = _Tiny()(image, box).numpy()
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= TOL


def _trt_parse(path):
    """Parse with the package's TensorRT parser (TensorRT-RTX); returns (ok, [(node, op, desc)])."""
    pytest.importorskip("tensorrt_rtx", reason="tensorrt_rtx is not installed")
    from export.tensorrt import TensorRTParseError, parse_onnx

    try:
        parse_onnx(path, prefer="tensorrt_rtx")
    except TensorRTParseError as err:
        return False, [(e["node_name"], e["operator"], e["desc"]) for e in err.errors]
    return True, []


def test_tensorrt_parses_standard_graph(exported):
    custom, path = exported
    ok, errors = _trt_parse(path)
    if custom:  # without a registered CropZoom plugin the parser must name the node it cannot import
        assert not ok and any(op == CUSTOM_OP_TYPE for _, op, _ in errors)
    else:
        assert ok and not errors, errors
