"""Small image trees of shape photos (ImageFolder and CUB-200-2011 layouts): what the user-image tests and the
image benchmark write, and a tree to try `python -m training FAMILY --data` on (`python -m training.sample_trees DIR`).

Each image is one filled shape (the class: circle, square, triangle, cross) of a random colour, size and place
on a textured background, 60-500 px on a side, saved as JPEG or PNG; some files are grayscale, palette or
RGBA, one may be corrupt. Deterministic from the seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("circle", "square", "triangle", "cross")


def shape_image(cls: str, rng: np.random.Generator) -> tuple[Image.Image, tuple[int, int, int, int]]:
    w, h = (int(v) for v in rng.integers(60, 501, size=2))
    bg = rng.integers(0, 90, size=(h // 8 + 1, w // 8 + 1, 3)).astype(np.uint8)
    img = Image.fromarray(bg).resize((w, h), Image.BILINEAR)
    s = int(rng.uniform(0.35, 0.8) * min(w, h))
    x0, y0 = int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1))
    x1, y1 = x0 + s, y0 + s
    colour = tuple(int(c) for c in rng.integers(130, 256, size=3))
    d = ImageDraw.Draw(img)
    if cls == "circle":
        d.ellipse((x0, y0, x1, y1), fill=colour)
    elif cls == "square":
        d.rectangle((x0, y0, x1, y1), fill=colour)
    elif cls == "triangle":
        d.polygon([(x0, y1), (x1, y1), ((x0 + x1) // 2, y0)], fill=colour)
    else:
        t = max(2, s // 4)
        d.rectangle((x0, (y0 + y1) // 2 - t // 2, x1, (y0 + y1) // 2 + t // 2), fill=colour)
        d.rectangle(((x0 + x1) // 2 - t // 2, y0, (x0 + x1) // 2 + t // 2, y1), fill=colour)
    return img, (x0, y0, x1, y1)


def _variant(img: Image.Image, k: int) -> tuple[Image.Image, str]:
    """Every 7th file grayscale, every 11th RGBA, every 13th palette PNG; otherwise JPEG or PNG."""
    if k % 7 == 3:
        return img.convert("L"), ".jpg"
    if k % 11 == 5:
        rgba = img.convert("RGBA")
        rgba.putalpha(255)
        return rgba, ".png"
    if k % 13 == 6:
        return img.convert("P", palette=Image.ADAPTIVE), ".png"
    return img, ".jpg" if k % 2 else ".png"


def write_folder_tree(root: Path, per_class: int = 30, seed: int = 0, split: bool = True,
                      corrupt: bool = False, classes: tuple[str, ...] = CLASSES) -> Path:
    rng = np.random.default_rng(seed)
    k = 0
    for cls in classes:
        for i in range(per_class):
            sub = ("val" if i % 5 == 0 else "train") if split else ""
            d = root / sub / cls
            d.mkdir(parents=True, exist_ok=True)
            img, _ = shape_image(cls, rng)
            img, ext = _variant(img, k)
            img.save(d / f"{cls}_{i:03d}{ext}")
            k += 1
    if corrupt:
        d = root / ("train" if split else "") / classes[0]
        (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    return root


def write_cub_tree(root: Path, per_class: int = 30, seed: int = 0, corrupt: bool = False,
                   classes: tuple[str, ...] = CLASSES) -> Path:
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = {n: [] for n in ("images", "image_class_labels", "train_test_split", "bounding_boxes")}
    key = 0
    for c, cls in enumerate(classes, 1):
        folder = f"{c:03d}.{cls.capitalize()}"
        (root / "images" / folder).mkdir(exist_ok=True)
        for i in range(per_class):
            key += 1
            img, (x0, y0, x1, y1) = shape_image(cls, rng)
            img, ext = _variant(img, key)
            rel = f"{folder}/{cls}_{i:03d}{ext}"
            img.save(root / "images" / rel)
            lines["images"].append(f"{key} {rel}")
            lines["image_class_labels"].append(f"{key} {c}")
            lines["train_test_split"].append(f"{key} {0 if i % 5 == 0 else 1}")
            lines["bounding_boxes"].append(f"{key} {x0}.0 {y0}.0 {x1 - x0}.0 {y1 - y0}.0")
    if corrupt:
        key += 1
        rel = f"001.{classes[0].capitalize()}/broken.png"
        (root / "images" / rel).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
        lines["images"].append(f"{key} {rel}")
        lines["image_class_labels"].append(f"{key} 1")
        lines["train_test_split"].append(f"{key} 1")
        lines["bounding_boxes"].append(f"{key} 0.0 0.0 10.0 10.0")
    for n, ls in lines.items():
        (root / f"{n}.txt").write_text("\n".join(ls) + "\n")
    (root / "classes.txt").write_text("".join(f"{c} {c:03d}.{cls.capitalize()}\n" for c, cls in
                                              enumerate(classes, 1)))
    return root


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m training.sample_trees", description=__doc__.split("\n\n")[0])
    p.add_argument("root", type=Path)
    p.add_argument("--layout", choices=("folder", "cub"), default="folder")
    p.add_argument("--per-class", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    write = write_cub_tree if a.layout == "cub" else write_folder_tree
    print(write(a.root, per_class=a.per_class, seed=a.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
