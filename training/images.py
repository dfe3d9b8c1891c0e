"""Encoded image files -> a model's input: the one decode and eval transform that training, export's parity
feeds, the served ``<NAME>_preprocess`` model and the client all run (so they agree to the last bit).

numpy and Pillow only: the Triton python backend imports this module.

- ``decode``: JPEG/PNG/WebP/BMP/GIF (first frame) of any size; the EXIF orientation applied; grayscale,
  palette, RGBA (alpha composited onto black), CMYK, 16-bit converted to RGB (or to L for 1-channel models).
  A file above ``max_pixels`` is refused before its pixels are decoded (a decompression bomb). Given the
  shorter side it will be resized to (``min_side``), a large JPEG is decoded DCT-scaled (Pillow's draft mode,
  1/2 to 1/8) to no less than ``DRAFT_OVERSAMPLE`` times that side: a 24 MP photo for a 73 px model decodes at
  1/8 of the work, and the bilinear resize that follows sees the same picture.
- ``request_pixels``: what a request's files will cost to decode, read from their headers alone (nothing is
  decoded), so that a request over its budget (``max_request_pixels``) is refused before any work.
- ``ImagePreprocess.eval``: resize the shorter side to ``resize`` (bilinear), centre-crop ``size`` x ``size``,
  scale to [0, 1], normalise with the training split's mean and std, as [C, H, W] float32.
- ``ImagePreprocess.train``: a random-resized crop (area 35-100%, aspect 3/4-4/3) and a horizontal flip.
"""

from __future__ import annotations

import io
import json
import math
import warnings
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 40_000_000  # 40 MP: any camera photo; decompression bombs are far above it
# Decoded pixels one request may cost in all (its files together, after draft-mode scaling): a 24 MP photo, about
# 1.1 s of PNG decoding on one core here, so that one request cannot hold a preprocessing instance for long.
DEFAULT_MAX_REQUEST_PIXELS = 24_000_000
DRAFT_OVERSAMPLE = 2  # a drafted JPEG keeps at least twice the resize side: the resize still antialiases
CROP_FRACTION = 0.875  # timm's crop_pct: the centre crop covers 87.5% of the resized shorter side
TRAIN_SCALE = (0.35, 1.0)
TRAIN_RATIO = (3 / 4, 4 / 3)


class ImageError(ValueError):
    """One line naming what is wrong with an image (its file or request element and the problem)."""


def _flatten_alpha(img: Image.Image) -> Image.Image:
    """Composite any transparency onto black: a transparent pixel is background, not its hidden colour."""
    if img.mode == "P":
        img = img.convert("RGBA")  # a palette's transparent index too
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "RGB" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    return img


def _open(data: bytes, max_pixels: int, source: str, min_side: int | None) -> Image.Image:
    """Open (headers only), refuse a file above ``max_pixels``, and set up draft-mode decoding (see above)."""
    if not data:
        raise ImageError(f"{source}: empty payload (0 bytes), expected an encoded image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{source}: image above the pixel limit ({e})") from None
    except UnidentifiedImageError:
        raise ImageError(f"{source}: not an image Pillow can read ({len(data)} bytes, starting {data[:8]!r})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{source}: cannot decode image: {e}") from None
    if w * h > max_pixels:
        raise ImageError(f"{source}: image of {w}x{h} = {w * h} pixels is above the limit of {max_pixels}")
    if min_side and img.format == "JPEG" and min(w, h) >= 2 * DRAFT_OVERSAMPLE * min_side:
        k = DRAFT_OVERSAMPLE * min_side / min(w, h)
        img.draft(img.mode, (math.ceil(w * k), math.ceil(h * k)))
    return img


def decode(data: bytes, channels: int = 3, max_pixels: int = DEFAULT_MAX_PIXELS, source: str = "image",
           min_side: int | None = None) -> Image.Image:
    """An encoded image file -> a Pillow image in ``RGB`` (channels 3) or ``L`` (channels 1); raises
    ``ImageError`` naming ``source`` for an empty payload, bytes that are no image, a truncated file or one above
    ``max_pixels``. ``min_side``: the shorter side it will be resized to (lets a large JPEG decode scaled)."""
    img = _open(data, max_pixels, source, min_side)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()  # decodes now: a truncated file fails here, not later
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{source}: image above the pixel limit ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{source}: cannot decode image: {e}") from None
    img = ImageOps.exif_transpose(img)  # camera orientation
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grayscale PNG: scale to 8 bits
        img = Image.fromarray((np.asarray(img, np.float64) / 257.0).clip(0, 255).astype(np.uint8), "L")
    img = _flatten_alpha(img)
    return img.convert("RGB" if channels == 3 else "L")


def request_pixels(files: list[bytes], max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int | None = None,
                   source: str = "image") -> int:
    """The pixels decoding ``files`` will produce (after draft scaling), from their headers alone; a file that
    is no image or above ``max_pixels`` raises ``ImageError`` naming its element."""
    total = 0
    for k, data in enumerate(files):
        w, h = _open(data, max_pixels, f"{source} element {k}", min_side).size
        total += w * h
    return total


def read_image(path, channels: int = 3, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    with open(path, "rb") as f:
        return decode(f.read(), channels, max_pixels, source=str(path))


def resize_shorter(img: Image.Image, side: int) -> Image.Image:
    """Resize so that the shorter side is ``side`` px, keeping the aspect ratio (bilinear, Pillow's antialias)."""
    w, h = img.size
    if min(w, h) == side:
        return img
    s = side / min(w, h)
    return img.resize((max(side, round(w * s)), max(side, round(h * s))), Image.BILINEAR)


def centre_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    x0, y0 = (w - size) // 2, (h - size) // 2
    return img.crop((x0, y0, x0 + size, y0 + size))


def crop_box(w: int, h: int, side: int, size: int) -> tuple[float, float, float, float]:
    """Where the eval crop lies in the original image, as fractions (x0, y0, x1, y1): to carry boxes along."""
    s = side / min(w, h)
    rw, rh = max(side, round(w * s)), max(side, round(h * s))
    x0, y0 = (rw - size) // 2, (rh - size) // 2
    return x0 / rw, y0 / rh, (x0 + size) / rw, (y0 + size) / rh


def to_array(img: Image.Image) -> np.ndarray:
    """Pillow image -> uint8 [C, H, W]."""
    a = np.asarray(img, np.uint8)
    return (a[None] if a.ndim == 2 else a.transpose(2, 0, 1)).copy()


@dataclass(frozen=True)
class ImagePreprocess:
    """The eval transform of one model (a spec's ``preprocess``), JSON-able for Triton's config."""

    size: int
    channels: int = 3
    resize: int | None = None  # the shorter side before the centre crop; None: size / CROP_FRACTION
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"preprocess: channels must be 1 or 3, got {self.channels}")
        for name in ("mean", "std"):
            v = getattr(self, name)
            if len(v) not in (1, self.channels):
                raise ValueError(f"preprocess: {name} {v} needs 1 or {self.channels} values")
        if min(self.std) <= 0:
            raise ValueError(f"preprocess: std {self.std} must be > 0")

    @property
    def resize_side(self) -> int:
        return self.resize if self.resize is not None else round(self.size / CROP_FRACTION)

    def at_size(self, size: int) -> ImagePreprocess:
        """The same transform for another input size (the resize keeps its ratio to the crop)."""
        resize = None if self.resize is None else round(self.resize * size / self.size)
        return ImagePreprocess(size, self.channels, resize, self.mean, self.std, self.max_pixels,
                               self.max_request_pixels)

    def crop(self, img: Image.Image) -> np.ndarray:
        """The eval crop as uint8 [C, size, size] (what the data cache stores)."""
        return to_array(centre_crop(resize_shorter(img, self.resize_side), self.size))

    def normalize(self, u8: np.ndarray) -> np.ndarray:
        """uint8 [..., C, H, W] -> float32 normalised, in float32 arithmetic (the served model does the same)."""
        mean = np.asarray(self.mean, np.float32).reshape(-1, 1, 1)
        std = np.asarray(self.std, np.float32).reshape(-1, 1, 1)
        return ((u8.astype(np.float32) / np.float32(255.0)) - mean) / std

    def eval(self, img: Image.Image) -> np.ndarray:
        return self.normalize(self.crop(img))

    def __call__(self, data: bytes, source: str = "image") -> np.ndarray:
        """Encoded file -> the model's input sample [C, size, size] float32."""
        return self.eval(decode(data, self.channels, self.max_pixels, source, self.resize_side))

    def check_request(self, files: list[bytes], source: str = "image") -> int:
        """Refuse (``ImageError``, naming the budget) a request whose files would decode to more than
        ``max_request_pixels`` in all; returns the pixels they will cost."""
        total = request_pixels(files, self.max_pixels, self.resize_side, source)
        if total > self.max_request_pixels:
            raise ImageError(f"{source}: {len(files)} image(s) would decode to {total} pixels, above the "
                             f"per-request budget of {self.max_request_pixels} (send fewer or smaller images)")
        return total

    def train_crop(self, img: Image.Image, rng: np.random.Generator, out: int | None = None,
                   box: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """A random-resized crop with a random horizontal flip, as uint8 [C, out, out] (default ``size``), and
        ``box`` (x0, y0, x1, y1 in [0, 1] of ``img``) carried into the crop's frame, clipped."""
        out = out or self.size
        w, h = img.size
        area = w * h
        for _ in range(10):
            a = area * rng.uniform(*TRAIN_SCALE)
            r = float(np.exp(rng.uniform(np.log(TRAIN_RATIO[0]), np.log(TRAIN_RATIO[1]))))
            cw, ch = round(np.sqrt(a * r)), round(np.sqrt(a / r))
            if 0 < cw <= w and 0 < ch <= h:
                break
        else:
            cw = ch = min(w, h)
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        patch = img.resize((out, out), Image.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch))
        flip = bool(rng.random() < 0.5)
        if flip:
            patch = patch.transpose(Image.FLIP_LEFT_RIGHT)
        if box is None:
            return to_array(patch), None
        b = np.array([(box[0] * w - x0) / cw, (box[1] * h - y0) / ch, (box[2] * w - x0) / cw,
                      (box[3] * h - y0) / ch], np.float32).clip(0, 1)
        if flip:
            b = np.array([1 - b[2], b[1], 1 - b[0], b[3]], np.float32)
        return to_array(patch), b

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ImagePreprocess:
        d = json.loads(text)
        return cls(int(d["size"]), int(d["channels"]), d.get("resize"), tuple(d["mean"]), tuple(d["std"]),
                   int(d.get("max_pixels", DEFAULT_MAX_PIXELS)),
                   int(d.get("max_request_pixels", DEFAULT_MAX_REQUEST_PIXELS)))
