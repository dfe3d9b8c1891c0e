"""python -m bench.sweep MODEL --param NAME --values V1 V2 ...: one builder argument that does not change the
weights (e.g. the Feedback CNN's unrolled iteration count), swept over the shipped weights.

Per value, in one run: the graph's node count and export time, parity with torch, onnxruntime and torch eager
latency side by side (p50/p95/p99, batch 1 and 32), whether TensorRT parses it, the ahead-of-time engine's
size and build time where TensorRT is installed, and the model's test metrics on a subset of the test split.
Writes ``reports/sweep_<model>_<param>.{md,json,png}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from tqdm import tqdm

from export.compare import compare, spec_tolerance
from export.markdown import with_host_line
from export.onnx_export import export_onnx
from export.runners import OnnxRuntimeRunner, TorchRunner
from export.timing import percentiles
from training import paths
from training.checkpoints import checkpoint_path
from training.datasets import split_for
from training.feeds import sample_feeds
from training.registry import ModelSpec, get_spec
from training.train import evaluate


def variant(spec: ModelSpec, param: str, value: Any) -> ModelSpec:
    """``spec`` built with ``param=value``; the same weights must load into it."""
    base = spec.builder
    return dataclasses.replace(spec, name=f"{spec.name}_{param}{value}",
                               builder=lambda **kw: base(**{param: value, **kw}))


def _latency(runners: dict[str, Any], feeds: dict[str, np.ndarray], rounds: int) -> dict[str, dict[str, float]]:
    for r in runners.values():
        r.infer(feeds)
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(rounds):  # interleaved, so a load spike hits every runtime alike
        for k, r in runners.items():
            t0 = time.perf_counter()
            r.infer(feeds)
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: percentiles(v) for k, v in times.items()}


def _engine(onnx_path: Path, spec: ModelSpec, archs: tuple[str, ...]) -> dict[str, Any]:
    from export.tensorrt import TensorRTParseError, build_engine, parse_onnx, trt_available

    if not trt_available():
        return {"tensorrt": "not installed"}
    try:
        report = parse_onnx(onnx_path)
    except TensorRTParseError as e:
        return {"tensorrt": f"parse failed: {str(e).splitlines()[0][:120]}"}
    out: dict[str, Any] = {"tensorrt": f"parsed ({report.num_layers} layers)"}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            info = build_engine(onnx_path, spec, Path(tmp) / "model.plan", archs=archs, timing_cache=False)
            out.update(engine_mb=info.plan_bytes / 2**20, build_s=info.build_seconds)
        except Exception as e:  # a build failure is a result of the sweep, not a crash of it
            out.update(tensorrt=f"parsed, build failed: {str(e).splitlines()[0][:120]}")
    return out


def sweep(name: str, param: str, values: list[Any], batches: tuple[int, ...] = (1, 32), rounds: int = 20,
          test_size: int = 500, archs: tuple[str, ...] = ("sm86",), threads: int = 2) -> list[dict[str, Any]]:
    spec = get_spec(name)
    torch.set_num_threads(threads)
    state = torch.load(checkpoint_path(name), map_location="cpu", weights_only=True)
    # seed + 1: images unseen by training
    test = split_for(spec, "test", test_size, seed=spec.train.seed + 1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for value in tqdm(values, desc=f"sweep {name} {param}"):
            vspec = variant(spec, param, value)
            model = vspec.builder()
            model.load_state_dict(state)
            model.eval()
            path = Path(tmp) / f"{vspec.name}.onnx"
            t0 = time.perf_counter()
            export_onnx(vspec, model, path)
            row: dict[str, Any] = {param: value, "export_s": time.perf_counter() - t0,
                                   "nodes": len(onnx.load(str(path)).graph.node),
                                   "onnx_mb": path.stat().st_size / 2**20}
            torch_r = TorchRunner.for_spec(vspec, model)
            ort_r = OnnxRuntimeRunner(path, threads=threads)
            feeds = sample_feeds(vspec, 8, spec.train.canvas)
            row["parity_max_abs"] = compare(torch_r.infer(feeds), ort_r.infer(feeds), vspec.outputs,
                                            spec_tolerance(vspec)).worst
            for b in batches:
                lat = _latency({"torch": torch_r, "onnxruntime": ort_r}, sample_feeds(vspec, b, spec.train.canvas),
                               rounds)
                row[f"batch{b}"] = lat
            row.update(_engine(path, vspec, archs))
            row["metrics"] = evaluate(vspec, model, test)
            rows.append(row)
    return rows


def write_report(name: str, param: str, rows: list[dict[str, Any]], batches: tuple[int, ...]) -> Path:
    out = paths.REPORTS_DIR / f"sweep_{name}_{param}"
    out.parent.mkdir(parents=True, exist_ok=True)
    metrics = sorted({k for r in rows for k in r["metrics"]})
    head = [param, "nodes", "ONNX MB", "parity", *(f"b{b} {rt} p50/p95/p99 ms" for b in batches
                                                  for rt in ("torch", "ORT")), "TensorRT", "engine MB", "build s",
            *metrics]
    lines = [f"# {name}: {param} swept over the shipped weights", "",
             f"Generated by `python -m bench.sweep {name} --param {param} --values "
             f"{' '.join(str(r[param]) for r in rows)}`; latency in ms per call (torch eager and onnxruntime "
             "interleaved in one run, 2 threads), parity = max abs error of every output at batch 8, engine = "
             "TensorRT-RTX ahead-of-time build (sm86) on this CPU host, metrics on 500 held-out test images.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lat = [f"{r[f'batch{b}'][rt]['p50']:.1f}/{r[f'batch{b}'][rt]['p95']:.1f}/{r[f'batch{b}'][rt]['p99']:.1f}"
               for b in batches for rt in ("torch", "onnxruntime")]
        cells = [str(r[param]), str(r["nodes"]), f"{r['onnx_mb']:.2f}", f"{r['parity_max_abs']:.1e}", *lat,
                 r.get("tensorrt", "–"), f"{r['engine_mb']:.2f}" if "engine_mb" in r else "–",
                 f"{r['build_s']:.1f}" if "build_s" in r else "–",
                 *(f"{r['metrics'][m]:.4f}" if m in r["metrics"] else "–" for m in metrics)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"![sweep](sweep_{name}_{param}.png)", ""]
    out.with_suffix(".md").write_text(with_host_line("\n".join(lines)))
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1, default=str) + "\n")
    _plot(name, param, rows, batches, out.with_suffix(".png"), metrics)
    return out.with_suffix(".md")


def _plot(name: str, param: str, rows: list[dict[str, Any]], batches: tuple[int, ...], path: Path,
          metrics: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r[param] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for b in batches:
        for rt, style in (("torch", "--"), ("onnxruntime", "-")):
            ax1.plot(xs, [r[f"batch{b}"][rt]["p50"] for r in rows], style, marker="o", label=f"{rt} batch {b}")
    ax1.set_xlabel(param)
    ax1.set_ylabel("p50 ms per call")
    ax1.set_yscale("log")
    ax1.legend(fontsize=8)
    for m in metrics:
        ax2.plot(xs, [r["metrics"].get(m) for r in rows], marker="o", label=m)
    ax2.set_xlabel(param)
    ax2.set_ylabel("test metric")
    ax2.legend(fontsize=8)
    fig.suptitle(f"{name}: {param}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--param", required=True, help="a builder keyword argument, e.g. iters")
    p.add_argument("--values", required=True, nargs="+", type=_value)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--test-size", type=int, default=500)
    a = p.parse_args(argv)
    try:
        rows = sweep(a.model, a.param, a.values, tuple(a.batches), a.rounds, a.test_size)
    except (KeyError, TypeError, RuntimeError) as e:  # unknown model or builder argument, missing weights
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {write_report(a.model, a.param, rows, tuple(a.batches))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
