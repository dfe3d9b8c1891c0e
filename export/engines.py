"""python -m export.engines <model|all>: parse every exported graph and build what TensorRT can build here.

For each graph of each model (``spec.deploy_graphs()``; Triton model ``spec.graph_model_name(graph)``, its
FP32 graph at ``model_repository/<triton model>/1/model.onnx``):
1. parse the FP32 graph and its FP16 graph (made with ``spec.export.fp16_keep_fp32_ops``);
2. build FP32 and FP16 engines, with a profile from the graph's named inputs.

Where they go depends on what this host is:
- full TensorRT on a CUDA GPU: engines for this GPU. The ``--deploy`` precision (default fp16) goes to
  ``model_repository/<triton model>/1/model.plan`` (what Triton's TensorRT backend loads; the GPU-target
  config is ``platform: "tensorrt_plan"``), every variant also to ``artifacts/engines/<triton model>/``;
- TensorRT-RTX without a GPU (CI, dev boxes): ahead-of-time builds for ``--archs`` into
  ``artifacts/engines/<triton model>/`` only. They prove the graphs build; they are not deployable H100
  engines (RTX cannot target SM90, and Triton's TensorRT backend does not load RTX engines).

It says plainly what it skipped and why, and writes ``reports/engines.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from export.markdown import with_host_line
from export.tensorrt import (
    DEFAULT_AOT_ARCHS,
    PRECISIONS,
    EngineInfo,
    TensorRTParseError,
    TensorRTUnavailableError,
    build_engine,
    device_compute_capability,
    import_trt,
    metadata_path,
    parse_onnx,
)
from training import layout
from training.paths import REPORTS_DIR


@dataclass
class ModelEngines:
    """The engines of one graph (one Triton model) of a spec."""

    model: str  # the Triton model: spec.graph_model_name(graph)
    spec: str = ""
    graph: str = ""
    parsed: dict[str, str] = field(default_factory=dict)  # precision -> "ok (N layers, T ms)" or error
    engines: dict[str, dict[str, Any]] = field(default_factory=dict)  # precision -> EngineInfo dict
    deployed: str | None = None
    skipped: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def build_graph_engines(
    spec: Any,
    graph: Any,
    archs: tuple[str, ...] | None,
    precisions: tuple[str, ...] = ("fp32", "fp16"),
    deploy: str | None = "fp16",
    out_root: Path | None = None,
) -> ModelEngines:
    from export.fp16 import convert_to_fp16

    name = spec.graph_model_name(graph)
    result = ModelEngines(name, spec.name, graph.name)
    fp32 = layout.onnx_path(name)
    if not fp32.is_file():
        result.skipped.append(f"no exported graph at {fp32} (run `make export`)")
        return result
    graphs = {"fp32": fp32}
    if "fp16" in precisions:
        try:  # always made afresh (a fraction of a second): the spec's keep-list may have changed since export
            graphs["fp16"] = convert_to_fp16(fp32, layout.fp16_onnx_path(name), tuple(spec.export.fp16_keep_fp32_ops))
        except Exception as exc:
            result.errors.append(f"fp16 graph: {exc}")
    if "int8" in precisions:  # the TensorRT flavour of the QDQ graph, made by `python -m export.int8 --tensorrt`
        qdq = layout.int8_onnx_path(name, "tensorrt")
        if qdq.is_file():
            graphs["int8"] = qdq
        else:
            result.skipped.append(f"int8: no QDQ graph at {qdq} (run `python -m export.int8 {spec.name} --tensorrt`)")
    for precision, path in graphs.items():
        try:
            r = parse_onnx(path)
            result.parsed[precision] = f"ok ({r.num_layers} layers, {r.seconds * 1e3:.0f} ms)"
        except TensorRTParseError as exc:
            result.parsed[precision] = "FAILED"
            result.errors.append(str(exc))
    _, flavour = import_trt()
    device_cc = device_compute_capability()
    out_dir = layout.engine_dir(name, out_root)
    for precision in precisions:
        if not result.parsed.get(precision, "").startswith("ok"):
            result.skipped.append(f"{precision} engine: its graph did not parse")
            continue
        plan = out_dir / precision / layout.PLAN_FILE
        try:
            info = build_engine(graphs[precision], spec, plan, archs=archs, precision=precision, graph=graph)
        except Exception as exc:
            result.errors.append(f"{precision} engine: {exc}")
            continue
        result.engines[precision] = asdict(info) | {"label": info.label}
        if precision == deploy:
            result.deployed = _deploy(info, flavour, device_cc, result)
    if deploy and deploy not in precisions:
        result.skipped.append(f"deploy: {deploy} was not built")
    return result


def build_model_engines(
    name: str,
    archs: tuple[str, ...] | None,
    precisions: tuple[str, ...] = ("fp32", "fp16"),
    deploy: str | None = "fp16",
    out_root: Path | None = None,
) -> list[ModelEngines]:
    """One ``ModelEngines`` per graph of model ``name``."""
    from export import manifest
    from training.registry import get_spec

    spec = get_spec(name)
    results = [build_graph_engines(spec, g, archs, precisions, deploy, out_root) for g in spec.deploy_graphs()]
    # the manifest names each graph's engines (TensorRT-RTX / ahead-of-time ones too: what was built, for what)
    keep = ("plan", "plan_sha256", "label", "compute_capabilities", "profile")
    manifest.amend(name, "engines", {r.model: {p: {k: e.get(k) for k in keep} for p, e in r.engines.items()}
                                     | {"deployed": r.deployed} for r in results})
    return results


def _deploy(info: EngineInfo, flavour: str, device_cc: str | None, result: ModelEngines) -> str | None:
    """Copy an engine into the model repository only when Triton's TensorRT backend can load it here."""
    dest = layout.plan_path(info.model)
    if flavour != "tensorrt" or info.aot or device_cc is None:
        why = "TensorRT-RTX engines are not loadable by Triton's TensorRT backend" if flavour != "tensorrt" \
            else "it was not built on this host's GPU"
        result.skipped.append(f"{dest}: not written ({why})")
        return None
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(info.plan, dest)
    meta = json.loads(metadata_path(info.plan).read_text()) | {"plan": str(dest)}
    metadata_path(dest).write_text(json.dumps(meta, indent=2) + "\n")
    return str(dest)


def write_report(results: list[ModelEngines], header: dict[str, Any], reports_dir: Path | None = None) -> Path:
    out = Path(reports_dir or REPORTS_DIR)
    out.mkdir(parents=True, exist_ok=True)
    (out / "engines.json").write_text(
        json.dumps({"host": header, "models": [asdict(r) for r in results]}, indent=2, default=str) + "\n"
    )
    lines = [
        "# TensorRT engines",
        "",
        f"Built by {header['flavour']} {header['trt_version']} on a host with "
        f"{'GPU compute capability ' + header['device_cc'] if header['device_cc'] else 'no GPU'}. "
        f"{header['kind']}. Generated by `python -m export.engines`; do not edit.",
        "",
        "| model | parse fp32 | parse fp16 | engine fp32 | engine fp16 | deployed | skipped / errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        def eng(p: str, r: ModelEngines = r) -> str:
            e = r.engines.get(p)
            return f"{e['plan_bytes'] / 1e6:.1f} MB, {e['build_seconds']:.2f} s" if e else "-"

        notes = "; ".join(r.skipped + r.errors).replace("|", "/")
        lines.append(
            f"| {r.model} | {r.parsed.get('fp32', '-')} | {r.parsed.get('fp16', '-')} | {eng('fp32')} | "
            f"{eng('fp16')} | {r.deployed or 'no'} | {notes} |"
        )
    path = out / "engines.md"
    path.write_text(with_host_line("\n".join(lines) + "\n"))
    return path


def main(argv: list[str] | None = None) -> int:
    from training.cli import model_names

    p = argparse.ArgumentParser(prog="python -m export.engines", description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="*", default=["all"], help="model names, or 'all' (default)")
    p.add_argument("--archs", default=None,
                   help="TensorRT-RTX ahead-of-time targets, e.g. sm80,sm86,sm89 (default: this GPU, else sm86)")
    p.add_argument("--precision", default="fp32,fp16", help="comma list of fp32, fp16, int8 (default fp32,fp16)")
    p.add_argument("--deploy", default="fp16", choices=[*PRECISIONS, "none"],
                   help="engine copied to model_repository/<model>/1/model.plan when deployable (default fp16)")
    p.add_argument("--out", type=Path, default=None, help="engine folder (default artifacts/engines)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    a = p.parse_args(argv)
    # Names first: an unknown model is an error even on a host that can build nothing.
    names = model_names(a.models)
    if names is None:
        return 2
    precisions = tuple(x.strip() for x in a.precision.split(",") if x.strip())
    bad = [x for x in precisions if x not in PRECISIONS]
    if bad:
        print(f"error: unknown precision {bad}; expected {PRECISIONS}", file=sys.stderr)
        return 2
    archs = tuple(x.strip() for x in a.archs.split(",") if x.strip()) if a.archs else None
    try:
        trt, flavour = import_trt()
    except TensorRTUnavailableError as exc:
        print(f"skipped: every engine ({exc})", file=sys.stderr)
        return 0  # not an error: a host without TensorRT builds no engines, and says so
    device_cc = device_compute_capability()
    if flavour == "tensorrt_rtx" and device_cc is None:
        kind = (f"Ahead-of-time TensorRT-RTX builds for {', '.join(archs or DEFAULT_AOT_ARCHS)}: they prove the graphs "
                "parse and build; they are NOT deployable H100 engines (RTX cannot target SM90) and Triton's "
                "TensorRT backend does not load them")
    elif flavour == "tensorrt_rtx":
        kind = f"TensorRT-RTX builds on a GPU of compute capability {device_cc} (not loadable by Triton)"
    else:
        kind = f"Full TensorRT builds for this GPU (compute capability {device_cc})"
    print(kind)
    header = {"flavour": flavour, "trt_version": trt.__version__, "device_cc": device_cc, "kind": kind}
    results: list[ModelEngines] = []
    start = time.perf_counter()
    for name in names:
        try:
            rs = build_model_engines(name, archs, precisions, None if a.deploy == "none" else a.deploy, a.out)
        except Exception as exc:
            if a.debug:
                raise
            rs = [ModelEngines(name, name, errors=[f"{type(exc).__name__}: {exc}"])]
        for r in rs:
            results.append(r)
            built = ", ".join(f"{k} {v['plan_bytes'] / 1e6:.1f} MB in {v['build_seconds']:.2f} s"
                              for k, v in r.engines.items()) or "nothing built"
            print(f"{r.model}: parsed {r.parsed or '-'}; {built}")
            for s in r.skipped:
                print(f"  skipped: {s}")
            for e in r.errors:
                print(f"  error: {e}", file=sys.stderr)
    path = write_report(results, header)
    print(f"wrote {path} ({time.perf_counter() - start:.1f} s)")
    return 1 if any(r.errors for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
