"""``python -m bench.fused_attention``: the attention graphs written out (opset 18) against fused (opset 23 ONNX
``Attention``, ``export/rewriters/fused_attention.py``), side by side, plus feedback at onnxruntime's graph
optimization levels.

Per model (default: every registered model the fused-attention rewrite applies to), both graphs are exported
from the same trained weights into a temporary folder, then:
- ops: the ONNX op counts of each graph and of onnxruntime's optimized graph (what fused at load);
- runtimes: onnxruntime loads it, OpenVINO compiles it (static shape, f32), TensorRT(-RTX)'s parser reads it;
- parity: torch (the unrewritten model) vs onnxruntime, max abs per output, at the spec's parity batches x sides
  on real test images (``export.parity.check_parity``);
- speed: onnxruntime as served (``export.runtime``, 2 threads, spin off), both graphs interleaved per round
  (each timed call after an untimed one), p50/p95/p99 at batch 1 and 32, the ratio written-out p50 / fused p50,
  and the share of the 2-thread peak at batch 32: the model's FLOPs (torch's FlopCounterMode: matmuls,
  convolutions, attention) per second over onnxruntime's own 2-thread MatMul GFLOP/s, measured in the same run.
- feedback (``--levels``): its shipped graph at onnxruntime's BASIC, EXTENDED and ALL (the default, what the
  project serves) optimization levels, interleaved.

Writes reports/fused_attention.{md,json}.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from export.markdown import md_table, with_host_line
from export.timing import THREADS, interleaved
from training import paths

BATCHES = (1, 32)
ROUNDS = {1: 100, 32: 25}
PEAK_N = 1024  # square MatMul for onnxruntime's 2-thread peak


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:240]


def fused_models() -> list[str]:
    """Registered models whose export the fused-attention rewrite changes (read from the spec and the modules)."""
    from export.rewriters.fused_attention import FUSED_ATTENTION
    from export.rewriters.registry import REWRITES
    from training.registry import create_model, get_spec, list_models

    return [n for n in list_models() if FUSED_ATTENTION in get_spec(n).export.rewriters
            and REWRITES[FUSED_ATTENTION].applies(create_model(n))]


def op_counts(path: Path, optimized: bool = False) -> dict[str, int]:
    """ONNX op counts of ``path``, or of onnxruntime's optimized graph of it (as the project's sessions load it)."""
    import onnx

    if optimized:
        import onnxruntime as ort

        from export.runtime import session_options

        so = session_options(THREADS)
        out = path.with_suffix(".ort.onnx")
        so.optimized_model_filepath = str(out)
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        path = out
    nodes = onnx.load(path).graph.node
    return dict(collections.Counter(f"{n.domain}.{n.op_type}" if n.domain else n.op_type for n in nodes))


def op_diff(old: dict[str, int], new: dict[str, int]) -> str:
    keys = sorted(set(old) | set(new), key=lambda k: (-abs(new.get(k, 0) - old.get(k, 0)), k))
    parts = [f"{k} {old.get(k, 0)}->{new.get(k, 0)}" for k in keys if old.get(k, 0) != new.get(k, 0)]
    return ", ".join(parts) or "none"


def runtimes(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, str]:
    """'ok' or the first line of each runtime's refusal."""
    from export.openvino_runner import OpenVinoRunner, available

    out: dict[str, str] = {"onnxruntime": "ok"}  # it was loaded for the op counts
    if available():
        try:
            OpenVinoRunner(path, threads=THREADS).infer(feeds)
            out["openvino"] = "ok"
        except Exception as e:
            out["openvino"] = _first_line(e)
    try:
        from export.tensorrt.library import trt_available
        from export.tensorrt.loaders import NetworkFromOnnxPath

        if trt_available():
            with NetworkFromOnnxPath(path)() as net:
                layers = collections.Counter(str(net.network.get_layer(i).type).split(".")[-1]
                                             for i in range(net.network.num_layers))
            out["tensorrt parser"] = f"ok ({net.flavour}; ATTENTION layers: {layers.get('ATTENTION_OUTPUT', 0)})"
    except Exception as e:
        out["tensorrt parser"] = _first_line(e)
    return out


def flops(model: Any, feeds: dict[str, np.ndarray]) -> float:
    """FLOPs of one forward pass (matmuls, convolutions, attention) on ``feeds``."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*(torch.from_numpy(v) for v in feeds.values()))
    return float(counter.get_total_flops())


def matmul_peak(rounds: int = 20) -> float:
    """onnxruntime's 2-thread fp32 MatMul GFLOP/s (PEAK_N cubed, best of ``rounds``): the peak a graph is held to."""
    import onnx
    from onnx import TensorProto, helper

    from export.runners import OnnxRuntimeRunner

    n = PEAK_N
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, [n, n])
    c = helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "mm", [a, b], [c])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mm.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
        runner = OnnxRuntimeRunner(path, threads=THREADS)
        rng = np.random.default_rng(0)
        x = {"a": rng.random((n, n), dtype=np.float32), "b": rng.random((n, n), dtype=np.float32)}
        best = min(interleaved({"mm": runner}, x, rounds, 3)["mm"].values())
    return 2 * n**3 / (best / 1e3) / 1e9


def bench_model(name: str, tmp: Path, peak: float, progress: Any) -> dict[str, Any]:
    from export.onnx_export import export_onnx
    from export.parity import check_parity
    from export.runners import OnnxRuntimeRunner
    from training.checkpoints import load_trained
    from training.feeds import sample_feeds
    from training.registry import get_spec

    spec = get_spec(name)
    model = load_trained(name).eval()
    variants = {"written out": dataclasses.replace(spec, export=dataclasses.replace(spec.export, rewriters=())),
                "fused": spec}
    row: dict[str, Any] = {"graphs": {}}
    feeds = sample_feeds(spec, max(BATCHES), spec.train.canvas)
    for key, s in variants.items():
        path = export_onnx(s, model, tmp / f"{name}.{key.replace(' ', '_')}.onnx")
        parity = check_parity(s, model, path, raise_on_fail=False)
        row["graphs"][key] = {
            "opset": _opset(path), "ops": op_counts(path), "ops_optimized": op_counts(path, optimized=True),
            "runtimes": runtimes(path, {k: v[:1] for k, v in feeds.items()}),
            "parity_max_abs": parity.max_abs, "parity_cases": parity.cases, "parity_failures": parity.failures[:3],
            "path": str(path)}
    runners = {k: OnnxRuntimeRunner(g["path"], threads=THREADS) for k, g in row["graphs"].items()}
    row["batches"] = {}
    for b in BATCHES:
        x = {k: v[:b] for k, v in feeds.items()}
        t = interleaved(runners, x, ROUNDS[b], 3, settle=True, progress=progress)
        f = flops(model, x)
        row["batches"][str(b)] = {
            "ms": t, "ratio": t["written out"]["p50"] / t["fused"]["p50"], "gflop": f / 1e9,
            "share_of_peak": {k: f / (v["p50"] / 1e3) / 1e9 / peak for k, v in t.items()}}
    return row


def _opset(path: Path) -> int:
    import onnx

    return next(o.version for o in onnx.load(path).opset_import if o.domain in ("", "ai.onnx"))


def bench_levels(name: str, progress: Any) -> dict[str, Any]:
    """``name``'s shipped fp32 graph at onnxruntime's optimization levels (spec-driven feeds, real images)."""
    import onnxruntime as ort

    from export.runtime import session_options
    from training.feeds import sample_feeds
    from training.layout import onnx_path
    from training.registry import get_spec

    spec = get_spec(name)
    path = onnx_path(name)
    levels = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all (served)": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}

    class Level:
        def __init__(self, level: Any) -> None:
            so = session_options(THREADS)
            so.graph_optimization_level = level
            self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            self.names = [o.name for o in self.session.get_outputs()]

        def infer(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            return self.session.run(self.names, feeds)

    runners = {k: Level(v) for k, v in levels.items()}
    feeds = sample_feeds(spec, max(BATCHES), spec.train.canvas)
    out: dict[str, Any] = {"path": str(path), "batches": {}}
    for b in BATCHES:
        x = {k: v[:b] for k, v in feeds.items()}
        outs = {k: r.infer(x) for k, r in runners.items()}
        ref = outs["all (served)"]
        diff = {k: max(float(np.abs(a - c).max()) for a, c in zip(o, ref, strict=True)) for k, o in outs.items()}
        t = interleaved(runners, x, max(5, ROUNDS[b] // 3), 2, settle=True, progress=progress)
        out["batches"][str(b)] = {"ms": t, "max_abs_vs_all": diff}
    return out


def render(r: dict[str, Any]) -> str:
    lines = ["# Fused attention: written-out (opset 18) vs ONNX `Attention` (opset 23) graphs", "",
             f"onnxruntime {r['versions']['onnxruntime']}, {THREADS} threads, spin-wait off (as served), graphs "
             f"interleaved per round, each timed call after an untimed one; load average before "
             f"{' '.join(f'{v:.2f}' for v in r['loadavg'])}. Ratio = written-out p50 / fused p50 (above 1: fused "
             f"is faster). Share of peak: FLOPs / p50 / onnxruntime's 2-thread MatMul peak, measured in this run: "
             f"{r['peak_gflops']:.0f} GFLOP/s.", ""]
    rows = []
    for name, m in r["models"].items():
        for b, v in m["batches"].items():
            for k, t in v["ms"].items():
                rows.append([name, b, k, f"{t['p50']:.3f}", f"{t['p95']:.3f}", f"{t['p99']:.3f}",
                             f"{v['share_of_peak'][k]:.0%}", f"{v['ratio']:.2f}" if k == "fused" else ""])
    lines += [md_table(["model", "batch", "graph", "p50 ms", "p95 ms", "p99 ms", "share of peak", "ratio"], rows), ""]
    lines += ["## Graphs", ""]
    rows = []
    for name, m in r["models"].items():
        g = m["graphs"]
        for k, v in g.items():
            rows.append([name, k, v["opset"], "; ".join(f"{e}: {s}" for e, s in v["runtimes"].items()),
                         ", ".join(f"{o} {e:.1e}" for o, e in v["parity_max_abs"].items()),
                         "pass" if not v["parity_failures"] else "FAIL"])
    lines += [md_table(["model", "graph", "opset", "runtimes", "parity max abs (all cases)", "gate"], rows), ""]
    for name, m in r["models"].items():
        g = m["graphs"]
        cases = sorted({(c["batch"], c["side"]) for c in g["fused"]["parity_cases"]})
        lines += [f"- **{name}** ({len(cases)} parity cases: batches x sides {cases}): exported ops "
                  f"{op_diff(g['written out']['ops'], g['fused']['ops'])}; after onnxruntime's optimizer "
                  f"{op_diff(g['written out']['ops_optimized'], g['fused']['ops_optimized'])}"]
    if r.get("levels"):
        for name, lv in r["levels"].items():
            lines += ["", f"## {name}: onnxruntime graph optimization levels", "",
                      f"`{lv['path']}` (its shipped graph). `all` is onnxruntime's default and what the project "
                      f"serves; max abs = the level's outputs against `all`'s.", ""]
            rows = [[b, k, f"{t['p50']:.2f}", f"{t['p95']:.2f}", f"{t['p99']:.2f}", f"{v['max_abs_vs_all'][k]:.1e}"]
                    for b, v in lv["batches"].items() for k, t in v["ms"].items()]
            lines += [md_table(["batch", "level", "p50 ms", "p95 ms", "p99 ms", "max abs"], rows)]
    return with_host_line("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    from tqdm import tqdm

    from training.fingerprint import host_fingerprint

    p = argparse.ArgumentParser(prog="python -m bench.fused_attention", description=__doc__.split("\n")[0])
    p.add_argument("models", nargs="*", help="default: every model the fused-attention rewrite applies to")
    p.add_argument("--levels", nargs="*", default=["feedback"], help="models timed at ORT's optimization levels")
    a = p.parse_args(argv)
    names = a.models or fused_models()
    r: dict[str, Any] = {"versions": {"onnxruntime": host_fingerprint()["onnxruntime"]},
                         "loadavg": list(os.getloadavg()),
                         "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "models": {}}
    r["peak_gflops"] = matmul_peak()
    total = len(names) * sum(ROUNDS.values()) + len(a.levels) * sum(max(5, n // 3) for n in ROUNDS.values())
    with tempfile.TemporaryDirectory() as tmp, tqdm(total=total, desc="rounds") as bar:
        for name in names:
            r["models"][name] = bench_model(name, Path(tmp), r["peak_gflops"], bar)
            for g in r["models"][name]["graphs"].values():
                g.pop("path")
        r["levels"] = {name: bench_levels(name, bar) for name in a.levels}
    out = paths.REPORTS_DIR / "fused_attention.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(r))
    out.with_suffix(".json").write_text(json.dumps(r, indent=2, default=float) + "\n")
    print(out.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
