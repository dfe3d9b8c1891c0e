"""python -m export.gpu_check: GPU parity and latency for every model, on whatever this host has.

On a CUDA host it:
- runs torch eager on the GPU in fp32 (TF32 off) and fp16 (autocast) against the fp32 CPU reference;
- runs onnxruntime with the CUDA provider when onnxruntime-gpu is installed (else the CPU provider,
  labelled as such, as a baseline);
- with TensorRT installed, builds FP32 and FP16 engines for this GPU, checks them against torch
  (fp32: max abs error <= spec.checks.trt_fp32_max_abs; fp16: top-1 agreement >=
  spec.checks.fp16_min_top1_agreement), after refusing any engine built for another GPU/version;
- times every runner at batch 1, 8 and 64 (p50/p95 latency, throughput), numpy in -> numpy out, so
  host<->device copies are included the same way for all, as a server would pay them;
- writes ``reports/gpu_check.{md,json}`` and says what it skipped and why.

It downloads nothing: checkpoints come from artifacts/, graphs from model_repository/ (exported here
on the fly when missing), images from the bundled digits. ``--untrained`` uses freshly initialised
weights (parity and latency only; agreement numbers then mean little). ``--max-seconds`` stops
starting new models when time runs short, so a lent GPU's time limit still leaves a report.
Exit code: 1 if a parity check failed, else 0 (skips are not failures).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from export.timing import percentiles

Runner = Callable[[np.ndarray], list[np.ndarray]]


# --------------------------------------------------------------------------------------------- runners


def torch_runner(model: Any, device: str, fp16: bool = False) -> Runner:
    import torch

    model = copy.deepcopy(model).to(device).eval()  # .to() moves in place: keep the caller's model on CPU

    def run(x: np.ndarray) -> list[np.ndarray]:
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=fp16 and device == "cuda"):
            out = model(torch.from_numpy(x).to(device, non_blocking=False))
            out = out if isinstance(out, tuple | list) else (out,)
            return [o.float().cpu().numpy() for o in out]

    return run


def ort_runner(path: Path, output_names: list[str], input_name: str) -> tuple[Runner, str]:
    import onnxruntime as ort

    providers = ort.get_available_providers()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if "CUDAExecutionProvider" in providers:
        sess = ort.InferenceSession(str(path), opts, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        label = "onnxruntime CUDA"
    else:
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        label = f"onnxruntime CPU ({os.cpu_count()} cores)"

    def run(x: np.ndarray) -> list[np.ndarray]:
        return [np.asarray(o, dtype=np.float32) for o in sess.run(output_names, {input_name: x})]

    return run, label


class TrtRunner:
    """Runs a serialized engine with torch CUDA tensors as buffers (no pycuda/cuda-python needed)."""

    def __init__(self, plan: Path, output_names: list[str]):
        import torch

        from export.tensorrt import import_trt, load_engine

        self.trt, _ = import_trt()
        self.runtime, self.engine, self.info = load_engine(plan)  # refuses a mismatched engine first
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = self.trt.TensorIOMode.INPUT
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.outputs = output_names
        self.torch = torch

    def _dtype(self, name: str) -> Any:
        return self.torch.from_numpy(np.zeros(1, dtype=self.trt.nptype(self.engine.get_tensor_dtype(name)))).dtype

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        torch = self.torch
        stream = torch.cuda.current_stream()
        inp = torch.from_numpy(np.ascontiguousarray(x)).cuda()
        self.context.set_input_shape(self.inputs[0], tuple(inp.shape))
        self.context.set_tensor_address(self.inputs[0], inp.data_ptr())
        outs = []
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            t = torch.empty(shape, dtype=self._dtype(name), device="cuda")
            self.context.set_tensor_address(name, t.data_ptr())
            outs.append(t)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT execution failed for {self.info.plan}")
        return [o.float().cpu().numpy() for o in outs]  # .cpu() synchronizes the stream


# --------------------------------------------------------------------------------------------- measure


def run_batched(runner: Runner, images: np.ndarray, batch: int = 64) -> list[np.ndarray]:
    chunks = [runner(np.ascontiguousarray(images[i : i + batch])) for i in range(0, len(images), batch)]
    return [np.concatenate(parts) for parts in zip(*chunks, strict=True)]


def benchmark(runner: Runner, images: np.ndarray, batches: tuple[int, ...], iters: int, warmup: int = 10) -> dict:
    """p50/p95/p99 latency (ms) and throughput (images/s) per batch size; each call is synchronous."""
    rows = {}
    for b in batches:
        x = np.ascontiguousarray(np.resize(images, (b, *images.shape[1:])))  # repeat images to fill the batch
        for _ in range(warmup):
            runner(x)
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            runner(x)
            times.append(time.perf_counter() - start)
        p = percentiles([t * 1e3 for t in times])
        rows[str(b)] = {"p50_ms": p["p50"], "p95_ms": p["p95"], "p99_ms": p["p99"], "throughput": b / (p["mean"] / 1e3)}
    return rows


def check_model(name: str, args: argparse.Namespace, report: dict[str, Any], deadline: float) -> bool:
    """Everything for one model; returns False when a parity check failed."""
    import torch

    from export.fp16 import compare_outputs, fp32_graph_path
    from training import create_model, get_spec, load_trained
    from training.data import test_images

    spec = get_spec(name)
    entry: dict[str, Any] = {"parity": {}, "latency": {}, "skipped": [], "engines": {}}
    report["models"][name] = entry
    skipped = entry["skipped"]
    if args.untrained:
        torch.manual_seed(0)
        model, entry["weights"] = create_model(name).eval(), "untrained"
    else:
        model, entry["weights"] = load_trained(name), "trained"
    images, _ = test_images(args.images, canvas=spec.train.canvas)
    outs = list(spec.output_names)
    ref = run_batched(torch_runner(model, "cpu"), images)  # the fp32 reference, as in the export gate

    runners: dict[str, Runner] = {}
    ok = True

    def gate(label: str, got: list[np.ndarray], fp16: bool) -> None:
        nonlocal ok
        cmp = compare_outputs(spec, ref, got)
        worst = max(v["max_abs_err"] for v in cmp["outputs"].values())
        if fp16:
            passed = cmp["top1_agreement"] >= spec.checks.fp16_min_top1_agreement
            rule = f"top-1 agreement >= {spec.checks.fp16_min_top1_agreement}"
        else:
            passed = worst <= spec.checks.trt_fp32_max_abs
            rule = f"max abs err <= {spec.checks.trt_fp32_max_abs}"
        entry["parity"][label] = cmp | {"max_abs_err": worst, "rule": rule, "passed": passed}
        ok &= passed or (args.untrained and fp16)  # untrained logits are near-ties: agreement is noise
        print(f"  {label:<28} top-1 {cmp['top1_agreement']:.4f}  max|err| {worst:.2e}  "
              f"{'ok' if passed else 'FAIL'} ({rule})")

    # torch eager on the device
    dev = args.device
    runners[f"torch eager fp32 ({dev})"] = torch_runner(model, dev)
    gate(f"torch eager fp32 ({dev})", run_batched(runners[f"torch eager fp32 ({dev})"], images), fp16=False)
    if dev == "cuda":
        runners["torch eager fp16 (autocast)"] = torch_runner(model, dev, fp16=True)
        gate("torch eager fp16 (autocast)", run_batched(runners["torch eager fp16 (autocast)"], images), fp16=True)
    else:
        skipped.append("torch fp16 and TensorRT: --device cpu (smoke run of this script)")

    # onnxruntime
    graph = fp32_graph_path(name)
    tmp = Path(tempfile.mkdtemp(prefix=f"gpu_check_{name}_"))
    if not graph.is_file():
        try:
            from export.onnx_export import export_onnx

            graph = export_onnx(spec, model, tmp / "model.onnx")
            entry["onnx"] = f"exported on the fly ({graph})"
        except Exception as exc:
            skipped.append(f"onnxruntime and TensorRT: no graph at {graph} and export failed: {exc}")
            graph = None
    if graph is not None:
        try:
            runner, label = ort_runner(graph, outs, spec.input.name)
            runners[label] = runner
            gate(label, run_batched(runner, images), fp16=False)
            if "CUDA" not in label:
                skipped.append("onnxruntime CUDA provider: onnxruntime-gpu is not installed (CPU provider timed)")
        except Exception as exc:
            skipped.append(f"onnxruntime: {str(exc).splitlines()[0]}")

    # TensorRT
    if graph is not None and dev == "cuda":
        _tensorrt(spec, model, graph, tmp, images, runners, gate, entry, args)

    # latency
    batches = tuple(args.batches)
    for label, runner in runners.items():
        if time.time() > deadline:
            skipped.append(f"latency of {label} and later runners: out of time (--max-seconds)")
            break
        entry["latency"][label] = benchmark(runner, images, batches, args.iters)
        row = "  ".join(f"b{b}: {v['p50_ms']:.2f} ms" for b, v in entry["latency"][label].items())
        print(f"  {label:<28} {row}")
    for s in skipped:
        print(f"  skipped: {s}")
    return ok


def _tensorrt(spec, model, graph, tmp, images, runners, gate, entry, args) -> None:
    from export.tensorrt import TensorRTUnavailableError, build_engine, import_trt

    try:
        _, flavour = import_trt()
    except TensorRTUnavailableError as exc:
        entry["skipped"].append(f"TensorRT engines: {exc}")
        return
    for precision in ("fp32", "fp16"):
        label = f"TensorRT {precision}" + (" (RTX)" if flavour == "tensorrt_rtx" else "")
        plan = (Path(args.engines) / spec.name / precision / "model.plan") if args.engines else (
            tmp / precision / "model.plan")
        try:
            info = build_engine(graph, spec, plan, precision=precision)
            entry["engines"][precision] = {"plan": str(plan), "build_seconds": info.build_seconds,
                                           "plan_bytes": info.plan_bytes, "label": info.label}
            runner = TrtRunner(plan, list(spec.output_names))
        except Exception as exc:
            entry["skipped"].append(f"{label}: {type(exc).__name__}: {str(exc).splitlines()[0]}")
            continue
        runners[label] = runner
        gate(label, run_batched(runner, images), fp16=precision == "fp16")


# --------------------------------------------------------------------------------------------- report


def write_report(report: dict[str, Any], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    h = report["host"]
    lines = [
        "# GPU check: parity and latency",
        "",
        f"Host: {h['gpu'] or 'no GPU'} (compute capability {h['device_cc']}), torch {h['torch']}, "
        f"onnxruntime {h['onnxruntime']} {h['ort_providers']}, TensorRT: {h['tensorrt']}. {h['when']}.",
        "Latency: numpy in -> numpy out per call (host<->device copies included), synchronous, "
        f"{report['iters']} timed calls after 10 warm-ups; images = real test digits. Generated by "
        "`python -m export.gpu_check`; do not edit.",
        "",
    ]
    for name, e in report["models"].items():
        lines += [f"## {name} ({e.get('weights', '?')} weights)", ""]
        if e.get("error"):
            lines += [f"Not run: {e['error']}", ""]
            continue
        lines += ["| runner | top-1 agreement | max abs err | gate |", "|---|---|---|---|"]
        for label, p in e["parity"].items():
            lines.append(f"| {label} | {p['top1_agreement']:.4f} | {p['max_abs_err']:.2e} | "
                         f"{'ok' if p['passed'] else 'FAIL'} ({p['rule']}) |")
        batches = report["batches"]
        lines += ["", "| runner | " + " | ".join(f"b{b} p50 / p95 ms | b{b} img/s" for b in batches) + " |",
                  "|---|" + "---|---|" * len(batches)]
        for label, lat in e["latency"].items():
            cells = []
            for b in batches:
                v = lat.get(str(b))
                cells += [f"{v['p50_ms']:.2f} / {v['p95_ms']:.2f}", f"{v['throughput']:.0f}"] if v else ["-", "-"]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        if e["skipped"]:
            lines += ["", "Skipped: " + "; ".join(e["skipped"])]
        lines.append("")
    if report["skipped"]:
        lines += ["## Skipped", "", *[f"- {s}" for s in report["skipped"]], ""]
    path = out_dir / "gpu_check.md"
    path.write_text("\n".join(lines))
    return path


def host_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "gpu": None, "device_cc": None,
                            "host": platform.node(), "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["device_cc"] = "{}.{}".format(*torch.cuda.get_device_capability())
    try:
        import onnxruntime as ort

        info["onnxruntime"], info["ort_providers"] = ort.__version__, ort.get_available_providers()
    except ImportError:
        info["onnxruntime"], info["ort_providers"] = "not installed", []
    try:
        from export.tensorrt import import_trt

        trt, flavour = import_trt()
        info["tensorrt"] = f"{flavour} {trt.__version__}"
    except Exception as exc:
        info["tensorrt"] = f"not available ({str(exc).splitlines()[0][:120]})"
    return info


def main(argv: list[str] | None = None) -> int:
    import torch

    from training import list_models
    from training.paths import REPORTS_DIR

    p = argparse.ArgumentParser(prog="python -m export.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="*", default=["all"], help="model names, or 'all' (default)")
    p.add_argument("--images", type=int, default=1000, help="test images for parity (default 1000)")
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 64])
    p.add_argument("--iters", type=int, default=50, help="timed calls per runner and batch (default 50)")
    p.add_argument("--untrained", action="store_true", help="use untrained weights when no checkpoints are here")
    p.add_argument("--engines", default=None, help="keep engines under this folder (default: a temp folder)")
    p.add_argument("--max-seconds", type=float, default=480, help="start no new work after this (default 480)")
    p.add_argument("--out", type=Path, default=None, help="report folder (default reports/)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cpu: smoke-run this script without a GPU (torch + onnxruntime only)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    deadline = time.time() + args.max_seconds
    out_dir = args.out or REPORTS_DIR
    report: dict[str, Any] = {"host": host_info(), "batches": args.batches, "iters": args.iters,
                              "models": {}, "skipped": []}
    print("host:", json.dumps(report["host"]))
    if args.device == "cuda" and not torch.cuda.is_available():
        report["skipped"].append("everything: no CUDA GPU is visible to torch")
        print(f"skipped: everything (no CUDA GPU); wrote {write_report(report, out_dir)}")
        return 0
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32: parity measures the runtime, not TF32
    torch.backends.cudnn.allow_tf32 = False
    names = list_models() if args.models in (["all"], []) else args.models
    ok = True
    for name in names:
        if time.time() > deadline:
            report["skipped"].append(f"model {name}: out of time (--max-seconds {args.max_seconds:.0f})")
            continue
        print(f"{name}:")
        try:
            ok &= check_model(name, args, report, deadline)
        except Exception as exc:
            if args.debug:
                raise
            report["models"][name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}",
                                      "parity": {}, "latency": {}, "skipped": []}
            print(f"  not run: {report['models'][name]['error']}")
        write_report(report, out_dir)  # after every model: a timeout still leaves a report
    path = write_report(report, out_dir)
    print(f"wrote {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
