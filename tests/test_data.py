import numpy as np
import pytest

from training.data import make_split, save_sample_grid, split_indices


def test_shapes_ranges_and_determinism():
    a = make_split("train", 32, canvas=64, seed=3)
    b = make_split("train", 32, canvas=64, seed=3)
    assert a["image"].shape == (32, 1, 64, 64) and a["image"].dtype == np.float32
    assert a["image"].min() >= 0 and a["image"].max() <= 1
    assert a["label"].dtype == np.int64 and set(np.unique(a["label"])) <= set(range(10))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["image"], make_split("train", 32, canvas=64, seed=4)["image"])


def test_boxes_and_masks_agree():
    d = make_split("test", 64, canvas=80)
    assert d["image"].shape[-2:] == (80, 80)
    for img_mask, box, label in zip(d["mask"], d["box"], d["label"], strict=True):
        ys, xs = np.nonzero(img_mask)
        assert set(np.unique(img_mask[ys, xs])) == {1 + label}  # mask encodes the class
        x0, y0, x1, y1 = box * 80
        assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        assert 14 <= max(x1 - x0, y1 - y0) <= 28  # the digit's scaled size (14-28 px)


def test_train_and_test_use_disjoint_source_digits():
    assert not set(split_indices("train")) & set(split_indices("test"))


def test_bad_arguments_name_the_problem():
    with pytest.raises(ValueError, match="unknown split 'val'"):
        make_split("val", 4)
    with pytest.raises(ValueError, match="canvas 20 is too small"):
        make_split("train", 4, canvas=20)


def test_sample_grid_png(tmp_path):
    p = tmp_path / "grid.png"
    save_sample_grid(p, n=8)
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
