"""A user's own images: ImageFolder and CUB-200-2011 trees -> the split arrays the training loop reads.

Layouts (``scan(root, layout)``; detected when ``layout`` is None):

- ``folder``: ``ROOT/train/<class>/*`` + ``ROOT/val/<class>/*`` (``test/`` also read as the held-out split),
  or ``ROOT/<class>/*`` split deterministically (a fifth of each class, chosen by a hash of the file's path,
  held out: the same split on every host and for every seed).
- ``cub``: CUB-200-2011's ``images/``, ``images.txt``, ``image_class_labels.txt``, ``classes.txt``,
  ``train_test_split.txt`` and ``bounding_boxes.txt`` (boxes kept, normalised to the model's input).

Every problem with the tree is one ``DataError`` line naming the file (and line). Decoded images are cached
under ``artifacts/datacache/`` (their shorter side resized, uint8), keyed by the files' paths, sizes and
modification times, so a 2-core host decodes a tree once, not every epoch or every export.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from training import paths
from training.images import ImageError, ImagePreprocess, crop_box, read_image, resize_shorter, to_array

EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
LAYOUTS = ("folder", "cub")
HELD_OUT = 0.2  # of each class, for a flat ``ROOT/<class>/*`` tree
SOURCE_SEP = ":"  # a recipe's data source for a user tree: "folder:/abs/root" or "cub:/abs/root"
CUB_FILES = ("images.txt", "image_class_labels.txt", "classes.txt", "train_test_split.txt")


class DataError(ValueError):
    """One line naming the file (and line) of a user's data tree that is wrong."""


@dataclass(frozen=True)
class Item:
    path: Path
    label: int
    box: tuple[float, float, float, float] | None = None  # pixels of the original image: x0, y0, x1, y1


@dataclass(frozen=True)
class Dataset:
    root: Path
    layout: str
    classes: tuple[str, ...]
    train: tuple[Item, ...]
    test: tuple[Item, ...]
    skipped: tuple[str, ...] = field(default=())  # bad images left out (--skip-bad-images): "file: why"

    @property
    def has_boxes(self) -> bool:
        return all(i.box is not None for i in (*self.train, *self.test))

    @property
    def source(self) -> str:
        return f"{self.layout}{SOURCE_SEP}{self.root}"

    def split(self, name: str) -> tuple[Item, ...]:
        return self.train if name == "train" else self.test

    def digest(self) -> str:
        """What the trained weights depend on: every file's path (relative to the root), size, mtime and label."""
        h = hashlib.sha256(f"{self.layout}\n{self.classes}\n".encode())
        for split in ("train", "test"):
            for i in self.split(split):
                st = i.path.stat()
                h.update(f"{split} {i.path.relative_to(self.root)} {st.st_size} {st.st_mtime_ns} {i.label} "
                         f"{i.box}\n".encode())
        return h.hexdigest()[:16]


def is_user_source(source: str) -> bool:
    return source.split(SOURCE_SEP, 1)[0] in LAYOUTS and SOURCE_SEP in source


def parse_source(source: str) -> tuple[str, Path]:
    layout, root = source.split(SOURCE_SEP, 1)
    return layout, Path(root)


# ------------------------------------------------------------------------------------------- layouts


def detect_layout(root: Path) -> str:
    if (root / "images.txt").exists():
        return "cub"
    return "folder"


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in EXTENSIONS)


def _class_dirs(root: Path) -> list[Path]:
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not dirs:
        raise DataError(f"{root}: no class folders (expected {root}/<class>/*.jpg, or train/ and val/ of them)")
    return dirs


def _folder_split(root: Path, classes: list[str], split_dir: Path) -> list[Item]:
    items = []
    for d in _class_dirs(split_dir):
        if d.name not in classes:
            raise DataError(f"{d}: class {d.name!r} is not among the training classes ({root / 'train'})")
        images = _images_in(d)
        if not images:
            raise DataError(f"{d}: class folder has no images ({', '.join(EXTENSIONS)})")
        items += [Item(p, classes.index(d.name)) for p in images]
    return items


def _held_out(path: Path, root: Path) -> float:
    return int(hashlib.sha1(str(path.relative_to(root)).encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def scan_folder(root: Path) -> tuple[tuple[str, ...], list[Item], list[Item]]:
    val = next((root / n for n in ("val", "test") if (root / n).is_dir()), None)
    if (root / "train").is_dir() and val is not None:
        classes = [d.name for d in _class_dirs(root / "train")]
        return tuple(classes), _folder_split(root, classes, root / "train"), _folder_split(root, classes, val)
    dirs = _class_dirs(root)
    classes = [d.name for d in dirs]
    train, test = [], []
    for label, d in enumerate(dirs):
        images = _images_in(d)
        if not images:
            raise DataError(f"{d}: class folder has no images ({', '.join(EXTENSIONS)})")
        ranked = sorted(images, key=lambda p: _held_out(p, root))
        n_test = max(1, round(len(images) * HELD_OUT)) if len(images) >= 2 else 0
        test += [Item(p, label) for p in sorted(ranked[:n_test])]
        train += [Item(p, label) for p in sorted(ranked[n_test:])]
    return tuple(classes), train, test


def _table(path: Path, columns: int) -> dict[int, tuple[str, ...]]:
    """A CUB index file: ``<id> <values...>`` per line -> id -> values; a bad line names the file and line."""
    if not path.exists():
        raise DataError(f"{path}: missing (the CUB layout needs {', '.join(CUB_FILES)})")
    rows: dict[int, tuple[str, ...]] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=columns - 1) if columns > 1 else line.split()
        try:
            key = int(parts[0])
        except (ValueError, IndexError):
            raise DataError(f"{path} line {n}: expected '<id> ...', got {line!r}") from None
        if len(parts) != columns:
            raise DataError(f"{path} line {n}: expected {columns} fields, got {line!r}")
        if key in rows:
            raise DataError(f"{path} line {n}: id {key} appears twice")
        rows[key] = tuple(parts[1:])
    return rows


def scan_cub(root: Path) -> tuple[tuple[str, ...], list[Item], list[Item]]:
    images = _table(root / "images.txt", 2)
    labels = _table(root / "image_class_labels.txt", 2)
    class_rows = _table(root / "classes.txt", 2)
    split = _table(root / "train_test_split.txt", 2)
    boxes = _table(root / "bounding_boxes.txt", 5) if (root / "bounding_boxes.txt").exists() else {}
    class_ids = sorted(class_rows)
    classes = tuple(class_rows[c][0] for c in class_ids)
    for table, name in ((labels, "image_class_labels.txt"), (split, "train_test_split.txt"),
                        (boxes, "bounding_boxes.txt")):
        unknown = sorted(set(table) - set(images))
        if unknown:
            n = next(k for k, ln in enumerate((root / name).read_text().splitlines(), 1)
                     if ln.split() and ln.split()[0] == str(unknown[0]))
            raise DataError(f"{root / name} line {n}: image id {unknown[0]} is not in images.txt")
    train, test = [], []
    for key in sorted(images):
        path = root / "images" / images[key][0]
        if key not in labels:
            raise DataError(f"{root / 'image_class_labels.txt'}: no label for image id {key} "
                            f"({images[key][0]}, images.txt)")
        if key not in split:
            raise DataError(f"{root / 'train_test_split.txt'}: no split for image id {key} ({images[key][0]})")
        if not path.exists():
            raise DataError(f"{root / 'images.txt'}: image id {key}: {path} does not exist")
        try:
            cls = int(labels[key][0])
            label = class_ids.index(cls)
        except ValueError:
            raise DataError(f"{root / 'image_class_labels.txt'}: image id {key}: class {labels[key][0]!r} is not "
                            "in classes.txt") from None
        box = None
        if key in boxes:
            try:
                x, y, w, h = (float(v) for v in boxes[key])
            except ValueError:
                raise DataError(f"{root / 'bounding_boxes.txt'}: image id {key}: box {boxes[key]} is not 4 "
                                "numbers") from None
            box = (x, y, x + w, y + h)
        (train if split[key][0].strip() == "1" else test).append(Item(path, label, box))
    if boxes and len(boxes) != len(images):
        missing = sorted(set(images) - set(boxes))[0]
        raise DataError(f"{root / 'bounding_boxes.txt'}: no box for image id {missing}")
    return classes, train, test


def scan(root: str | Path, layout: str | None = None) -> Dataset:
    """The tree at ``root`` as train and held-out items (no pixels read yet)."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise DataError(f"{root}: not a directory")
    layout = layout or detect_layout(root)
    if layout not in LAYOUTS:
        raise DataError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    classes, train, test = (scan_cub if layout == "cub" else scan_folder)(root)
    if len(classes) < 2:
        raise DataError(f"{root}: {len(classes)} class found, a classifier needs at least 2")
    if not train or not test:
        raise DataError(f"{root}: {len(train)} training and {len(test)} held-out images; both splits need images")
    return Dataset(root, layout, classes, tuple(train), tuple(test))


# --------------------------------------------------------------------------------------- decode + cache


def _cache_path(items: tuple[Item, ...], side: int, channels: int) -> Path:
    h = hashlib.sha256(f"{side} {channels}\n".encode())
    for i in items:
        st = i.path.stat()
        h.update(f"{i.path} {st.st_size} {st.st_mtime_ns}\n".encode())
    return paths.ARTIFACTS_DIR / "datacache" / f"{h.hexdigest()[:20]}.npz"


def load_resized(items: tuple[Item, ...], side: int, channels: int = 3, skip_bad: bool = False,
                 desc: str = "decode") -> tuple[list[np.ndarray | None], list[tuple[int, int]], list[str]]:
    """Each image decoded and resized to shorter side ``side`` (uint8 [C, H, W]; None for a bad image when
    ``skip_bad``), the original sizes, and the bad images as "file: why". Cached on disk."""
    cache = _cache_path(items, side, channels)
    if cache.exists():
        with np.load(cache, allow_pickle=False) as z:
            bad = json.loads(str(z["bad"]))
            if bad and not skip_bad:
                raise DataError(bad[0] + " (--skip-bad-images leaves bad images out)")
            sizes = [tuple(int(v) for v in s) for s in z["sizes"]]
            return [z[f"i{k}"] if f"i{k}" in z else None for k in range(len(items))], sizes, bad
    arrays: list[np.ndarray | None] = []
    sizes: list[tuple[int, int]] = []
    bad: list[str] = []
    for item in tqdm(items, desc=desc, leave=False, mininterval=1, disable=len(items) < 50):
        try:
            img = read_image(item.path, channels)
        except (ImageError, OSError) as e:
            if not skip_bad:
                raise DataError(f"{e} (--skip-bad-images leaves bad images out)") from None
            bad.append(str(e))
            arrays.append(None)
            sizes.append((0, 0))
            continue
        sizes.append(img.size)
        arrays.append(to_array(resize_shorter(img, side)))
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npz")
    np.savez(tmp, sizes=np.array(sizes, np.int64).reshape(-1, 2), bad=json.dumps(bad),
             **{f"i{k}": a for k, a in enumerate(arrays) if a is not None})
    os.replace(tmp, cache)
    return arrays, sizes, bad


def _eval_box(box: tuple[float, float, float, float], w: int, h: int, side: int, size: int) -> np.ndarray:
    """A box in original pixels -> fractions of the eval crop (clipped to it)."""
    cx0, cy0, cx1, cy1 = crop_box(w, h, side, size)
    b = np.array([box[0] / w, box[1] / h, box[2] / w, box[3] / h])
    out = (b - [cx0, cy0, cx0, cy0]) / [cx1 - cx0, cy1 - cy0, cx1 - cx0, cy1 - cy0]
    return out.clip(0, 1).astype(np.float32)


def channel_stats(ds: Dataset, pre: ImagePreprocess,
                  skip_bad: bool = False) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of the training split's eval crops in [0, 1] (the normalisation)."""
    arrays, _, _ = load_resized(ds.train, pre.resize_side, pre.channels, skip_bad, desc="decode train")
    crops = np.stack([_centre(a, pre.size) for a in arrays if a is not None]).astype(np.float64) / 255.0
    mean = crops.mean(axis=(0, 2, 3))
    std = crops.std(axis=(0, 2, 3)).clip(min=1e-3)
    return tuple(round(float(v), 6) for v in mean), tuple(round(float(v), 6) for v in std)


def _centre(a: np.ndarray, size: int) -> np.ndarray:
    h, w = a.shape[1:]
    y0, x0 = (h - size) // 2, (w - size) // 2
    return a[:, y0 : y0 + size, x0 : x0 + size]


def make_split(ds: Dataset, pre: ImagePreprocess, split: str, n: int | None = None, seed: int = 0,
               skip_bad: bool = False) -> dict[str, np.ndarray]:
    """``image`` [n, C, S, S] float32 (normalised), ``label`` [n] and, where the tree has boxes, ``box`` [n, 4].

    The held-out split is the eval transform of each image (``n`` of them, repeated in order when ``n`` is
    more than there are: a parity batch of 64 from a small tree); the training split is ``n`` (default: all)
    random-resized crops with flips drawn from ``seed``, cycling over the images."""
    items = ds.split(split)
    arrays, sizes, _ = load_resized(items, pre.resize_side, pre.channels, skip_bad, desc=f"decode {split}")
    keep = [k for k, a in enumerate(arrays) if a is not None]
    if not keep:
        raise DataError(f"{ds.root}: no readable image in the {split} split")
    n = n or len(keep)
    boxes = ds.has_boxes
    images = np.zeros((n, pre.channels, pre.size, pre.size), np.uint8)
    labels = np.zeros(n, np.int64)
    out_boxes = np.zeros((n, 4), np.float32)
    if split == "train":
        from PIL import Image

        rng = np.random.default_rng([seed, 7])
        order = np.concatenate([rng.permutation(keep) for _ in range(-(-n // len(keep)))])[:n]
        for j, k in enumerate(tqdm(order, desc="augment", leave=False, mininterval=1, disable=n < 2000)):
            a = arrays[k]
            img = Image.fromarray(a[0] if pre.channels == 1 else a.transpose(1, 2, 0))
            box = None
            if boxes:
                w, h = sizes[k]
                box = np.array(items[k].box) / [w, h, w, h]
            images[j], b = pre.train_crop(img, rng, box=box)
            labels[j] = items[k].label
            if b is not None:
                out_boxes[j] = b
    else:
        for j in range(n):
            k = keep[j % len(keep)]
            images[j] = _centre(arrays[k], pre.size)
            labels[j] = items[k].label
            if boxes:
                out_boxes[j] = _eval_box(items[k].box, *sizes[k], pre.resize_side, pre.size)
    out = {"image": pre.normalize(images), "label": labels}
    if boxes:
        out["box"] = out_boxes
    return out


def report_skipped(bad: list[str], out=sys.stderr) -> None:
    if bad:
        print(f"skipped {len(bad)} bad image(s):", file=out)
        for b in bad:
            print(f"  {b}", file=out)
