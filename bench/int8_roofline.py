"""Why int8 reaches 2x on some convolutions of this CPU and not on the zoo's: ``python -m bench.int8_roofline``.

onnxruntime's int8 convolution (QLinearConv: im2col + an int8 GEMM on AVX-512 VNNI) gains over its fp32
convolution (NCHWc direct kernels) in proportion to the work per output: with few channels the GEMM's reduction
is short and the quantize/requantize and layout work around it does not shrink. Two measurements, in one run:

- ``conv_speedups``: a single 3x3 convolution + ReLU, ``width`` channels in and out, fp32 against the same graph
  quantized by this project's recipe (``export.int8.quantize``: pre-processing, per-channel 7-bit weights,
  uint8 activations), timed interleaved at batch 32;
- ``layer_widths``: every Conv2d and Linear of a registered model with its multiply-accumulates at batch 1 and
  its canvas (forward hooks on the torch model), so ``ceiling`` can say what int8 could give that model if each
  layer ran as fast as the single convolution of its width: the int8 speed-up to expect from its layer widths.

Writes reports/int8_roofline.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from export.markdown import md_table, with_host_line
from export.timing import THREADS, interleaved
from training import paths

WIDTHS = (16, 32, 64, 128, 256)
BATCH = 32
SIDE = 32
TARGET = 2.0


def conv_graph(width: int, path: Path, seed: int = 0) -> Path:
    """An fp32 graph: x [N, width, H, W] -> ReLU(Conv3x3(x)), ``width`` filters, padding 1, seeded weights."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((width, width, 3, 3)) * np.sqrt(2.0 / (9 * width))).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width, "H", "W"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width, "H", "W"])
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, f"conv{width}", [x], [y], [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def conv_speedups(widths: tuple[int, ...] = WIDTHS, batch: int = BATCH, side: int = SIDE,
                  rounds: int = 50) -> dict[str, dict[str, Any]]:
    """Width -> fp32 and int8 latency (ms, p50/p95/p99), int8 speed-up (fp32 p50 / int8 p50) and fp32 GMAC/s."""
    from tqdm import tqdm

    from export.int8.quantize import preprocess, quantize
    from export.runners import OnnxRuntimeRunner

    rng = np.random.default_rng(0)
    out: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        for width in tqdm(widths, desc="int8 conv roofline", unit="width"):
            fp32 = conv_graph(width, d / f"conv{width}.onnx")
            calib = {"x": rng.random((64, width, side, side), dtype=np.float32)}
            int8 = quantize(preprocess(fp32, d / f"conv{width}.pre.onnx"), d / f"conv{width}.int8.onnx", "MinMax",
                            cache=d / f"conv{width}.cache", feeds=calib)
            runners = {"fp32": OnnxRuntimeRunner(fp32, threads=THREADS),
                       "int8": OnnxRuntimeRunner(int8, threads=THREADS)}
            feeds = {"x": rng.random((batch, width, side, side), dtype=np.float32)}
            stats = interleaved(runners, feeds, rounds)
            macs = batch * width * width * 9 * side * side
            out[str(width)] = {"latency": stats, "speedup": stats["fp32"]["p50"] / stats["int8"]["p50"],
                               "fp32_gmacs": macs / stats["fp32"]["p50"] / 1e6,
                               "int8_gmacs": macs / stats["int8"]["p50"] / 1e6}
    return out


def layer_widths(name: str) -> list[dict[str, Any]]:
    """Every Conv2d / Linear call of a registered model at batch 1 on its canvas: its width (the narrower of its
    input channels per group and its output channels) and multiply-accumulates."""
    import torch

    from training.feeds import sample_feeds
    from training.registry import get_spec
    from training.train import forward

    spec = get_spec(name)
    model = spec.builder().eval()
    layers: list[dict[str, Any]] = []

    def hook(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
        if isinstance(module, torch.nn.Conv2d):
            cin = module.in_channels // module.groups
            k = module.kernel_size[0] * module.kernel_size[1]
            macs = out.numel() * cin * k
            layers.append({"op": "Conv", "width": min(cin, module.out_channels), "macs": int(macs)})
        else:
            layers.append({"op": "Linear", "width": min(module.in_features, module.out_features),
                           "macs": int(out.numel() * module.in_features)})

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    try:
        feeds = sample_feeds(spec, 1, spec.train.canvas)
        with torch.no_grad():
            forward(spec, model, {k: torch.from_numpy(v) for k, v in feeds.items()})
    finally:
        for h in handles:
            h.remove()
    return layers


def speedup_at(width: float, speedups: dict[str, dict[str, Any]]) -> float:
    """The measured conv speed-up at ``width``, interpolated in log2(width) and held flat outside the range."""
    ws = sorted(int(w) for w in speedups)
    return float(np.interp(np.log2(max(width, 1)), np.log2(ws), [speedups[str(w)]["speedup"] for w in ws]))


def ceiling(layers: list[dict[str, Any]], speedups: dict[str, dict[str, Any]]) -> float:
    """The model's speed-up if every layer ran as fast, relative to fp32, as the single conv of its width and
    time were proportional to multiply-accumulates (Amdahl over layers; non-GEMM ops are left out)."""
    total = sum(x["macs"] for x in layers)
    return total / sum(x["macs"] / speedup_at(x["width"], speedups) for x in layers)


def width_shares(layers: list[dict[str, Any]], edges: tuple[int, ...] = (16, 32, 64)) -> dict[str, float]:
    """Fraction of multiply-accumulates in layers of width <= 16, <= 32, <= 64 and above."""
    total = sum(x["macs"] for x in layers) or 1
    shares, lo = {}, 0
    for e in edges:
        shares[f"<={e}"] = sum(x["macs"] for x in layers if lo < x["width"] <= e) / total
        lo = e
    shares[f">{edges[-1]}"] = sum(x["macs"] for x in layers if x["width"] > edges[-1]) / total
    return shares


def measure(models: list[str]) -> dict[str, Any]:
    speedups = conv_speedups()
    measured = _measured_int8()
    rows = {}
    for name in models:
        layers = layer_widths(name)
        rows[name] = {"gmacs": sum(x["macs"] for x in layers) / 1e9, "shares": width_shares(layers),
                      "ceiling": ceiling(layers, speedups),
                      "measured_b32": measured.get(name)}
    return {"threads": THREADS, "batch": BATCH, "side": SIDE, "target": TARGET, "convs": speedups, "models": rows}


def _measured_int8() -> dict[str, float]:
    """Model -> the batch-32 int8 speed-up recorded in reports/int8.json (None where not benchmarked)."""
    path = paths.REPORTS_DIR / "int8.json"
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return {n: r["bench"]["batches"]["32"]["speedup"] for n, r in data.items() if r.get("bench")}


def render_markdown(r: dict[str, Any]) -> str:
    convs = r["convs"]
    conv_rows = [[w, f"{c['latency']['fp32']['p50']:.2f} / {c['latency']['fp32']['p95']:.2f} / "
                     f"{c['latency']['fp32']['p99']:.2f}",
                  f"{c['latency']['int8']['p50']:.2f} / {c['latency']['int8']['p95']:.2f} / "
                  f"{c['latency']['int8']['p99']:.2f}",
                  f"{c['speedup']:.2f}", f"{c['fp32_gmacs']:.0f}", f"{c['int8_gmacs']:.0f}"]
                 for w, c in convs.items()]
    first_2x = next((int(w) for w, c in convs.items() if c["speedup"] >= r["target"]), None)
    model_rows = []
    for name, m in r["models"].items():
        s = m["shares"]
        meas = m["measured_b32"]
        model_rows.append([name, f"{m['gmacs'] * 1e3:.1f}", *(f"{100 * v:.0f}%" for v in s.values()),
                           f"{m['ceiling']:.2f}", "-" if meas is None else f"{meas:.2f}"])
    share_cols = [f"MACs at width {k}" for k in next(iter(r["models"].values()))["shares"]] if r["models"] else []
    return "\n".join([
        "# Why int8 is short of 2x here: int8 convolution speed-up by channel width",
        "",
        f"One 3x3 convolution + ReLU, `width` channels in and out, {r['side']}x{r['side']} px, batch {r['batch']}: "
        "fp32 against the same graph quantized by this project's int8 recipe (`export.int8.quantize`), "
        f"onnxruntime CPU, {r['threads']} threads, timed interleaved in one run (ms per call p50 / p95 / p99). "
        "Generated by `python -m bench.int8_roofline`; do not edit.",
        "",
        md_table(["width", "fp32 ms", "int8 ms", "int8 speed-up", "fp32 GMAC/s", "int8 GMAC/s"], conv_rows),
        "",
        (f"The {r['target']:.0f}x target is reached from width {first_2x} on." if first_2x is not None
         else f"No width measured reaches {r['target']:.0f}x."),
        "",
        "## The zoo's layer widths",
        "",
        "Every Conv2d and Linear of each model at batch 1 on its canvas (torch forward hooks); width = the "
        "narrower of a layer's input channels (per group) and output channels. `expected` = the model's int8 "
        "speed-up if each layer gained what the single convolution of its width gains above (interpolated in "
        "log2 width, time proportional to MACs, other ops left out); `measured` = the batch-32 speed-up in "
        "reports/int8.md.",
        "",
        md_table(["model", "MMACs", *share_cols, "expected", "measured"], model_rows),
        "",
        "![int8 roofline](int8_roofline.png)",
        "",
    ])


def _plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ws = [int(w) for w in r["convs"]]
    ax.plot(ws, [r["convs"][str(w)]["speedup"] for w in ws], "o-", label="one 3x3 conv, int8 / fp32")
    ax.axhline(r["target"], color="gray", ls="--", label=f"target {r['target']:.0f}x")
    ax.axhline(1.0, color="gray", ls=":")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ws, [str(w) for w in ws])
    ax.set_xlabel("channels (in = out)")
    ax.set_ylabel(f"int8 speed-up at batch {r['batch']}")
    ax.set_title("onnxruntime int8 conv speed-up by width (this CPU)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(r: dict[str, Any], reports_dir: str | Path | None = None) -> Path:
    out = Path(reports_dir or paths.REPORTS_DIR)
    out.mkdir(parents=True, exist_ok=True)
    (out / "int8_roofline.json").write_text(json.dumps(r, indent=2, default=float) + "\n")
    _plot(r, out / "int8_roofline.png")
    md = out / "int8_roofline.md"
    md.write_text(with_host_line(render_markdown(r)))
    return md


def main(argv: list[str] | None = None) -> int:
    from training.cli import model_names

    p = argparse.ArgumentParser(prog="python -m bench.int8_roofline", description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="*", default=["all"], help="model names, or 'all' (default)")
    a = p.parse_args(argv)
    names = model_names(a.models)
    if names is None:
        return 2
    print(f"wrote {write_report(measure(names))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
