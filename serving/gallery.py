"""The attention gallery: the same 8 images through every mechanism, every map, box and mask output drawn.

    python -m serving.gallery [MODEL ...] [--out reports/gallery.png] [--threads 2]      (make gallery)
    python -m serving.gallery --write-samples serving/explorer/samples                   (the explorer's samples)

The images: test-split cluttered digits and a multi-scale canvas (``training.data``) and shape photos from a sample
user tree (``training.sample_trees``), as encoded files, through each model's own eval transform
(``ModelSpec.image_preprocess``, what ``<name>_image`` runs in Triton) and onnxruntime on the exported graphs,
composed as Triton composes them (``export.parity.deployed_runner``). What is drawn follows the output kinds of the
spec (maps and saliency as heat maps over the input, boxes as rectangles, segmentation as a colour mask), never a
model's name. ``reports/gallery.md`` says what each row shows, with the localisation figures the studies measured
(``reports/study_*.json``) and the shipped weights' records (``training/weights/<model>.json``), read, not copied.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from serving.cli import cli_error

N_DIGITS, N_MULTISCALE, SHAPES = 4, 1, ("circle", "triangle", "cross")  # 8 images
MAP_KINDS, BOX_KINDS, MASK_KINDS, CLASS_KINDS = ("map", "saliency"), ("boxes",), ("segmentation",), ("logits",)
BOX_COLOURS = ("#00e5ff", "#ff40a0", "#ffd600", "#50ff50")  # one per box output, as on the explorer page
PANEL_IN = 1.15  # inches per panel


@dataclass(frozen=True)
class GalleryImage:
    name: str  # file name, as bundled with the explorer
    data: bytes  # the encoded file
    caption: str  # what it is (the true label where there is one)


def _png(a: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.round(np.clip(a, 0, 1) * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def gallery_images() -> list[GalleryImage]:
    """The 8 images, deterministic: digits and a multi-scale canvas from the test split, three shape photos."""
    from training.data import make_split
    from training.sample_trees import write_folder_tree

    digits = make_split("test", N_DIGITS)
    out = [GalleryImage(f"digit_{k}_label{int(digits['label'][k])}.png", _png(digits["image"][k, 0]),
                        f"digit {int(digits['label'][k])}") for k in range(N_DIGITS)]
    multi = make_split("test", 8, source="multiscale")
    # The canvas with the most digits on it: what the per-pixel scale weights are for.
    order = sorted(range(8), key=lambda k: -len(np.unique(multi["mask"][k])))[:N_MULTISCALE]
    out += [GalleryImage(f"multiscale_{k}.png", _png(multi["image"][k, 0]),
                         "digits " + ", ".join(str(int(c) - 1) for c in np.unique(multi["mask"][k]) if c))
            for k in order]
    with tempfile.TemporaryDirectory(prefix="attnzoo-gallery-") as tmp:
        root = write_folder_tree(Path(tmp), per_class=1, seed=0, split=False, classes=SHAPES)
        for cls in SHAPES:
            f = sorted((root / cls).iterdir())[0]
            out.append(GalleryImage(f"shape_{f.name}", f.read_bytes(), f"{cls} (photo)"))
    return out


def write_samples(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for im in gallery_images():
        (folder / im.name).write_bytes(im.data)
        written.append(folder / im.name)
    return written


# ------------------------------------------------------------------------------------------- inference


@dataclass
class Row:
    """One mechanism: its inputs as the model saw them and every output, per image."""

    name: str
    description: str
    inputs: np.ndarray  # [N, C, H, W] after the eval transform
    outputs: dict[str, np.ndarray]
    kinds: dict[str, str]
    descriptions: dict[str, str]
    labels: list[str] = field(default_factory=list)
    preprocess: Any = None


def gallery_models(names: list[str] | None = None) -> list[str]:
    """Registered models with an image input and shipped weights (or exported graphs)."""
    from serving.image_models import has_image_models
    from training import checkpoint_path
    from training.registry import get_spec, resolve_names

    return [n for n in resolve_names(names or ["all"])
            if has_image_models(get_spec(n)) and (checkpoint_path(n).exists() or exported(n))]


def exported(name: str) -> bool:
    from training import layout
    from training.registry import get_spec

    spec = get_spec(name)
    return all(layout.onnx_path(spec.graph_model_name(g)).exists() for g in spec.deploy_graphs())


def run_model(name: str, images: list[GalleryImage], threads: int | None = None) -> Row:
    """onnxruntime on the exported graphs, composed as Triton composes them; torch on the shipped weights where
    ``make export`` has not run yet (the parity gate holds the two within 1e-4)."""
    from training import layout
    from training.registry import get_spec

    spec = get_spec(name)
    pre = spec.image_preprocess()
    x = np.stack([pre(im.data, source=im.name) for im in images]).astype(np.float32)
    if exported(name):
        from export.parity import deployed_runner

        paths = {g.name: layout.onnx_path(spec.graph_model_name(g)) for g in spec.deploy_graphs()}
        runner = deployed_runner(spec, paths, threads=threads)
    else:
        import torch

        from export.runners import TorchRunner
        from training import load_trained

        if threads:
            torch.set_num_threads(threads)
        runner = TorchRunner.for_spec(spec, load_trained(name))
    feeds = {spec.image_input.name: x}
    # Optional inputs (a target class, ...) get the default the server feeds when a request leaves them out.
    feeds.update({t.name: t.default_batch(len(x)) for t in spec.inputs if t.optional})
    outputs = runner.infer(feeds)
    classes = next((o.axes[-1] for o in spec.outputs if o.kind in CLASS_KINDS), 0)
    return Row(name, spec.description, x, {o.name: np.asarray(outputs[o.name]) for o in spec.outputs},
               {o.name: o.kind for o in spec.outputs}, {o.name: o.description for o in spec.outputs},
               list(spec.labels(int(classes))) if classes else [], pre)


# ---------------------------------------------------------------------------------------------- figure


def panels(row: Row) -> list[tuple[str, str, int]]:
    """The sub-rows drawn for one mechanism: ("input", "", 0) with boxes and the prediction, then one per map
    channel (kind map/saliency) and one per segmentation output."""
    out = [("input", "", 0)]
    for name, kind in row.kinds.items():
        a = row.outputs[name]
        if kind in MAP_KINDS:
            channels = int(np.prod(a.shape[1:-2])) if a.ndim > 3 else 1
            out += [("map", name, c) for c in range(channels)]
        elif kind in MASK_KINDS:
            out.append(("mask", name, 0))
    return out


def prediction(row: Row, i: int) -> str:
    """The answer for image ``i``: the first rank-1 class output's top label, or a mask's classes."""
    from scipy.special import softmax

    for name, kind in row.kinds.items():
        a = row.outputs[name][i]
        if kind in CLASS_KINDS and a.ndim == 1:
            p = softmax(a.astype(np.float64))
            k = int(a.argmax())
            label = row.labels[k] if k < len(row.labels) else str(k)
            return f"{label} ({p[k]:.0%})"
        if kind in MASK_KINDS:
            classes, counts = np.unique(a.argmax(0), return_counts=True)
            shown = [f"{c}" for c, n in sorted(zip(classes, counts, strict=True), key=lambda t: -t[1]) if c and n >= 8]
            return "classes " + (" ".join(shown) if shown else "none")
    return ""


def _base(row: Row, i: int) -> np.ndarray:
    """Image ``i`` as the model saw it, back in [0, 1] for display (grey for one channel)."""
    pre = row.preprocess
    std, mean = (np.asarray(v, np.float32).reshape(-1, 1, 1) for v in (pre.std, pre.mean))
    x = row.inputs[i] * std + mean
    return np.clip(x[0] if x.shape[0] == 1 else x.transpose(1, 2, 0), 0, 1)


def _maps(a: np.ndarray) -> np.ndarray:
    return a.reshape(-1, *a.shape[-2:])


def draw_gallery(rows: list[Row], images: list[GalleryImage], out: Path, dpi: int = 80) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch, Rectangle

    from training.tasks import PALETTE

    layout = [(row, p) for row in rows for p in panels(row)]
    n_img = len(images)
    fig = plt.figure(figsize=(1.9 + n_img * PANEL_IN, 0.9 + len(layout) * PANEL_IN * 1.08))
    grid = fig.add_gridspec(len(layout) + 1, n_img + 1, width_ratios=[1.9 / PANEL_IN] + [1] * n_img,
                            height_ratios=[0.35] + [1] * len(layout), hspace=0.32, wspace=0.04,
                            left=0.005, right=0.995, top=1 - 0.35 / fig.get_figheight(), bottom=0.02)
    for j, im in enumerate(images):
        ax = fig.add_subplot(grid[0, j + 1])
        ax.axis("off")
        ax.text(0.5, 0.0, im.caption, ha="center", va="bottom", fontsize=7.5, wrap=True)
    prev = None
    for r, (row, (what, name, channel)) in enumerate(layout, start=1):
        label = fig.add_subplot(grid[r, 0])
        label.axis("off")
        sub = "input, boxes,\nprediction" if what == "input" else name + (f"[{channel}]" if what == "map" and
                                                                           _maps(row.outputs[name][0]).shape[0] > 1
                                                                           else "")
        if row is not prev:  # a mechanism's first row: its name, and a rule above the block
            label.text(0.02, 0.98, row.name, fontsize=8.5, fontweight="bold", va="top", ha="left",
                       transform=label.transAxes)
            pos = label.get_position()
            fig.add_artist(Line2D([0.005, 0.995], [pos.y1 + 0.3 * pos.height] * 2, color="#999", lw=0.8,
                                  transform=fig.transFigure))
        label.text(0.02, 0.5, sub, fontsize=7, va="center", ha="left", color="#444", transform=label.transAxes)
        prev = row
        for i in range(n_img):
            ax = fig.add_subplot(grid[r, i + 1])
            ax.set_xticks([])
            ax.set_yticks([])
            base = _base(row, i)
            h, w = base.shape[:2]
            ax.imshow(base, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            extent = (-0.5, w - 0.5, h - 0.5, -0.5)
            if what == "input":
                k = 0
                for o, kind in row.kinds.items():
                    if kind not in BOX_KINDS:
                        continue
                    boxes = row.outputs[o][i].reshape(-1, 4)
                    boxes = boxes[np.any(boxes != 0, axis=1)]  # the Boxes kind: all-zero = unused slot
                    for x0, y0, x1, y1 in boxes:
                        ax.add_patch(Rectangle((x0 * w - 0.5, y0 * h - 0.5), (x1 - x0) * w, (y1 - y0) * h, fill=False,
                                               ec=BOX_COLOURS[k % len(BOX_COLOURS)], lw=0.6 if len(boxes) > 8 else 1.3))
                    k += 1
                ax.set_title(prediction(row, i), fontsize=7, pad=2)
            elif what == "map":
                m = _maps(row.outputs[name][i])[channel].astype(np.float64)
                t = (m - m.min()) / (np.ptp(m) or 1.0)  # each map to its own range, as training.tasks.heat
                ax.imshow(t, cmap="hot", vmin=0, vmax=1, alpha=0.6, extent=extent, interpolation="bilinear")
            else:
                labels = row.outputs[name][i].argmax(0)
                rgba = np.concatenate([PALETTE[labels % len(PALETTE)] / 255.0,
                                       np.where(labels > 0, 0.75, 0.15)[..., None]], axis=-1)
                ax.imshow(rgba, extent=extent, interpolation="nearest")
    masks = [(row, n) for row in rows for n, k in row.kinds.items() if k in MASK_KINDS]
    handles = [Patch(color=PALETTE[c % len(PALETTE)] / 255.0, label=f"class {c}")
               for c in range(max((row.outputs[n].shape[1] for row, n in masks), default=0))]
    if handles:
        what = "; ".join(f"{row.name} {n}: {row.descriptions[n]}" for row, n in masks)
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 11), fontsize=6.5, frameon=False,
                   title=f"mask rows ({what})", title_fontsize=7, bbox_to_anchor=(0.5, 0.0))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out


# ------------------------------------------------------------------------------------------- markdown


def measured(model: str, reports: Path, weights: Path) -> list[str]:
    """The figures the repository measured for ``model``: each study run of it (``reports/study_*.json``: every
    metric but per-class IoUs, by seed) and the shipped weights' record (``training/weights/<model>.json``)."""
    lines = []
    for f in sorted(reports.glob("study_*.json")):
        try:
            study = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        runs = [r for r in study.get("runs", {}).values() if r.get("model", "").split("@")[0] == model]
        for r in sorted(runs, key=lambda r: r.get("seed", 0)):
            ms = {k: v for k, v in r.get("metrics", {}).items() if not k.startswith("iou_")}
            lines.append(f"`{f.name}` seed {r.get('seed')} ({r.get('arm')}): " +
                         ", ".join(f"{k} {_fmt(v)}" for k, v in sorted(ms.items())))
    record = weights / f"{model}.json"
    if record.exists():
        try:
            ms = json.loads(record.read_text()).get("metrics", {})
        except ValueError:
            ms = {}
        ms = {k: v for k, v in ms.items() if not k.startswith("iou_") and isinstance(v, int | float)}
        if ms:
            lines.append(f"`training/weights/{record.name}` (shipped, test split): " +
                         ", ".join(f"{k} {_fmt(v)}" for k, v in sorted(ms.items())))
    return lines


def _fmt(v: float) -> str:
    return f"{v:.2%}" if isinstance(v, float) and 0 <= v <= 1 else f"{v:.4g}"


def write_markdown(rows: list[Row], images: list[GalleryImage], png: Path, out: Path, seconds: float,
                   reports: Path, weights: Path) -> Path:
    from export.markdown import with_host_line

    lines = [f"# Attention gallery: {len(images)} images through {len(rows)} mechanisms", "",
             f"![gallery]({png.name})", "",
             f"Generated by `make gallery` (`python -m serving.gallery`) in {seconds:.0f} s: onnxruntime on the "
             "exported graphs in this process (torch on the shipped weights for a model not exported), each file "
             "through the model's own eval transform (the served `<name>_image` path). Columns: " +
             "; ".join(f"`{im.name}`: {im.caption}" for im in images) +
             ". The shape photos are outside every model's training data (digits): what a mechanism attends to "
             "there is its prior, not an answer.", "",
             "Each mechanism is a block of rows: the model's input (its centre crop) with every `boxes` output "
             "drawn (one colour per output; an all-zero box is an unused slot) and the prediction above it; then "
             "one row per channel of each `map`/`saliency` output (a heat map scaled to its own range, black-red-"
             "yellow-white, over the input); then each `segmentation` output as a colour mask (the legend at the "
             "bottom). The figures under each row are read from the studies' and the shipped weights' records.", ""]
    for row in rows:
        drawn = [f"`{n}` ({k}: {row.descriptions[n]})" for n, k in row.kinds.items()
                 if k in MAP_KINDS + BOX_KINDS + MASK_KINDS]
        lines += [f"## {row.name}", "", row.description + ".", "",
                  "- drawn: " + ("; ".join(drawn) if drawn else "no map, box or mask output: the prediction only"),
                  "- predictions: " + ", ".join(prediction(row, i) for i in range(len(images)))]
        lines += [f"- measured: {m}" for m in measured(row.name, reports, weights)] or ["- measured: no study of it"]
        lines.append("")
    out.write_text(with_host_line("\n".join(lines)))
    return out


# ---------------------------------------------------------------------------------------------------- CLI


def build(models: list[str] | None, out: Path, threads: int | None = None, progress: bool = True) -> dict[str, Any]:
    from tqdm import tqdm

    from training import paths

    t0 = time.perf_counter()
    names = gallery_models(models)
    if not names:
        raise RuntimeError("no model with an image input has shipped weights or exported graphs")
    images = gallery_images()
    rows = [run_model(n, images, threads) for n in tqdm(names, desc="gallery", unit="model", disable=not progress)]
    draw_gallery(rows, images, out)
    seconds = time.perf_counter() - t0
    md = write_markdown(rows, images, out, out.with_suffix(".md"), seconds, paths.REPORTS_DIR, paths.WEIGHTS_DIR)
    return {"png": out, "md": md, "models": names, "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    from training import paths

    p = argparse.ArgumentParser(prog="python -m serving.gallery", description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="*", help="models (default: all with exported graphs)")
    p.add_argument("--out", type=Path, default=paths.REPORTS_DIR / "gallery.png", help="the figure (.md beside it)")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime threads per session (default: all cores)")
    p.add_argument("--write-samples", type=Path, metavar="DIR", help="only write the 8 images (explorer samples)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    try:
        if args.write_samples:
            for f in write_samples(args.write_samples):
                print(f)
            return 0
        r = build(args.models, args.out, args.threads)
        print(f"wrote {r['png']} and {r['md']}: {len(r['models'])} mechanisms in {r['seconds']:.1f} s")
        return 0
    except Exception as e:
        return cli_error(e, args.debug)


if __name__ == "__main__":
    sys.exit(main())
