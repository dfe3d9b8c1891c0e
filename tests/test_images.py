"""The decode + eval transform (training.images) and the user-tree layouts (training.userdata): fast, no server."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training import userdata
from training.images import ImageError, ImagePreprocess, decode
from training.sample_trees import CLASSES, write_cub_tree, write_folder_tree


def _encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_decode_converts_every_mode_to_rgb():
    rgb = Image.new("RGB", (30, 20), (200, 100, 50))
    for img, fmt in ((rgb, "JPEG"), (rgb.convert("L"), "PNG"), (rgb.convert("P"), "PNG"), (rgb.convert("CMYK"), "JPEG"),
                     (rgb, "WEBP"), (rgb, "BMP")):
        out = decode(_encode(img, fmt))
        assert out.mode == "RGB" and out.size == (30, 20), (img.mode, fmt)
    assert decode(_encode(rgb.convert("L")), channels=1).mode == "L"


def test_decode_composites_alpha_onto_black_and_reads_16_bit():
    rgba = Image.new("RGBA", (8, 8), (255, 255, 255, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    a = np.asarray(decode(_encode(rgba)))
    assert a[0, 0].tolist() == [255, 0, 0] and a[4, 4].tolist() == [0, 0, 0]  # transparent white -> black
    deep = Image.fromarray(np.full((4, 4), 65535, np.uint16))
    assert np.asarray(decode(_encode(deep))).min() == 255


def test_decode_applies_exif_orientation():
    img = Image.new("RGB", (40, 10), (0, 0, 0))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to show
    out = decode(_encode(img, "JPEG", exif=exif.tobytes()))
    assert out.size == (10, 40)


@pytest.mark.parametrize("payload,why", [(b"", "empty payload"), (b"hello world", "not an image"),
                                         (b"\x89PNG\r\n\x1a\n\x00\x00", "")])
def test_decode_names_bad_payloads(payload, why):
    with pytest.raises(ImageError, match=f"photo.png: .*{why}"):
        decode(payload, source="photo.png")


def test_decode_refuses_images_above_the_pixel_limit_before_decoding():
    data = _encode(Image.new("RGB", (300, 200)))
    with pytest.raises(ImageError, match="300x200 = 60000 pixels is above the limit of 50000"):
        decode(data, max_pixels=50_000)
    truncated = _encode(Image.new("RGB", (64, 64), (9, 9, 9)), "JPEG")[:300]
    with pytest.raises(ImageError, match="cannot decode"):
        decode(truncated)


def test_eval_transform_resizes_the_shorter_side_and_centre_crops():
    pre = ImagePreprocess(32, 3, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert pre.resize_side == 37  # 32 / 0.875
    a = np.zeros((100, 300, 3), np.uint8)
    a[:, 140:160] = 255  # a bright stripe at the centre column
    x = pre(_encode(Image.fromarray(a)))
    assert x.shape == (3, 32, 32) and x.dtype == np.float32
    assert np.isclose(x.max(), (1 - 0.5) / 0.25) and np.isclose(x.min(), (0 - 0.5) / 0.25)
    assert x[0, :, 16].mean() > x[0, :, 0].mean()  # the stripe stays in the middle
    assert ImagePreprocess.from_json(pre.to_json()) == pre


def test_folder_tree_split_layout_and_flat_layout(tmp_path):
    split = userdata.scan(write_folder_tree(tmp_path / "split", per_class=10))
    assert split.layout == "folder" and split.classes == tuple(sorted(CLASSES))
    assert len(split.train) == 32 and len(split.test) == 8 and not split.has_boxes
    flat = userdata.scan(write_folder_tree(tmp_path / "flat", per_class=10, split=False))
    assert len(flat.train) + len(flat.test) == 40 and len(flat.test) == 8  # a fifth of each class held out
    again = userdata.scan(tmp_path / "flat")
    assert [i.path for i in again.test] == [i.path for i in flat.test]  # deterministic


def test_cub_tree_keeps_boxes_in_the_crop_frame(tmp_path):
    ds = userdata.scan(write_cub_tree(tmp_path / "cub", per_class=5))
    assert ds.layout == "cub" and ds.has_boxes and len(ds.classes) == len(CLASSES)
    pre = ImagePreprocess(48, 3)
    test = userdata.make_split(ds, pre, "test")
    assert test["image"].shape == (len(ds.test), 3, 48, 48) and test["box"].shape == (len(ds.test), 4)
    assert (test["box"][:, 2] > test["box"][:, 0]).all() and (0 <= test["box"]).all() and (test["box"] <= 1).all()
    train = userdata.make_split(ds, pre, "train", n=40, seed=1)
    assert train["image"].shape == (40, 3, 48, 48) and set(train["label"]) <= set(range(len(CLASSES)))


def test_held_out_split_equals_the_eval_transform_of_each_file(tmp_path):
    """The cached path (what training and parity read) equals decoding each file afresh (what the server does)."""
    ds = userdata.scan(write_folder_tree(tmp_path / "t", per_class=5))
    pre = ImagePreprocess(40, 3, mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.4))
    cached = userdata.make_split(ds, pre, "test")
    fresh = np.stack([pre(Path(i.path).read_bytes()) for i in ds.test])
    assert np.abs(cached["image"] - fresh).max() <= 1e-6
    cached_again = userdata.make_split(ds, pre, "test")  # from the cache file now
    assert np.array_equal(cached["image"], cached_again["image"])


def test_tree_errors_name_the_file_and_line(tmp_path):
    root = write_folder_tree(tmp_path / "f", per_class=3, split=False)
    (root / "empty_class").mkdir()
    with pytest.raises(userdata.DataError, match="empty_class: class folder has no images"):
        userdata.scan(root)
    cub = write_cub_tree(tmp_path / "c", per_class=3)
    labels = (cub / "image_class_labels.txt").read_text().splitlines()
    (cub / "image_class_labels.txt").write_text("\n".join(labels[:-1]) + "\n")
    with pytest.raises(userdata.DataError, match=r"image_class_labels.txt: no label for image id 12"):
        userdata.scan(cub)
    (cub / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    with open(cub / "train_test_split.txt", "a") as f:
        f.write("99 1\n")
    with pytest.raises(userdata.DataError, match=r"train_test_split.txt line 13: image id 99 is not in images.txt"):
        userdata.scan(cub)


def test_corrupt_file_stops_loading_unless_skipped(tmp_path):
    ds = userdata.scan(write_folder_tree(tmp_path / "t", per_class=4, corrupt=True))
    pre = ImagePreprocess(32, 3)
    with pytest.raises(userdata.DataError, match=r"broken.jpg: .*--skip-bad-images"):
        userdata.make_split(ds, pre, "train")
    _, _, bad = userdata.load_resized(ds.train, pre.resize_side, 3, skip_bad=True)
    assert len(bad) == 1 and "broken.jpg" in bad[0]
    assert len(userdata.make_split(ds, pre, "train", skip_bad=True)["label"]) == len(ds.train) - 1


def test_every_classification_family_derives_for_rgb_other_classes_and_sizes():
    """timm's create_model(name, in_chans=, num_classes=) for every family, at the zoo's size and a larger one:
    the derived spec's output shapes are what the built model returns (segmentation is refused in one line)."""
    from training.derived import DerivationError, check_shapes, derive_spec
    from training.registry import get_spec, list_models

    derived = 0
    for size in (64, 112):
        for name in list_models():
            info = {"name": f"user_{name}", "data": "folder:/data", "data_digest": "0", "size": size,
                    "classes": [f"c{i}" for i in range(5)], "mean": [0.5] * 3, "std": [0.25] * 3, "train_size": 10,
                    "test_size": 10, "steps": 10}
            base = get_spec(name)
            if base.task.name != "classification":
                with pytest.raises(DerivationError, match="segmentation model"):
                    derive_spec(base, info)
                continue
            spec = derive_spec(base, info)
            check_shapes(spec)
            assert spec.inputs[0].concrete() == (3, size, size) and spec.outputs[0].axes[-1] == 5
            assert spec.checks.parity_sides[0] == size and spec.image_preprocess().mean == (0.5,) * 3
            derived += 1
    assert derived >= 20
