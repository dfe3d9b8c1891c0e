"""python -m export.gpu_check: GPU parity and latency for every model, on whatever this host has.

On a CUDA host it:
- runs torch eager on the GPU in fp32 (TF32 off) and fp16 (autocast) against the fp32 CPU reference;
- runs onnxruntime with the CUDA provider when onnxruntime-gpu is installed (else the CPU provider,
  labelled as such, as a baseline);
- with TensorRT installed, builds FP32, FP16 and INT8 engines for this GPU (one per graph, composed as the
  spec composes them) and runs them after refusing any engine built for another GPU/version. INT8 engines
  come from the ``tensorrt`` flavour of each graph's QDQ int8 graph (``export.int8``: the model's recorded
  choice in ``export/int8/choices.json``, calibrated on training images; explicit quantization, the
  strongly typed builder takes int8 from the Q/DQ nodes); a model recorded not to ship int8 gets none, and
  the report says why. ``--precisions`` narrows the list; ``--plan`` prints what would be built, per model,
  and exits without running anything (no GPU needed);
- compares every runner with the reference through the one comparator (``export.compare``) on every
  output the spec declares, at each of ``spec.checks.parity_sides``: fp32 runners are held to
  ``spec.checks.trt_fp32_max_abs``, fp16 ones to ``spec.checks.fp16_min_agreement`` and int8 ones to
  ``spec.checks.int8_agreement`` (the output kinds' agreement rules, as the INT8 export gate);
- times every runner at batch 1, 8 and 64 (p50/p95 latency, throughput), numpy in -> numpy out, so
  host<->device copies are included the same way for all, as a server would pay them;
- writes ``reports/gpu_check.{md,json}`` and says what it skipped and why.

It downloads nothing: checkpoints come from the shipped weights, graphs from model_repository/ (exported
here on the fly when missing), feeds from ``training.feeds.sample_feeds``. ``--untrained`` uses freshly
initialised weights (parity and latency only; agreement numbers then mean little). ``--max-seconds`` stops
starting new models when time runs short, so a lent GPU's time limit still leaves a report.
Exit code: 2 for an unknown model, 1 if a parity check failed, else 0 (skips are not failures).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from export.compare import Tolerance, compare, merge
from export.runners import ComposedRunner, OnnxRuntimeRunner, Runner, TorchRunner, infer_batched
from export.timing import percentiles
from training import layout

PRECISIONS = ("fp32", "fp16", "int8")  # the TensorRT engines built per graph, in this order

# --------------------------------------------------------------------------------------------- measure


def resize_feeds(feeds: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    """Every feed repeated or cut to ``batch`` samples."""
    return {k: np.ascontiguousarray(np.resize(v, (batch, *v.shape[1:]))) for k, v in feeds.items()}


def benchmark(runner: Runner, feeds: dict[str, np.ndarray], batches: tuple[int, ...], iters: int,
              warmup: int = 10) -> dict[str, dict[str, float]]:
    """p50/p95/p99 latency (ms) and throughput (samples/s) per batch size; each call is synchronous."""
    rows = {}
    for b in batches:
        x = resize_feeds(feeds, b)
        for _ in range(warmup):
            runner.infer(x)
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            runner.infer(x)
            times.append(time.perf_counter() - start)
        p = percentiles([t * 1e3 for t in times])
        rows[str(b)] = {"p50_ms": p["p50"], "p95_ms": p["p95"], "p99_ms": p["p99"], "throughput": b / (p["mean"] / 1e3)}
    return rows


def composed(spec: Any, per_graph: dict[str, Runner], name: str) -> Runner:
    """The spec's pipeline over one runner per graph (or the one graph's runner)."""
    if spec.composition is None:
        runner = next(iter(per_graph.values()))
        runner.name = name
        return runner
    return ComposedRunner(spec.composition, per_graph, spec.output_names, name=name)


def engine_plan(spec: Any, precisions: tuple[str, ...] = PRECISIONS) -> list[dict[str, Any]]:
    """What ``_tensorrt`` builds for ``spec``, in order, without building anything (no GPU or TensorRT needed):
    one row per precision and graph with the Triton model and the ONNX graph the engine comes from; an int8
    row of a model recorded not to ship int8 carries ``skipped`` (why) instead."""
    from export.int8.choices import choice_for

    choice = choice_for(spec.name)
    kept = sum(len(v) for v in choice.keep_fp32_nodes.values()) + len(choice.keep_fp32_ops)
    sources = {"fp32": "fp32 graph", "fp16": "fp32 graph, converted to fp16 as the spec keeps it",
               "int8": f"QDQ int8 graph, tensorrt flavour, {choice.calibration} calibration on "
                       f"{choice.calibration_images} training images, {kept} kept float"}
    rows = []
    for precision in precisions:
        for g in spec.deploy_graphs():
            row = {"precision": precision, "graph": g.name, "triton_model": spec.graph_model_name(g)}
            if precision == "int8" and not choice.ship:
                row["skipped"] = f"int8 not shipped ({choice.not_shipped})"
            else:
                row["source"] = sources[precision]
            rows.append(row)
    return rows


def plan_text(rows: list[dict[str, Any]]) -> str:
    """One line: ``fp32 cnn, fp16 cnn, int8 cnn (QDQ ...)``; a skipped row says why."""
    def one(r: dict[str, Any]) -> str:
        what = f"{r['precision']} {r['triton_model']}"
        return f"{what} (skipped: {r['skipped']})" if "skipped" in r else \
            (f"{what} ({r['source']})" if r["precision"] == "int8" else what)

    return ", ".join(one(r) for r in rows) or "none"


def _precisions(text: str) -> tuple[str, ...]:
    out = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [x for x in out if x not in PRECISIONS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown precision {bad}; expected some of {','.join(PRECISIONS)}")
    return out


class Gate:
    """Every runner vs the reference, per side, through the one comparator."""

    def __init__(self, spec: Any, ref: dict[int, dict[str, np.ndarray]], feeds: dict[int, dict[str, np.ndarray]],
                 entry: dict[str, Any], untrained: bool, batch: int) -> None:
        self.spec, self.ref, self.feeds, self.entry = spec, ref, feeds, entry
        self.untrained, self.batch = untrained, batch
        self.ok = True

    def __call__(self, label: str, runner: Runner, precision: str = "fp32") -> None:
        checks = self.spec.checks
        # Per output: an output with its own measured bound (``Checks.output_max_abs`` / ``fp16_output_agreement``)
        # keeps it on TensorRT too.
        if precision == "fp16":
            tol = {t.name: Tolerance(max_abs=None, min_agreement=checks.fp16_agreement(t.name))
                   for t in self.spec.outputs}
            rule = f"agreement >= {checks.fp16_min_agreement}"
        elif precision == "int8":
            tol = {t.name: Tolerance(max_abs=None, min_agreement=checks.int8_agreement(t.name))
                   for t in self.spec.outputs}
            rule = f"agreement >= {checks.int8_min_agreement}"
        else:
            tol = {t.name: Tolerance(max_abs=max(checks.trt_fp32_max_abs, checks.max_abs(t.name)), min_agreement=None)
                   for t in self.spec.outputs}
            rule = f"max abs err <= {checks.trt_fp32_max_abs}"
        comparisons = {side: compare(self.ref[side], infer_batched(runner, f, self.batch), self.spec.outputs, tol,
                                     where=f"{label} at side {side}")
                       for side, f in self.feeds.items()}
        merged = merge(comparisons.values())
        failures = [f for c in comparisons.values() for f in c.failures]
        passed = not failures
        self.entry["parity"][label] = {
            "rule": rule, "passed": passed, "failures": failures, "max_abs": merged["max_abs"],
            "agreement": merged["agreement"], "sides": {str(s): c.as_dict() for s, c in comparisons.items()},
        }
        # untrained logits are near-ties: agreement is noise
        self.ok &= passed or (self.untrained and precision != "fp32")
        agree = " ".join(f"{k} {v:.4f}" for k, v in merged["agreement"].items()) or "-"
        worst = max(merged["max_abs"].values(), default=0.0)
        print(f"  {label:<28} agreement {agree}  max|err| {worst:.2e}  {'ok' if passed else 'FAIL'} ({rule})")
        for f in failures[:3]:
            print(f"    {f}")


def check_model(name: str, args: argparse.Namespace, report: dict[str, Any], deadline: float) -> bool:
    """Everything for one model; returns False when a parity check failed."""
    import torch

    from training.checkpoints import load_trained
    from training.feeds import sample_feeds
    from training.registry import get_spec

    spec = get_spec(name)
    entry: dict[str, Any] = {"parity": {}, "latency": {}, "skipped": [], "engines": {}}
    report["models"][name] = entry
    skipped = entry["skipped"]
    if args.untrained:
        torch.manual_seed(0)
        model, entry["weights"] = spec.builder().eval(), "untrained"
    else:
        model, entry["weights"] = load_trained(name), "trained"
    sides = tuple(args.sides or spec.checks.parity_sides)
    feeds = {side: sample_feeds(spec, args.images, side) for side in sides}
    batch = min(64, spec.export.profile_batch[2])
    reference = TorchRunner.for_spec(spec, model, name="torch eager fp32 (cpu, reference)")
    ref = {side: infer_batched(reference, f, batch) for side, f in feeds.items()}  # as in the export gate
    gate = Gate(spec, ref, feeds, entry, args.untrained, batch)
    runners: dict[str, Runner] = {}

    dev = args.device
    label = f"torch eager fp32 ({dev})"
    runners[label] = TorchRunner.for_spec(spec, model, device=dev, name=label)
    gate(label, runners[label])
    entry["engines_planned"] = engine_plan(spec, tuple(args.precisions))
    if dev == "cuda":
        label = "torch eager fp16 (autocast)"
        runners[label] = TorchRunner.for_spec(spec, model, device=dev, autocast_fp16=True, name=label)
        gate(label, runners[label], precision="fp16")
    else:
        skipped.append("torch fp16 and TensorRT: --device cpu (smoke run of this script); would build: "
                       + plan_text(entry["engines_planned"]))

    tmp = Path(tempfile.mkdtemp(prefix=f"gpu_check_{name}_"))
    graphs = _graph_files(spec, model, tmp, entry)
    if graphs is not None:
        try:
            import onnxruntime as ort

            cuda = "CUDAExecutionProvider" in ort.get_available_providers()
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
            label = "onnxruntime CUDA" if cuda else f"onnxruntime CPU ({os.cpu_count()} cores)"
            per_graph = {g: OnnxRuntimeRunner(p, providers=providers) for g, p in graphs.items()}
            runners[label] = composed(spec, per_graph, label)
            gate(label, runners[label])
            if not cuda:
                skipped.append("onnxruntime CUDA provider: onnxruntime-gpu is not installed (CPU provider timed)")
        except Exception as exc:
            skipped.append(f"onnxruntime: {str(exc).splitlines()[0]}")

    if graphs is not None and dev == "cuda":
        _tensorrt(spec, graphs, tmp, runners, gate, entry, args)

    batches = tuple(args.batches)
    latency_feeds = feeds[sides[0]]
    for label, runner in runners.items():
        if time.time() > deadline:
            skipped.append(f"latency of {label} and later runners: out of time (--max-seconds)")
            break
        entry["latency"][label] = benchmark(runner, latency_feeds, batches, args.iters)
        row = "  ".join(f"b{b}: {v['p50_ms']:.2f} ms" for b, v in entry["latency"][label].items())
        print(f"  {label:<28} {row}")
    for s in skipped:
        print(f"  skipped: {s}")
    return gate.ok


def _graph_files(spec: Any, model: Any, tmp: Path, entry: dict[str, Any]) -> dict[str, Path] | None:
    """Graph name -> its FP32 ONNX file: the repository's, or exported here on the fly when missing."""
    files: dict[str, Path] = {}
    for g in spec.deploy_graphs():
        path = layout.onnx_path(spec.graph_model_name(g))
        if not path.is_file():
            try:
                from export.onnx_export import export_onnx

                path = export_onnx(spec, model, tmp / f"{spec.graph_model_name(g)}.onnx", graph=g)
                entry.setdefault("onnx", {})[g.name] = f"exported on the fly ({path})"
            except Exception as exc:
                entry["skipped"].append(f"onnxruntime and TensorRT: no graph at {path} and export failed: "
                                        f"{str(exc).splitlines()[0]}")
                return None
        files[g.name] = path
    return files


def _tensorrt(spec: Any, graphs: dict[str, Path], tmp: Path, runners: dict[str, Runner], gate: Gate,
              entry: dict[str, Any], args: argparse.Namespace) -> None:
    from export.tensorrt import TensorRTRunner, TensorRTUnavailableError, build_engine, import_trt

    try:
        _, flavour = import_trt()
    except TensorRTUnavailableError as exc:
        entry["skipped"].append(f"TensorRT engines ({plan_text(entry['engines_planned'])}): {exc}")
        return
    root = Path(args.engines) if args.engines else tmp / "engines"
    deploy = {g.name: g for g in spec.deploy_graphs()}
    for precision in args.precisions:
        label = f"TensorRT {precision}" + (" (RTX)" if flavour == "tensorrt_rtx" else "")
        rows = [r for r in entry["engines_planned"] if r["precision"] == precision]
        why = next((r["skipped"] for r in rows if "skipped" in r), None)
        if why:
            entry["skipped"].append(f"{label}: {why}")
            continue
        per_graph: dict[str, Runner] = {}
        try:
            sources = _int8_sources(spec, graphs, tmp) if precision == "int8" else graphs
            for name, src in sources.items():
                triton_model = spec.graph_model_name(deploy[name])
                plan = layout.engine_dir(triton_model, root) / precision / layout.PLAN_FILE
                info = build_engine(src, spec, plan, precision=precision, graph=deploy[name])
                entry["engines"].setdefault(precision, {})[triton_model] = {
                    "plan": str(plan), "onnx": str(src), "build_seconds": info.build_seconds,
                    "plan_bytes": info.plan_bytes, "label": info.label}
                per_graph[name] = TensorRTRunner(plan)
        except Exception as exc:
            entry["skipped"].append(f"{label}: {type(exc).__name__}: {str(exc).splitlines()[0]}")
            continue
        runners[label] = composed(spec, per_graph, label)
        gate(label, runners[label], precision=precision)


def _int8_sources(spec: Any, graphs: dict[str, Path], tmp: Path) -> dict[str, Path]:
    """Graph name -> the ``tensorrt`` flavour of its QDQ int8 graph, quantized with the model's recorded choice
    (calibrated on training images, on this host's CPU) into ``tmp``."""
    from export.int8.choices import choice_for
    from export.int8.gate import build_int8_graphs

    return build_int8_graphs(spec, graphs, choice_for(spec.name), out_dir=tmp / "int8", flavour="tensorrt")


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
        "Parity: every output against torch fp32 on CPU, at every size in the spec's parity sides. "
        "Latency: numpy in -> numpy out per call (host<->device copies included), synchronous, "
        f"{report['iters']} timed calls after 10 warm-ups. Generated by `python -m export.gpu_check`; do not edit.",
        "",
    ]
    for name, e in report["models"].items():
        lines += [f"## {name} ({e.get('weights', '?')} weights)", ""]
        if e.get("error"):
            lines += [f"Not run: {e['error']}", ""]
            continue
        lines += ["| runner | agreement | max abs err | gate |", "|---|---|---|---|"]
        for label, p in e["parity"].items():
            agree = ", ".join(f"{k} {v:.4f}" for k, v in p["agreement"].items()) or "-"
            worst = max(p["max_abs"].values(), default=None)
            lines.append(f"| {label} | {agree} | {'-' if worst is None else f'{worst:.2e}'} | "
                         f"{'ok' if p['passed'] else 'FAIL'} ({p['rule']}) |")
        batches = report["batches"]
        lines += ["", "| runner | " + " | ".join(f"b{b} p50 / p95 ms | b{b} samples/s" for b in batches) + " |",
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


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    from training.cli import model_names
    from training.paths import REPORTS_DIR

    p = argparse.ArgumentParser(prog="python -m export.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="*", default=["all"], help="model names, or 'all' (default)")
    p.add_argument("--images", type=int, default=1000, help="samples per size for parity (default 1000)")
    p.add_argument("--sides", type=_ints, default=None, help="sizes of every Dim (default: the spec's parity sides)")
    p.add_argument("--batches", type=_ints, default=[1, 8, 64])
    p.add_argument("--iters", type=int, default=50, help="timed calls per runner and batch (default 50)")
    p.add_argument("--untrained", action="store_true", help="use untrained weights when no checkpoints are here")
    p.add_argument("--engines", default=None, help="keep engines under this folder (default: a temp folder)")
    p.add_argument("--precisions", type=_precisions, default=PRECISIONS,
                   help="TensorRT engines to build, comma list (default fp32,fp16,int8)")
    p.add_argument("--plan", action="store_true",
                   help="print the TensorRT engines each model would get, then exit (runs nothing)")
    p.add_argument("--max-seconds", type=float, default=480, help="start no new work after this (default 480)")
    p.add_argument("--out", type=Path, default=None, help="report folder (default reports/)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cpu: smoke-run this script without a GPU (torch + onnxruntime only)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    # Names first: an unknown model is an error, never a skip, whatever this host has.
    names = model_names(args.models)
    if names is None:
        return 2
    if args.plan:
        from training.registry import get_spec

        for name in names:
            print(f"{name}: {plan_text(engine_plan(get_spec(name), tuple(args.precisions)))}")
        return 0
    import torch

    deadline = time.time() + args.max_seconds
    out_dir = args.out or REPORTS_DIR
    report: dict[str, Any] = {"host": host_info(), "batches": args.batches, "iters": args.iters,
                              "models": {}, "skipped": []}
    print("host:", json.dumps(report["host"]))
    if args.device == "cuda" and not torch.cuda.is_available():
        from training.registry import get_spec

        report["skipped"].append("everything: no CUDA GPU is visible to torch")
        report["engines_planned"] = {name: engine_plan(get_spec(name), tuple(args.precisions)) for name in names}
        for name, rows in report["engines_planned"].items():
            report["skipped"].append(f"TensorRT engines of {name}: {plan_text(rows)}")
            print(f"{name}: would build TensorRT engines: {plan_text(rows)}")
        print(f"skipped: everything (no CUDA GPU); wrote {write_report(report, out_dir)}")
        return 0
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32: parity measures the runtime, not TF32
    torch.backends.cudnn.allow_tf32 = False
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
